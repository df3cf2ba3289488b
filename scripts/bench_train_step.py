#!/usr/bin/env python
"""Benchmark: an MLE training step against a soft_beam training step, and our generator
against fairseq's, on the same real batches and the same model, measured side by side; or, with
``--grad-stats``, the gradient each soft_beam step hands the optimizer, at each span floor.

    python scripts/bench_train_step.py --data runs/multi30k-de          # prepared by
    data_prep/prepare-multi30k.sh; add --checkpoint to time a trained model's search
    python scripts/bench_train_step.py --data runs/multi30k-de --checkpoint ckpt.pt --grad-stats \\
        --min-spans 0,0.1,0.5,1 --clip-norm 1.0 --batches 50

Each repetition runs every method once on the same batch, in turn, so a noisy machine slows
all of them alike; the table reports medians and ratios to the MLE step (or to stock fairseq
generation). Memory on CPU is the bytes autograd saves for backward (activations), which is
what grows with the search, counted in the warm-up repetition only (the counting hook is Python
code run for every saved tensor); on CUDA it is torch.cuda.max_memory_allocated. The ratios depend on
torch's thread count (printed): the MLE step is mostly large matrix products, which use every
thread, and the search mostly small ops, which do not.

The arithmetic floor: a separate, untimed pass runs each method's forward and backward on each batch
(same seed, so the same dropout and the same searched sentences) under
``torch.utils.flop_counter.FlopCounterMode``. It counts only matrix products, convolutions and
attention kernels (mm, addmm, bmm, baddbmm, einsum through bmm, conv, scaled-dot-product attention),
not elementwise ops, reductions, softmax, sorting/top-k or the solver's small linear solves. The
table prints each step's GFLOP (median over the batches), the FLOP ratio to the MLE step, and
time ratio / FLOP ratio: the step's overhead over its matmul arithmetic. Since the search's
uncounted work is a larger share of it than of the MLE step, that quotient is an upper bound on
the per-op overhead that could be cut; near 1, only fewer rows or a faster device make the step
cheaper. GFLOP/s is median GFLOP / median seconds.

``--precisions fp32,bf16``: one table per precision. bf16 is what fairseq's ``--bf16`` does to the
model and criterion (``.to(torch.bfloat16)``, on any device, no autocast; fairseq 0.12 refuses
``--bf16`` on a CPU only because it implies ``--tpu``): the model's weights, activations and
gradients are bfloat16, and the soft top-k still solves in float32. On a CPU bf16 may well be
slower than fp32; that is a figure, not an error. Generation runs in fp32.

``--grad-stats`` (no timing): on a trained ``--checkpoint`` and ``--batches`` real training batches,
the MLE step and the soft_beam criterion at each ``--min-spans`` floor (``--soft-beam-min-span``,
nats) run forward and backward, with no optimizer step, each batch with the same seed for every
floor. Per floor: the gradient norm of the summed loss (median, p90, max); per target token, the
norm fairseq's ``--clip-norm`` compares (it divides the summed gradient by the sample size, the
target tokens, first; median, max); the share of steps on which clipping at ``--clip-norm``
fires and the median factor it scales those steps' gradients by; the loss and beam loss per
token (nats, median); and the soft top-k rows that missed the solver's tolerance (total). The MLE
step is the first row, for reference; the JSON also keeps each step's norm and sample size.
"""

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch
from bench_common import SavedBytes, machine_description, model_args, sync

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fairseq import checkpoint_utils, options, tasks  # noqa: E402
from fairseq.tasks.translation import TranslationTask  # noqa: E402

import fairseq_plugins  # noqa: E402,F401  (registers the task and criterion, compat fixes)
from soft_beam.losses import BEAM_LOSSES  # noqa: E402

MODEL_ARGS = model_args("small", dropout=0.1)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_cfg(data_bin: Path, beam: int, beam_loss: str, device: str, state_grad: str = "values", fraction: float = 1.0, min_span=0.0):
    """fairseq's training config for the plugin's task and the soft_beam criterion with these settings."""
    argv = [str(data_bin), "--user-dir", str(ROOT / "fairseq_plugins"), "--task", "translation_soft_beam",
            "--criterion", "soft_beam", "--label-smoothing", "0.1", "--beam-loss", beam_loss,
            "--soft-beam-size", str(beam), "--soft-beam-state-grad", state_grad,
            # '=': a negative floor must reach the criterion's check, not look like an option to argparse
            f"--soft-beam-min-span={float(min_span)!r}",
            "--search-fraction", str(fraction), *MODEL_ARGS]  # fmt: skip
    if device == "cpu":
        argv.append("--cpu")
    return options.parse_args_and_arch(options.get_training_parser(), argv)


def load_model(task, cfg, checkpoint, device: str):
    if checkpoint:
        model = checkpoint_utils.load_model_ensemble([str(checkpoint)], task=task)[0][0]
    else:
        torch.manual_seed(0)
        model = task.build_model(cfg)
    return model.to(device)


def mle_criterion(task, cfg):
    return task.build_criterion(Namespace(**{**vars(cfg), "criterion": "label_smoothed_cross_entropy"}))


def setup(
    data_bin: Path, checkpoint, beam: int, beam_loss: str, device: str, state_grad: str = "values", fraction: float = 1.0, min_span=0.0
):
    """cfg, task, model, the MLE criterion and the soft_beam criterion, for one setting."""
    cfg = parse_cfg(data_bin, beam, beam_loss, device, state_grad, fraction, min_span)
    task = tasks.setup_task(cfg)
    return cfg, task, load_model(task, cfg, checkpoint, device), mle_criterion(task, cfg), task.build_criterion(cfg)


def build_grid(args, data_bin: Path):
    """The task, the model (loaded once) and the criteria: {"mle": ..., name: soft_beam criterion} for every
    beam, state-grad mode, search fraction and span floor. The soft_beam criteria are built, and so their
    options validated, by the plugin itself; a bad setting raises its ValueError, prefixed with the method."""
    keys = [(b, sg, f, ms) for b in args.beams for sg in args.state_grads for f in args.search_fractions for ms in args.min_spans]
    names = method_names(keys)
    cfgs = {key: parse_cfg(data_bin, key[0], args.beam_loss, args.device, *key[1:]) for key in keys}
    task = tasks.setup_task(cfgs[keys[0]])
    methods = {"mle": mle_criterion(task, cfgs[keys[0]])}
    for key in keys:
        try:
            methods[names[key]] = task.build_criterion(cfgs[key])
        except ValueError as e:
            raise ValueError(f"{names[key]}: {e}") from None
    return task, load_model(task, cfgs[keys[0]], args.checkpoint, args.device), methods


def method_names(keys) -> dict:
    """{(beam, state_grad, fraction, min_span): 'soft_beam k=B (the settings that vary between keys)'}."""
    varies = [len({key[i] for key in keys}) > 1 for i in range(1, 4)]
    names = {}
    for b, sg, f, ms in keys:
        labels = [label for label, vary in zip((sg, f"fraction {f:g}", f"min span {ms:g}"), varies) if vary]
        names[b, sg, f, ms] = f"soft_beam k={b}" + (f" ({', '.join(labels)})" if labels else "")
    return names


def at_precision(model, criteria, precision: str):
    """The model (a copy unless fp32) and criteria in ``precision``, as fairseq's trainer casts them under --bf16."""
    dtype = PRECISIONS[precision]
    for criterion in criteria:
        criterion.to(dtype=dtype)
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype=dtype)


def grad_norm(model) -> float:
    """The L2 norm of all parameters' gradients, accumulated in float32 (as fairseq's clip_grad_norm_)."""
    grads = [p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).sum().sqrt())


def timed_step(model, criterion, sample, device, count_saved=False, seed=0):
    """One forward and backward. On CPU, ``count_saved`` runs it under :class:`SavedBytes`, whose
    Python hook fires for every tensor saved for backward, far more often in the many-small-op
    search than in the MLE step; the timed repetitions run without it. ``seed`` fixes dropout and
    the ``--search-fraction`` draw, so that every repetition of a batch searches the same sentences."""
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    saved = SavedBytes() if count_saved and device != "cuda" else contextlib.nullcontext()
    start = time.perf_counter()
    with saved:
        loss, sample_size, log = criterion(model, sample)
    loss.backward()
    sync(device)
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() if device == "cuda" else (saved.bytes if count_saved else None)
    # what --clip-norm sees: fairseq divides the gradient by the sample size (target tokens)
    log["grad_norm"] = grad_norm(model) / float(sample_size)
    return seconds, memory, log


def counted_flops(model, criterion, sample, seed=0) -> int:
    """The FLOPs of one forward and backward as FlopCounterMode counts them (matrix products, convolutions,
    attention), in an untimed pass: the counter intercepts every op. ``seed`` as in :func:`timed_step`."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = criterion(model, sample)
        loss.backward()
    return counter.get_total_flops()


def gradient_step(model, criterion, sample, seed=0):
    """One forward and backward, no optimizer step: (gradient norm of the summed loss, sample size, log)."""
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    loss, sample_size, log = criterion(model, sample)
    loss.backward()
    return grad_norm(model), float(sample_size), log


def timed_generate(task, generator, model, sample, device):
    sync(device)
    start = time.perf_counter()
    hyps = task.inference_step(generator, [model], sample)
    sync(device)
    return time.perf_counter() - start, hyps


def move(sample, device):
    from fairseq import utils

    return utils.move_to_cuda(sample) if device == "cuda" else sample


def percentile(values, q: float) -> float:
    """The q-quantile (0 <= q <= 1) of values, linearly interpolated between order statistics."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a folder prepared by data_prep/prepare-multi30k.sh")
    p.add_argument("--checkpoint", type=Path, help="time this model (default: a fresh random transformer)")
    p.add_argument("--beams", default="4,5")
    p.add_argument("--beam-loss", default="hamming", choices=sorted(BEAM_LOSSES))
    p.add_argument("--state-grads", default="values", help="comma-separated --soft-beam-state-grad modes to time (values, full)")
    p.add_argument("--search-fractions", default="1", help="comma-separated --search-fraction values to time")
    p.add_argument("--min-spans", default="0", help="comma-separated span floors, each the criterion's --soft-beam-min-span (nats)")
    p.add_argument("--precisions", default="fp32", help=f"comma-separated: {', '.join(PRECISIONS)}; one table each")
    p.add_argument("--max-tokens", default="2048", help="batch size in tokens; comma-separated: one table each")
    p.add_argument("--batches", type=int, default=4, help="distinct training batches")
    p.add_argument("--reps", type=int, default=3, help="repetitions over the batches")
    p.add_argument("--gen-beam", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="profile one soft_beam step (torch.profiler)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--parts", default="train,generate", help="which tables: train, generate or both")
    p.add_argument("--gen-sentences", type=int, default=0, help="decode only the first N test sentences (0: all)")
    p.add_argument("--grad-stats", action="store_true", help="gradient statistics per --min-spans floor instead of timing")
    p.add_argument("--clip-norm", type=float, default=1.0, help="with --grad-stats: the --clip-norm whose firing is counted")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)
    for option, kind in (("--beams", int), ("--state-grads", str), ("--search-fractions", float), ("--min-spans", float),
                         ("--precisions", str), ("--max-tokens", int)):  # fmt: skip
        dest = option[2:].replace("-", "_")
        try:
            setattr(args, dest, [kind(x.strip()) for x in getattr(args, dest).split(",") if x.strip()])
        except ValueError:
            p.error(f"{option} {getattr(args, dest)!r}: not a comma-separated list of {kind.__name__} values")
        if not getattr(args, dest):
            p.error(f"{option}: empty list")
    if set(args.precisions) - set(PRECISIONS):
        p.error(f"--precisions: unknown {', '.join(sorted(set(args.precisions) - set(PRECISIONS)))}; one of {', '.join(PRECISIONS)}")
    if args.batches < 1 or args.reps < 1:
        p.error("--batches and --reps must be at least 1")
    if args.grad_stats and not args.checkpoint:
        p.error("--grad-stats needs --checkpoint: a random model's gradients say nothing about training")
    if not (math.isfinite(args.clip_norm) and args.clip_norm > 0):
        p.error(f"--clip-norm must be a finite number > 0, got {args.clip_norm}")
    return args


def main(argv=None):
    args = parse_args(argv)
    data_bin = args.data / "data-bin" if (args.data / "data-bin").is_dir() else args.data
    if not (data_bin / "dict.en.txt").exists() and not list(data_bin.glob("dict.*.txt")):
        sys.exit(f"bench_train_step.py: error: no fairseq data-bin at {data_bin} (run data_prep/prepare-multi30k.sh)")
    machine = machine_description(args.device)
    print(f"# machine: {machine}")
    print(
        f"# model: checkpoint {args.checkpoint} (its own architecture)"
        if args.checkpoint
        else f"# model: {' '.join(MODEL_ARGS)}; random init"
    )
    try:
        task, model, methods = build_grid(args, data_bin)
    except ValueError as e:
        sys.exit(f"bench_train_step.py: error: {e}")
    results = {"machine": machine, "device": args.device, "train": {}, "generate": {}}
    parts = set(args.parts.split(","))
    if args.grad_stats or "train" in parts:
        task.load_dataset("train")
        samples = {mt: train_samples(args, task, mt) for mt in args.max_tokens}
        for precision in args.precisions:
            mdl = at_precision(model, methods.values(), precision)
            for max_tokens in args.max_tokens:
                table = grad_stats_table if args.grad_stats else train_table
                table(args, precision, max_tokens, samples[max_tokens], mdl, methods, results)
        at_precision(model, methods.values(), "fp32")
    if "generate" in parts and not args.grad_stats:
        generate_table(args, task, model, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def train_samples(args, task, max_tokens: int) -> list:
    # fairseq caches one iterator per dataset: without disabling that, every batch size after the
    # first silently got the first one's batches
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=max_tokens, seed=1, disable_iterator_cache=True)
    return [move(s, args.device) for _, s in zip(range(args.batches), itr.next_epoch_itr(shuffle=True))]


def measure(args, samples, model, methods):
    """Times (repetitions after the warm-up), saved bytes, logs and counted FLOPs, per method."""
    times, memory, logs, flops = ({m: [] for m in methods} for _ in range(4))
    for rep in range(args.reps + 1):  # rep 0 warms up and, on CPU, counts the saved bytes
        for i, sample in enumerate(samples):
            for name, crit in methods.items():
                seconds, mem, log = timed_step(model, crit, sample, args.device, count_saved=rep == 0, seed=i)
                if mem is not None:
                    memory[name].append(mem)
                if rep:
                    times[name].append(seconds)
                    logs[name].append(log)
    for i, sample in enumerate(samples):  # untimed: the counter slows every op
        for name, crit in methods.items():
            flops[name].append(counted_flops(model, crit, sample, seed=i))
    return times, memory, logs, flops


def train_rows(times, memory, logs, flops) -> dict:
    """One row of figures per method; ratios to the "mle" row; time_over_flop_ratio = ratio / flop_ratio."""
    base_t, base_m, base_f = (statistics.median(d["mle"]) for d in (times, memory, flops))
    rows = {}
    for name in times:
        t, m, f = statistics.median(times[name]), statistics.median(memory[name]), statistics.median(flops[name])
        ratio, flop_ratio = t / base_t, f / base_f
        rows[name] = {
            "median_s": t, "ratio": ratio, "memory_bytes": m, "memory_ratio": m / base_m,
            "grad_norm": statistics.median(lg["grad_norm"] for lg in logs[name]),
            "gflop": f / 1e9, "flop_ratio": flop_ratio, "time_over_flop_ratio": ratio / flop_ratio, "gflop_per_s": f / 1e9 / t,
        }  # fmt: skip
        if name != "mle":
            rows[name]["search_steps"] = statistics.mean(lg["search_steps"] for lg in logs[name])
            rows[name]["solver_iters"] = statistics.mean(lg["solver_iters"] / max(lg["solver_calls"], 1) for lg in logs[name])
    return rows


def train_table(args, precision, max_tokens, samples, model, methods, results):
    rows = train_rows(*measure(args, samples, model, methods))
    results["train"].setdefault(precision, {})[str(max_tokens)] = rows
    ntok = statistics.mean(s["ntokens"] for s in samples)
    nsent = statistics.mean(s["nsentences"] for s in samples)
    print(f"\n## Training step, {precision} ({len(samples)} batches of ~{nsent:.0f} sentences / {ntok:.0f} target tokens, "
          f"{args.reps} reps, beam loss {args.beam_loss})\n")  # fmt: skip
    print("| step | median s | x MLE | GFLOP | FLOP x MLE | time x / FLOP x | GFLOP/s "
          "| saved for backward (MB) | x MLE | search steps | solver iters | grad norm / token |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        steps, iters = (f"{r[k]:.1f}" if k in r else "-" for k in ("search_steps", "solver_iters"))
        print(f"| {name} | {r['median_s']:.3f} | {r['ratio']:.2f} | {r['gflop']:.4g} | {r['flop_ratio']:.2f} "
              f"| {r['time_over_flop_ratio']:.2f} | {r['gflop_per_s']:.3g} | {r['memory_bytes'] / 2**20:.1f} "
              f"| {r['memory_ratio']:.1f} | {steps} | {iters} | {r['grad_norm']:.3g} |")  # fmt: skip
    if args.profile:  # where the time of a soft_beam step goes
        from torch.profiler import ProfilerActivity, profile

        name = next(n for n in methods if n != "mle")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            timed_step(model, methods[name], samples[0], args.device)
        print(f"\n## Profile of one {name} step (top 15 by self time)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def grad_stats_row(steps, clip_norm: float, min_span) -> dict:
    """Figures over steps, a list of (gradient norm, sample size, log) from :func:`gradient_step`."""
    norms = [norm for norm, _, _ in steps]
    per_token = [norm / size for norm, size, _ in steps]
    # fairseq's clip_grad_norm_ scales by clip_norm / norm where the per-token norm exceeds clip_norm
    factors = [clip_norm / g for g in per_token if g > clip_norm]
    beam = [float(log["beam_loss"]) / size for _, size, log in steps if "beam_loss" in log]
    return {
        "min_span": min_span,
        "steps": len(steps),
        "grad_norm": {"median": statistics.median(norms), "p90": percentile(norms, 0.9), "max": max(norms)},
        "grad_norm_per_token": {"median": statistics.median(per_token), "max": max(per_token)},
        "clip_fraction": len(factors) / len(steps),
        "clip_factor_median": statistics.median(factors) if factors else None,
        "loss_per_token": statistics.median(float(log["loss"]) / size for _, size, log in steps),
        "beam_loss_per_token": statistics.median(beam) if beam else None,
        "unconverged": sum(log.get("unconverged", 0) for _, _, log in steps),
        "per_step": {"grad_norm": norms, "sample_size": [size for _, size, _ in steps]},
    }


def grad_stats_table(args, precision, max_tokens, samples, model, methods, results):
    rows = {}
    for name, crit in methods.items():
        steps = [gradient_step(model, crit, sample, seed=i) for i, sample in enumerate(samples)]
        search = getattr(crit, "search", None)
        rows[name] = grad_stats_row(steps, args.clip_norm, search.min_span if search else None)
    results.setdefault("grad_stats", {}).setdefault(precision, {})[str(max_tokens)] = rows
    results["clip_norm"] = args.clip_norm
    ntok = statistics.mean(s["ntokens"] for s in samples)
    print(f"\n## Gradient statistics, {precision} ({len(samples)} batches of ~{ntok:.0f} target tokens, "
          f"beam loss {args.beam_loss}, --clip-norm {args.clip_norm:g}; no optimizer step)\n")  # fmt: skip
    print("| step | min span | grad norm median | p90 | max | per token: median | max | clip fires | clip factor (median where it fires) "
          "| loss / token | beam loss / token | unconverged rows |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def fmt(x, spec=".3g"):
        return "-" if x is None else format(x, spec)

    for name, r in rows.items():
        g, gt = r["grad_norm"], r["grad_norm_per_token"]
        print(f"| {name} | {fmt(r['min_span'], 'g')} | {g['median']:.3g} | {g['p90']:.3g} | {g['max']:.3g} | {gt['median']:.3g} "
              f"| {gt['max']:.3g} | {r['clip_fraction']:.0%} | {fmt(r['clip_factor_median'])} | {r['loss_per_token']:.3f} "
              f"| {fmt(r['beam_loss_per_token'], '.3f')} | {r['unconverged']} |")  # fmt: skip


def generate_table(args, task, model, results):
    task.load_dataset("test")
    gen_args = Namespace(beam=args.gen_beam, lenpen=1.0, max_len_a=1.2, max_len_b=10, min_len=1, unkpen=0.0)
    model.eval()
    ours = task.build_generator([model], gen_args)
    stock = TranslationTask.build_generator(task, [model], gen_args)
    test_itr = task.get_batch_iterator(task.dataset("test"), max_sentences=128, seed=1)
    test_samples = [move(s, args.device) for s in test_itr.next_epoch_itr(shuffle=False)]
    if args.gen_sentences:
        test_samples = test_samples[: max(1, args.gen_sentences // 128)]
    gen_times = {"fairseq SequenceGenerator": [], "soft-beam generator (eps 0)": []}
    identical = True
    for rep in range(args.reps + 1):
        total = dict.fromkeys(gen_times, 0.0)
        for sample in test_samples:
            t_stock, h_stock = timed_generate(task, stock, model, sample, args.device)
            t_ours, h_ours = timed_generate(task, ours, model, sample, args.device)
            total["fairseq SequenceGenerator"] += t_stock
            total["soft-beam generator (eps 0)"] += t_ours
            identical &= all(torch.equal(a[0]["tokens"], b[0]["tokens"]) for a, b in zip(h_stock, h_ours))
        if rep:
            for k, v in total.items():
                gen_times[k].append(v)
    n_test = sum(s["nsentences"] for s in test_samples)
    print(f"\n## Generation: test set, {n_test} sentences, beam {args.gen_beam}, {args.reps} reps\n")
    print("| generator | median s | x stock |")
    print("|---|---|---|")
    g0 = statistics.median(gen_times["fairseq SequenceGenerator"])
    for k, v in gen_times.items():
        print(f"| {k} | {statistics.median(v):.3f} | {statistics.median(v) / g0:.3f} |")
        results["generate"][k] = {"median_s": statistics.median(v), "ratio": statistics.median(v) / g0}
    print(f"\nTop hypotheses identical to fairseq's: {identical}")
    results["generate"]["identical"] = identical


if __name__ == "__main__":
    main()
