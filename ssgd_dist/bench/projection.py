"""The projection to many GPUs: a ring all-reduce cost model, not a measurement.

One machine cannot time a 1024-GPU all-reduce, so the measured compute time and gradient bytes are
carried to cluster scale by the textbook cost of a ring all-reduce; the report labels it a model.
"""

from __future__ import annotations

from typing import Any

PROJECTION_GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)


def ring_allreduce_seconds(
    nbytes: float, gpus: int, bandwidth_bytes_per_s: float, latency_s: float, calls: int = 1
) -> float:
    """Ring all-reduce of ``nbytes`` over ``gpus`` in ``calls`` pieces:
    calls x latency + 2(p-1)/p x bytes / bandwidth."""
    if gpus <= 1:
        return 0.0
    return calls * latency_s + 2 * (gpus - 1) / gpus * nbytes / bandwidth_bytes_per_s


def project_step(
    compute_s: float,
    grad_bytes: float,
    all_reduces: int,
    gpus: int,
    bandwidth_bytes_per_s: float,
    latency_s: float,
    overlap: float,
    calls: int = 1,
) -> dict[str, float]:
    """Weak scaling (fixed per-GPU batch): step = compute + (1 - overlap) x all-reduce time, per all-reduce."""
    comm = all_reduces * ring_allreduce_seconds(grad_bytes, gpus, bandwidth_bytes_per_s, latency_s, calls)
    step = compute_s + (1.0 - overlap) * comm
    return {"gpus": gpus, "comm_s": comm, "step_s": step, "efficiency": compute_s / step}


def projection(
    compute: dict[str, float],
    grad_bytes: float,
    calls: int,
    bandwidth_gbs: float,
    latency_us: float,
    overlap: float,
    gpus: tuple[int, ...] = PROJECTION_GPUS,
) -> dict[str, Any]:
    """``compute``: measured compute-only step time of ``sgd`` and ``ssgd`` (S-SGD ``halves``); the naive
    version computes what ``ssgd`` does and all-reduces twice."""
    bw, lat = bandwidth_gbs * 1e9, latency_us * 1e-6
    plan = {"sgd": (compute["sgd"], 1), "ssgd": (compute["ssgd"], 1), "ssgd-naive": (compute["ssgd"], 2)}
    rows = []
    for p in gpus:
        row: dict[str, Any] = {"gpus": p}
        for name, (c, n) in plan.items():
            r = project_step(c, grad_bytes, n, p, bw, lat, overlap, calls)
            row[name] = {"step_s": r["step_s"], "comm_s": r["comm_s"], "efficiency": r["efficiency"]}
        row["ssgd_over_sgd"] = row["ssgd"]["step_s"] / row["sgd"]["step_s"]
        row["naive_over_ssgd"] = row["ssgd-naive"]["step_s"] / row["ssgd"]["step_s"]
        rows.append(row)
    return {
        "note": "MODEL, not a measurement: ring all-reduce, calls x latency + 2(p-1)/p x bytes / bandwidth, "
        "(1 - overlap) of it exposed, fixed per-GPU batch (weak scaling); compute times measured here",
        "bandwidth_gbs": bandwidth_gbs,
        "latency_us": latency_us,
        "overlap": overlap,
        "grad_bytes": grad_bytes,
        "calls_per_allreduce": calls,
        "compute_s": {"sgd": compute["sgd"], "ssgd": compute["ssgd"]},
        "rows": rows,
    }
