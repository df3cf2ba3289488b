#!/usr/bin/env python
"""Why the solver floors its logits at -80 before exp (soft_beam/ot.py, _LOG_FLOOR).

    python scripts/bench_exp_underflow.py

Times torch.exp on a float32 tensor of 3 x 64 x 11 x 200 equal values (the solver's candidate
evaluation at k = 10, n = 200) for values from -10 to -200, side by side in one run, on 1 thread.
On the CPUs measured, exp leaves its vectorised fast path for results under float32's smallest
normal number (about e^-87.3); the ratio column shows by how much.
"""

import time

import torch
from bench_common import machine_description


def median_ms(fn, reps=30):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[reps // 2]


def main():
    torch.set_num_threads(1)
    print(f"# {machine_description('cpu')}; CPU capability {torch.backends.cpu.get_cpu_capability()}")
    values = [-10.0, -50.0, -80.0, -87.0, -88.0, -95.0, -100.0, -104.0, -110.0, -200.0, -1000.0]
    tensors = {v: torch.full((3, 64, 11, 200), v) for v in values}
    times = {v: [] for v in values}
    for _ in range(3):  # rounds interleave the values, so that drift hits all alike
        for v in values:
            times[v].append(median_ms(lambda t=tensors[v]: t.exp()))
    base = min(sorted(times[-10.0]))
    print("| value | exp(value) | median ms | x at -10 |")
    print("|---|---|---|---|")
    for v in values:
        ms = sorted(times[v])[1]
        print(f"| {v:g} | {torch.tensor(v).exp().item():.3g} | {ms:.3f} | {ms / base:.1f} |")


if __name__ == "__main__":
    main()
