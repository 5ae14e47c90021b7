"""Named mutation testing over the core: does each deliberate bug make the fast tests fail?

    python tools/mutate.py            # every mutation (a few minutes on 2 cores)
    python tools/mutate.py --list     # names, files and tests only
    python tools/mutate.py paired-odd-ranks-at-w-plus-n alpha-ignores-schedule   # some of them

Each mutation is one exact snippet of one file and its replacement, plus the test files (or node ids)
expected to catch it. For each: the snippet is replaced, ``pytest -x -q`` runs those tests, and the file
is put back in a ``finally`` (also on Ctrl-C or SIGTERM). A mutation is *killed* when the tests fail and
*survives* when they pass. A snippet not found exactly once, or whose replacement would not be unique
in the mutated file (it could not be undone safely), is reported as *stale* before anything is written
(the code moved on: update the snippet) and counts as neither. The exit status is 0 only if every mutation was killed.

Restoring swaps the replacement back for the original rather than rewriting the whole file, so that an
edit someone else made to another part of the file meanwhile is kept. Docs: docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once
    replacement: str
    tests: tuple[str, ...]  # test files or node ids, run with pytest -x -q
    bug: str  # what a user would get

    def path(self) -> Path:
        return REPO / self.file


NOISE, METHODS, WRAPPER = "tests/test_noise.py", "tests/test_methods.py", "tests/test_optim_wrapper.py"
BASELINES, INTEGRITY = "tests/test_methods_baselines.py", "tests/test_checkpoint_integrity.py"
RELIABILITY = "tests/test_reliability.py"
COMM = "tests/test_distributed.py::test_ssgd_all_reduces_exactly_as_many_bytes_per_step_as_sgd"
EVALUATE = "tests/test_distributed.py::test_test_metrics_cover_the_whole_test_set_on_several_ranks"
DEEPSPEED_REDUCTIONS = "tests/deepspeed/test_deepspeed.py::test_ssgd_reduces_gradients_as_often_as_sgd"
FSDP = "tests/test_fsdp.py"
SHARDED = "tests/test_sharded_checkpoint.py"

MUTATIONS = (
    # -- sharded parameters (FSDP2) ----------------------------------------------------------------------
    Mutation(
        "shard-rows-from-zero",
        "ssgd_dist/noise.py",
        "start = min(rank * -(-rows // world), rows)",
        "start = 0",
        (FSDP,),
        "every rank perturbs its shard with the first rows' noise: a sharded run is another algorithm",
    ),
    Mutation(
        "layer-rms-of-the-shard-only",
        "ssgd_dist/noise.py",
        "dist.all_reduce(squares, group=targets[split[0][0]].group)",
        "squares.mul_(1)  # mutation: no all-reduce",
        (FSDP,),
        "layer_rms noise scaled by one shard's weights: smaller noise the more ranks a run has",
    ),
    Mutation(
        "fsdp-reduces-every-pass",
        "ssgd_dist/backends/fsdp.py",
        "self.model.set_requires_gradient_sync(last)",
        "self.model.set_requires_gradient_sync(last or True)",
        (FSDP,),
        "under FSDP2 every pass reduce-scatters: twice the gradient traffic of SGD",
    ),
    # -- the six gaps of issue 20 -----------------------------------------------------------------------
    Mutation(
        "paired-odd-ranks-at-w-plus-n",
        "ssgd_dist/methods.py",
        "sign=1.0 if self.rank % 2 == 0 else -1.0",
        "sign=1.0",
        (METHODS,),
        "ssgd.batch_split=paired evaluates every rank at w+n: it is GNI with Rademacher noise, not S-SGD",
    ),
    Mutation(
        "alpha-ignores-schedule",
        "ssgd_dist/methods.py",
        "return alpha_at(n.alpha, n.schedule, n.schedule_fraction, step, self.total_steps)",
        "return n.alpha",
        (METHODS,),
        "noise.schedule warmup/cosine silently trains with constant noise",
    ),
    Mutation(
        "wrapper-ten-times-alpha",
        "ssgd_dist/optim.py",
        "draw_noise(params, self.distribution, self.scale, self.alpha, gen)",
        "draw_noise(params, self.distribution, self.scale, self.alpha * 10, gen)",
        (WRAPPER,),
        "SymmetricNoiseOptimizer perturbs ten times more than asked",
    ),
    Mutation(
        "evaluate-without-all-reduce",
        "ssgd_dist/train.py",
        "        distributed.all_reduce_sum(totals)\n",
        "        pass  # mutation: each rank reports its own shard\n",
        (EVALUATE,),
        "test_loss/test_acc of a multi-rank run describe rank 0's half of the test set only",
    ),
    Mutation(
        "noise-from-the-global-rng",
        "ssgd_dist/noise.py",
        "    gen = torch.Generator(device=device)\n"
        "    gen.manual_seed(seed_of_step if sample == 0 else step_seed(seed_of_step, sample))\n"
        "    return gen\n",
        "    return torch.default_generator  # mutation\n",
        (NOISE,),
        "the noise of a step depends on whatever consumed the global RNG before (ranks, resumes differ)",
    ),
    Mutation(
        "checkpoint-checksum-skipped",
        "ssgd_dist/checkpoint.py",
        "if expected_sha is not None and checksum_of(path) != expected_sha:",
        "if False:  # mutation",
        (INTEGRITY,),
        "a checkpoint with a flipped bit inside a tensor is resumed from silently",
    ),
    # -- noise ------------------------------------------------------------------------------------------
    Mutation(
        "noise-reseeds-the-global-rng",
        "ssgd_dist/noise.py",
        "    gen = torch.Generator(device=device)\n"
        "    gen.manual_seed(seed_of_step if sample == 0 else step_seed(seed_of_step, sample))\n"
        "    return gen\n",
        "    return torch.manual_seed(seed_of_step if sample == 0 else step_seed(seed_of_step, sample))  # mutation\n",
        (METHODS,),
        "right noise, but drawing it resets the global RNG (dropout, user code) at every step",
    ),
    Mutation(
        "rademacher-zero-or-one",
        "ssgd_dist/noise.py",
        "torch._foreach_mul_(ts, 2.0)",
        "torch._foreach_mul_(ts, 1.0)",
        (NOISE,),
        "xi in {-1, 0} instead of {-1, +1}: biased noise of the wrong magnitude",
    ),
    Mutation(
        "layer-rms-divides-by-numel",
        "ssgd_dist/noise.py",
        "alpha / math.sqrt(max(1, w.numel()))",
        "alpha / max(1, w.numel())",
        (NOISE,),
        "layer_rms scale is ||w|| / numel instead of the RMS: noise far too small on big layers",
    ),
    Mutation(
        "filter-norm-ignores-alpha",
        "ssgd_dist/noise.py",
        "return [noise_scale(w, rule) * alpha for w in ws]",
        "return [noise_scale(w, rule) for w in ws]",
        (NOISE,),
        "noise.scale=filter_norm perturbs by the filter RMS whatever noise.alpha says",
    ),
    Mutation(
        "uniform-on-minus-one-one",
        "ssgd_dist/noise.py",
        "t.uniform_(-_SQRT3, _SQRT3, generator=gen)",
        "t.uniform_(-1.0, 1.0, generator=gen)",
        (NOISE,),
        "uniform noise (SmoothOut) with variance 1/3 instead of 1",
    ),
    Mutation(
        "targets-include-biases",
        "ssgd_dist/noise.py",
        "return [p for p in params if len(whole_shape(p)) >= 2]",
        "return [p for p in params if len(whole_shape(p)) >= 1]",
        (NOISE,),
        "noise.targets=weights also perturbs biases and BatchNorm parameters",
    ),
    Mutation(
        "reflect-does-nothing",
        "ssgd_dist/noise.py",
        "            torch._foreach_mul_(local, -1.0)\n"
        "            torch._foreach_add_(local, self._backup, alpha=2.0)\n",
        "            pass  # mutation\n",
        (NOISE, METHODS),
        "both passes at w+n: one-point noise, not symmetric",
    ),
    Mutation(
        "restore-by-subtraction",
        "ssgd_dist/noise.py",
        "            torch._foreach_copy_(self._locals(), self._backup)\n",
        "            local = self._locals()\n"
        "            torch._foreach_add_(local, torch._foreach_sub(self._backup, local))  # mutation\n",
        (NOISE,),
        "w comes back to rounding, not bit for bit (bf16/fp16 weights drift every step)",
    ),
    Mutation(
        "regenerate-reflects-halfway",
        "ssgd_dist/noise.py",
        "self._add_drawn(-2.0 * self._sign)",
        "self._add_drawn(-1.0 * self._sign)",
        (NOISE,),
        "noise.restore=regenerate: the second pass runs at w, not at w - n",
    ),
    Mutation(
        "sphere-not-normalised",
        "ssgd_dist/noise.py",
        'if distribution == "sphere":',
        "if False:  # mutation",
        (NOISE,),
        "sphere noise is Gaussian: its norm is not fixed",
    ),
    Mutation(
        "warmup-off-by-one",
        "ssgd_dist/noise.py",
        "return alpha * min(1.0, (step + 1) / warm)",
        "return alpha * min(1.0, step / warm)",
        (NOISE,),
        "noise warm-up starts at zero noise and reaches alpha one step late",
    ),
    Mutation(
        "step-seed-changed",
        "ssgd_dist/seeding.py",
        "(seed * 0x9E3779B97F4A7C15 + step + 1)",
        "(seed * 0x9E3779B97F4A7C15 + step)",
        (NOISE,),
        "every noise stream and data order changes: no published result can be reproduced",
    ),
    # -- methods ----------------------------------------------------------------------------------------
    Mutation(
        "halves-uses-one-half-twice",
        "ssgd_dist/methods.py",
        'return [Pass("even", 0.5), Pass("odd", 0.5)]',
        'return [Pass("even", 0.5), Pass("even", 0.5)]',
        (METHODS,),
        "half of every batch is never trained on",
    ),
    Mutation(
        "full-updates-batchnorm-twice",
        "ssgd_dist/methods.py",
        'Pass("all", 0.5), Pass("all", 0.5, update_bn=False)]',
        'Pass("all", 0.5), Pass("all", 0.5)]',
        (METHODS,),
        "ssgd.batch_split=full counts every sample twice in the BatchNorm running statistics",
    ),
    Mutation(
        "gni-draws-uniform-noise",
        "ssgd_dist/methods.py",
        'name = "gni"\n    distribution = "gaussian"',
        'name = "gni"\n    distribution = "uniform"',
        (METHODS,),
        "the GNI baseline is SmoothOut",
    ),
    Mutation(
        "sam-ignores-rho",
        "ssgd_dist/methods.py",
        "scale = self.cfg.sam.rho / (norm + 1e-12)",
        "scale = 0.05 / (norm + 1e-12)",
        (METHODS, BASELINES),
        "sam.rho has no effect (always the default 0.05)",
    ),
    Mutation(
        "sam-keeps-the-first-gradient",
        "ssgd_dist/methods.py",
        "            p.grad = None  # the first pass only chose the direction; the step uses the second gradient\n",
        "            pass  # mutation\n",
        (METHODS, BASELINES),
        "SAM steps with g(w) + g(w + e) instead of g(w + e)",
    ),
    # -- backends ---------------------------------------------------------------------------------------
    Mutation(
        "loss-weight-ignored",
        "ssgd_dist/backends/base.py",
        "self.backward(loss * (p.loss_weight / k))",
        "self.backward(loss / k)",
        (METHODS,),
        "S-SGD steps with g(w+n) + g(w-n), twice the gradient",
    ),
    Mutation(
        "no-restore-before-the-step",
        "ssgd_dist/backends/base.py",
        "            method.restore()  # weight decay, momentum and the LR act on w, never on w +- n\n",
        "            pass  # mutation\n",
        (METHODS,),
        "the optimizer steps from w - n and the weights keep the noise",
    ),
    Mutation(
        "clipping-ignored",
        "ssgd_dist/backends/base.py",
        "norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)",
        "norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # mutation: no clipping",
        (METHODS,),
        "optim.clip_grad_norm has no effect",
    ),
    Mutation(
        "gradients-never-zeroed",
        "ssgd_dist/backends/base.py",
        "        self.zero_grad()\n        return StepResult(",
        "        return StepResult(",
        (METHODS,),
        "every step adds the gradients of all steps before it",
    ),
    Mutation(
        "ddp-syncs-every-pass",
        "ssgd_dist/backends/ddp.py",
        "return contextlib.nullcontext() if last else self.ddp.no_sync()",
        "return contextlib.nullcontext()",
        (COMM,),
        "S-SGD all-reduces twice per step: twice SGD's gradient traffic",
    ),
    Mutation(
        "ddp-never-syncs",
        "ssgd_dist/backends/ddp.py",
        "return contextlib.nullcontext() if last else self.ddp.no_sync()",
        "return self.ddp.no_sync()",
        (COMM,),
        "no all-reduce at all: every rank trains its own model",
    ),
    Mutation(
        "deepspeed-zero2-without-coalescing",
        "ssgd_dist/backends/deepspeed.py",
        'return "coalesce" if zero_stage >= 2 else "boundary"',
        'return "boundary"',
        (DEEPSPEED_REDUCTIONS,),
        "S-SGD under ZeRO 2 reduces gradients twice per step (the slowest check here: one 2-rank DeepSpeed launch)",
    ),
    # -- checkpoint -------------------------------------------------------------------------------------
    Mutation(
        "checkpoint-loads-pickled-code",
        "ssgd_dist/checkpoint.py",
        "return torch.load(path, map_location=map_location, weights_only=True)",
        "return torch.load(path, map_location=map_location, weights_only=False)",
        (f"{RELIABILITY}::test_a_checkpoint_carrying_pickled_code_is_refused_without_running_it",),
        "a checkpoint file can run arbitrary code when resumed from",
    ),
    Mutation(
        "checkpoint-last-without-checksum",
        "ssgd_dist/checkpoint.py",
        "_record(ckpt_dir, path, digest, num_to_keep, {LAST: digest})",
        "_record(ckpt_dir, path, digest, num_to_keep)",
        (INTEGRITY,),
        "last.pt is not in the manifest: a damaged last.pt is only caught if it fails to load",
    ),
    Mutation(
        "sharded-metadata-unpickled-freely",
        "ssgd_dist/backends/dcp.py",
        "        if not allowed:\n",
        "        if False:\n",
        (f"{SHARDED}::test_metadata_that_carries_pickled_code_is_refused_without_running_it",),
        "a sharded checkpoint's .metadata can run arbitrary code when resumed from",
    ),
    Mutation(
        "sharded-checksum-of-names-only",
        "ssgd_dist/checkpoint.py",
        "as_posix()}\\0{sha256_of(file)}",
        "as_posix()}",
        (f"{SHARDED}::test_a_damaged_directory_fails_its_checksum_and_the_older_one_is_used",),
        "a truncated shard passes the directory's checksum",
    ),
    Mutation(
        "checkpoint-oldest-first",
        "ssgd_dist/checkpoint.py",
        "key=step_of, reverse=True",
        "key=step_of, reverse=False",
        (f"{RELIABILITY}::test_retention_keeps_the_newest_and_last_points_at_the_newest",),
        "a restarted run resumes from its oldest kept checkpoint",
    ),
    Mutation(
        "checkpoint-keeps-one-fewer",
        "ssgd_dist/checkpoint.py",
        "max(1, num_to_keep)",
        "max(1, num_to_keep - 1)",
        (f"{RELIABILITY}::test_retention_keeps_the_newest_and_last_points_at_the_newest",),
        "train.keep_checkpoints=2 keeps one: no older checkpoint to fall back to",
    ),
)


class Interrupted(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


def problem(m: Mutation) -> str | None:
    """Why ``m`` cannot be applied and undone safely (None: it can), checked before anything is written."""
    text = m.path().read_text()
    if text.count(m.original) != 1:
        return f"{m.original!r} is in {m.file} {text.count(m.original)} times, not once; update the snippet"
    if text.replace(m.original, m.replacement, 1).count(m.replacement) != 1:
        return f"the replacement {m.replacement!r} would not be unique in {m.file}; add context to the snippet"
    return None


def apply(m: Mutation) -> None:
    text = m.path().read_text()
    if problem(m):
        raise SystemExit(f"mutate: {m.name}: {problem(m)}")
    m.path().write_text(text.replace(m.original, m.replacement, 1))


def restore(m: Mutation) -> None:
    """Swap the replacement back; refuses (loudly) to guess if it is no longer there exactly once."""
    text = m.path().read_text()
    if text.count(m.replacement) != 1 or text.count(m.original) != 0:
        raise SystemExit(
            f"mutate: cannot restore {m.file} for {m.name}: the replacement {m.replacement!r} is there "
            f"{text.count(m.replacement)} times; put back {m.original!r} by hand"
        )
    m.path().write_text(text.replace(m.replacement, m.original, 1))


def run_tests(tests: tuple[str, ...], timeout: int) -> tuple[str, float, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, ""
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    status = {0: "passed", 1: "failed"}.get(proc.returncode, f"error (pytest exit {proc.returncode})")
    return status, time.perf_counter() - start, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only these mutations (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per mutation's test run (default 300)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of every test set")
    args = parser.parse_args(argv)

    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(unknown)}; --list shows them")
    chosen = [by_name[n] for n in args.names] if args.names else list(MUTATIONS)
    if args.list:
        for m in chosen:
            print(f"{m.name:32} {m.file:28} {' '.join(m.tests)}\n{'':32} bug: {m.bug}")
        return 0

    signal.signal(signal.SIGTERM, _on_sigterm)
    stale = [m for m in chosen if problem(m)]
    for m in stale:
        print(f"STALE     {m.name}: {problem(m)}")
    chosen = [m for m in chosen if m not in stale]

    if not args.no_baseline:  # a mutation is only killed by tests that pass without it
        for tests in dict.fromkeys(m.tests for m in chosen):
            status, seconds, tail = run_tests(tests, args.timeout)
            if status != "passed":
                print(f"baseline  {' '.join(tests)}: {status} ({tail}); fix the tests first")
                return 2
            print(f"baseline  passed in {seconds:5.1f} s: {' '.join(tests)}")

    results = []
    started = time.perf_counter()
    for m in chosen:
        apply(m)
        try:
            status, seconds, tail = run_tests(m.tests, args.timeout)
        except (KeyboardInterrupt, Interrupted):
            print(f"\ninterrupted during {m.name}; {m.file} restored")
            raise
        finally:
            restore(m)
        killed = status != "passed"
        results.append((m, killed))
        print(f"{'killed' if killed else 'SURVIVED':9} {m.name:32} {seconds:5.1f} s  {status}: {tail}", flush=True)

    killed = sum(k for _, k in results)
    print(f"\nmutation score: {killed}/{len(results)} killed in {time.perf_counter() - started:.0f} s", end="")
    print(f", {len(stale)} stale" if stale else "")
    for m, k in results:
        if not k:
            print(f"  survived: {m.name} ({m.file}): {m.bug}")
    return 0 if killed == len(results) and not stale else 1


if __name__ == "__main__":
    sys.exit(main())
