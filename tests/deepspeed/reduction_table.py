"""Measure gradient reductions per optimizer step on real DeepSpeed engines and print the table.

    python tests/deepspeed/reduction_table.py [OUT_DIR]

Launches 2 gloo ranks on CPU (torchrun, DS_ACCELERATOR=cpu) that train SGD and S-SGD for 4 steps on
every ZeRO stage (0 to 3), fp32 and bf16, with each stage's default sync mode and the alternative,
counting the reduce-type calls (all_reduce / reduce / reduce_scatter ...) of DeepSpeed's comm backend
made between the first forward and ``engine.step()``. The markdown goes to stdout (docs/deepspeed.md).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cases import reduction_cases, run_worker  # noqa: E402

ALL_STAGES = (0, 1, 2, 3)


def _cell(r: dict | None, key: str) -> str:
    if r is None or "error" in r:
        return "n/a"
    return "/".join(str(v) for v in sorted({s[key] for s in r["per_step"]}))


def table(results: dict[str, dict]) -> str:
    rows = [
        "| ZeRO | precision | sync mode | SGD | S-SGD `halves` | S-SGD `full` "
        "| bytes reduced per step: SGD, `halves` |",
        "|---|---|---|---|---|---|---|",
    ]
    for tag in ("", "-bf16"):
        for stage in ALL_STAGES:
            for suffix in ("", *{0: (), 1: ("-coalesce",), 2: ("-boundary",), 3: ("-boundary",)}[stage]):
                sgd, halves = results.get(f"z{stage}{tag}-sgd{suffix}"), results.get(f"z{stage}{tag}-halves{suffix}")
                full = results.get(f"z{stage}{tag}-full{suffix}")
                mode = f"`{sgd['sync']}`" + ("" if suffix else " (default)")
                rows.append(
                    f"| {stage} | {'bf16' if tag else 'fp32'} | {mode} | {_cell(sgd, 'grad_reductions')} | "
                    f"{_cell(halves, 'grad_reductions')} | {_cell(full, 'grad_reductions') if full else '-'} | "
                    f"{_cell(sgd, 'grad_reduction_bytes')}, {_cell(halves, 'grad_reduction_bytes')} |"
                )
    return "\n".join(rows)


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="ds-reductions-"))
    results, proc = run_worker(reduction_cases(ALL_STAGES), out)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
        return 1
    print(table({r["name"]: r for r in results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
