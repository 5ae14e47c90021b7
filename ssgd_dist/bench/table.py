"""The report as text: the measured table, then the projection, each labelled for what it is."""

from __future__ import annotations

from typing import Any


def format_table(report: dict[str, Any]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (
        f"{report['model']}, {report['world_size']} x {report['device']} ({report['precision']}), global batch "
        f"{report['batch_size']}, median of {report['steps']} interleaved samples of {report['burst']} step(s), "
        f"torch {report['torch']}"
    )
    cols = [
        "variant",
        "step ms",
        "samples/s",
        "x sgd",
        "x ga2",
        "comm MB",
        "x comm",
        "x gather",
        "peak+",
        "peak+ga2",
        "held+",
        "noise %",
    ]
    rows = [cols]
    for r in report["results"]:
        rows.append(
            [
                r["variant"],
                num(r["step_time_s"] * 1e3, ".1f"),
                num(r["samples_per_s"], ".0f"),
                num(r["ratio_step_time"], ".3f"),
                num(r["ratio_step_time_ga2"], ".3f"),
                num(r["comm_bytes_per_step"] / 1e6, ".3f"),
                num(r["ratio_comm_bytes"], ".2f"),
                num(r["ratio_gathered_bytes"], ".2f"),
                num(r["extra_memory_params"], "+.2f"),
                num(r["extra_memory_params_ga2"], "+.2f"),
                num(r["extra_held_memory_params"], "+.2f"),
                num(100 * r["noise_fraction"], ".2f"),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [head, ""]
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(
        "peak+: peak memory of the step over sgd's (peak+ga2: over sgd-ga2's); held+: memory still held between "
        "steps over sgd's; all in parameter-size units. x gather: weights all-gathered per step over sgd's "
        "(FSDP). noise %: drawing noise, perturbing and restoring, as a share of the step"
    )
    for name, why in report.get("skipped", {}).items():
        lines.append(f"skipped {name}: {why}")
    if "projection" in report:
        lines += ["", format_projection(report["projection"])]
    return "\n".join(lines)


def format_projection(proj: dict[str, Any]) -> str:
    lines = [
        f"PROJECTION ({proj['note']})",
        f"bandwidth {proj['bandwidth_gbs']} GB/s, latency {proj['latency_us']} us per call x "
        f"{proj['calls_per_allreduce']} calls, overlap {proj['overlap']}, gradient {proj['grad_bytes'] / 1e6:.3f} MB; "
        f"compute: sgd {proj['compute_s']['sgd'] * 1e3:.1f} ms, ssgd {proj['compute_s']['ssgd'] * 1e3:.1f} ms",
        f"{'GPUs':>5}  {'sgd ms':>8} {'eff':>5}  {'ssgd ms':>8} {'eff':>5}  {'naive ms':>8} {'eff':>5}  "
        f"{'ssgd/sgd':>8}  {'naive/ssgd':>10}",
    ]
    for row in proj["rows"]:
        lines.append(
            f"{row['gpus']:>5}  {row['sgd']['step_s'] * 1e3:>8.1f} {row['sgd']['efficiency']:>5.2f}  "
            f"{row['ssgd']['step_s'] * 1e3:>8.1f} {row['ssgd']['efficiency']:>5.2f}  "
            f"{row['ssgd-naive']['step_s'] * 1e3:>8.1f} {row['ssgd-naive']['efficiency']:>5.2f}  "
            f"{row['ssgd_over_sgd']:>8.3f}  {row['naive_over_ssgd']:>10.3f}"
        )
    return "\n".join(lines)
