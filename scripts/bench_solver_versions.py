#!/usr/bin/env python
"""Two versions of ``soft_beam`` side by side: ``sorted_soft_topk`` forward + backward at the pruned
beam-search sizes (batch 64, k in {4, 5, 10}, n = 2k^2, eps in {0.1, 0.01, 0.001}, float32),
interleaved in one process (old, new, old, new, ...), so that a busy machine slows both alike.

    git worktree add /tmp/base REV
    python scripts/bench_solver_versions.py --old /tmp/base/soft_beam [--new soft_beam] [--batches 4]

Prints, per cell, each version's median time (the median over --batches random batches of the
median over --reps repetitions) and the new/old ratio of every batch: a solver change that moves
one batch's iteration count shows there, apart from per-iteration overhead.
"""

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str, folder: Path):
    """The package in folder, imported under another name, so that two versions coexist."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def fwd_bwd_seconds(module, x, k, eps, grad) -> float:
    scores = x.clone().requires_grad_(True)
    start = time.perf_counter()
    # "warn": a solve that misses tol is part of the timing either way (newer versions raise by default)
    kwargs = {"on_failure": "warn"} if "on_failure" in module.sorted_soft_topk.__kwdefaults__ else {}
    module.sorted_soft_topk(scores, k, eps, **kwargs).backward(grad)
    return time.perf_counter() - start


def cell(versions, k, eps, batches, reps):
    """Per version the per-batch medians, for one (k, eps) cell."""
    n = 2 * k * k
    medians = {name: [] for name in versions}
    for seed in range(batches):
        torch.manual_seed(seed)
        x, grad = torch.randn(64, n), torch.randn(64, n, k)  # (B, n), (B, n, k)
        times = {name: [] for name in versions}
        for _ in range(reps + 3):  # the first 3 are warm-up
            for name, module in versions.items():
                times[name].append(fwd_bwd_seconds(module, x, k, eps, grad))
        for name in versions:
            medians[name].append(statistics.median(times[name][3:]))
    return medians


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="the baseline's soft_beam folder")
    p.add_argument("--new", type=Path, default=ROOT / "soft_beam", help="the new soft_beam folder (default: this checkout's)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--reps", type=int, default=13)
    args = p.parse_args(argv)
    for folder in (args.old, args.new):
        if not (folder / "__init__.py").is_file():
            p.error(f"{folder} is not a soft_beam package folder (no __init__.py)")
    torch.set_num_threads(1)  # as bench_soft_topk.py on CPU
    import warnings

    warnings.simplefilter("ignore", RuntimeWarning)
    versions = {"old": load("soft_beam_old", args.old), "new": load("soft_beam_new", args.new)}
    print(f"# old: {args.old}, new: {args.new}; batch 64, float32, fwd + bwd, torch threads 1")
    print("| k | n | eps | old ms | new ms | new/old per batch |")
    print("|---|---|---|---|---|---|")
    for k in (4, 5, 10):
        for eps in (0.1, 0.01, 0.001):
            m = cell(versions, k, eps, args.batches, args.reps)
            ratios = " ".join(f"{b / a:.2f}" for a, b in zip(m["old"], m["new"]))
            old_ms, new_ms = (statistics.median(m[v]) * 1e3 for v in ("old", "new"))
            print(f"| {k} | {2 * k * k} | {eps} | {old_ms:.2f} | {new_ms:.2f} | {ratios} |")


if __name__ == "__main__":
    main()
