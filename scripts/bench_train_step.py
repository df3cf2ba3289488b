#!/usr/bin/env python
"""Benchmark: an MLE training step against a soft_beam training step, and our generator
against fairseq's, on the same real batches and the same model, measured side by side.

    python scripts/bench_train_step.py --data runs/multi30k-de          # prepared by
    data_prep/prepare-multi30k.sh; add --checkpoint to time a trained model's search

Each repetition runs every method once on the same batch, in turn, so a noisy machine slows
all of them alike; the table reports medians and ratios to the MLE step (or to stock fairseq
generation). Memory on CPU is the bytes autograd saves for backward (activations), which is
what grows with the search, counted in the warm-up repetition only (the counting hook is Python
code run for every saved tensor); on CUDA it is torch.cuda.max_memory_allocated. The ratios depend on
torch's thread count (printed): the MLE step is mostly large matrix products, which use every
thread, and the search mostly small ops, which do not.
"""

import argparse
import contextlib
import json
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

MODEL_ARGS = model_args("small", dropout=0.1)


def setup(data_bin: Path, checkpoint, beam: int, beam_loss: str, device: str, state_grad: str = "values", fraction: float = 1.0):
    argv = [str(data_bin), "--user-dir", str(ROOT / "fairseq_plugins"), "--task", "translation_soft_beam",
            "--criterion", "soft_beam", "--label-smoothing", "0.1", "--beam-loss", beam_loss,
            "--soft-beam-size", str(beam), "--soft-beam-state-grad", state_grad,
            "--search-fraction", str(fraction), *MODEL_ARGS]  # fmt: skip
    if device == "cpu":
        argv.append("--cpu")
    cfg = options.parse_args_and_arch(options.get_training_parser(), argv)
    task = tasks.setup_task(cfg)
    if checkpoint:
        model = checkpoint_utils.load_model_ensemble([str(checkpoint)], task=task)[0][0]
    else:
        torch.manual_seed(0)
        model = task.build_model(cfg)
    mle_cfg = Namespace(**{**vars(cfg), "criterion": "label_smoothed_cross_entropy"})
    return cfg, task, model.to(device), task.build_criterion(mle_cfg), task.build_criterion(cfg)


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
    grads = [p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None]
    log["grad_norm"] = float(torch.stack(grads).sum().sqrt()) / float(sample_size)
    return seconds, memory, log


def timed_generate(task, generator, model, sample, device):
    sync(device)
    start = time.perf_counter()
    hyps = task.inference_step(generator, [model], sample)
    sync(device)
    return time.perf_counter() - start, hyps


def move(sample, device):
    from fairseq import utils

    return utils.move_to_cuda(sample) if device == "cuda" else sample


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a folder prepared by data_prep/prepare-multi30k.sh")
    p.add_argument("--checkpoint", type=Path, help="time this model (default: a fresh random transformer)")
    p.add_argument("--beams", default="4,5")
    p.add_argument("--beam-loss", default="hamming", choices=["hamming", "risk"])
    p.add_argument("--state-grads", default="values", help="comma-separated --soft-beam-state-grad modes to time (values, full)")
    p.add_argument("--search-fractions", default="1", help="comma-separated --search-fraction values to time")
    p.add_argument("--max-tokens", default="2048", help="batch size in tokens; comma-separated: one table each")
    p.add_argument("--batches", type=int, default=4, help="distinct training batches")
    p.add_argument("--reps", type=int, default=3, help="repetitions over the batches")
    p.add_argument("--gen-beam", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="profile one soft_beam step (torch.profiler)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--parts", default="train,generate", help="which tables: train, generate or both")
    p.add_argument("--gen-sentences", type=int, default=0, help="decode only the first N test sentences (0: all)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args()
    data_bin = args.data / "data-bin" if (args.data / "data-bin").is_dir() else args.data
    if not (data_bin / "dict.en.txt").exists() and not list(data_bin.glob("dict.*.txt")):
        sys.exit(f"bench_train_step.py: error: no fairseq data-bin at {data_bin} (run data_prep/prepare-multi30k.sh)")
    beams = [int(b) for b in args.beams.split(",")]

    machine = machine_description(args.device)
    print(f"# machine: {machine}")
    if args.checkpoint:
        print(f"# model: checkpoint {args.checkpoint} (its own architecture)")
    else:
        print(f"# model: {' '.join(MODEL_ARGS)}; random init")
    results = {"machine": machine, "device": args.device, "train": {}, "generate": {}}

    parts = set(args.parts.split(","))
    state_grads = [m.strip() for m in args.state_grads.split(",") if m.strip()]
    fractions = [float(f) for f in args.search_fractions.split(",") if f.strip()]
    setups = {
        (b, sg, f): setup(data_bin, args.checkpoint, b, args.beam_loss, args.device, sg, f)
        for b in beams
        for sg in state_grads
        for f in fractions
    }
    cfg, task, model, mle, _ = next(iter(setups.values()))
    if "train" in parts:
        for max_tokens in [int(t) for t in args.max_tokens.split(",")]:
            train_table(args, max_tokens, task, model, mle, setups, results)
    if "generate" in parts:
        generate_table(args, task, model, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def train_table(args, max_tokens, task, model, mle, setups, results):
    task.load_dataset("train")
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=max_tokens, seed=1)
    samples = [move(s, args.device) for _, s in zip(range(args.batches), itr.next_epoch_itr(shuffle=True))]
    methods = {"mle": (model, mle)}
    state_grads = {sg for _, sg, _ in setups}
    fractions = {f for _, _, f in setups}
    for b, sg, f in setups:
        labels = ([sg] if len(state_grads) > 1 else []) + ([f"fraction {f:g}"] if len(fractions) > 1 else [])
        name = f"soft_beam k={b}" + (f" ({', '.join(labels)})" if labels else "")
        methods[name] = (model, setups[b, sg, f][4])
    times = {m: [] for m in methods}
    memory = {m: [] for m in methods}
    logs = {m: [] for m in methods}
    for rep in range(args.reps + 1):  # rep 0 warms up and, on CPU, counts the saved bytes
        for i, sample in enumerate(samples):
            for name, (mdl, crit) in methods.items():
                seconds, mem, log = timed_step(mdl, crit, sample, args.device, count_saved=rep == 0, seed=i)
                if mem is not None:
                    memory[name].append(mem)
                if rep:
                    times[name].append(seconds)
                    logs[name].append(log)
    ntok = statistics.mean(s["ntokens"] for s in samples)
    nsent = statistics.mean(s["nsentences"] for s in samples)
    print(f"\n## Training step ({len(samples)} batches of ~{nsent:.0f} sentences / {ntok:.0f} target tokens, "
          f"{args.reps} reps, beam loss {args.beam_loss})\n")  # fmt: skip
    print("| step | median s | x MLE | saved for backward (MB) | x MLE | search steps | solver iters | grad norm / token |")
    print("|---|---|---|---|---|---|---|---|")
    base_t, base_m = statistics.median(times["mle"]), statistics.median(memory["mle"])
    for name in methods:
        t, m = statistics.median(times[name]), statistics.median(memory[name])
        steps = iters = "-"
        if name != "mle":
            steps = f"{statistics.mean(lg['search_steps'] for lg in logs[name]):.1f}"
            iters = f"{statistics.mean(lg['solver_iters'] / max(lg['solver_calls'], 1) for lg in logs[name]):.1f}"
        gnorm = statistics.median(lg["grad_norm"] for lg in logs[name])
        print(f"| {name} | {t:.3f} | {t / base_t:.2f} | {m / 2**20:.1f} | {m / base_m:.1f} | {steps} | {iters} | {gnorm:.3g} |")
        results["train"].setdefault(str(max_tokens), {})[name] = {
            "median_s": t, "ratio": t / base_t, "memory_bytes": m, "memory_ratio": m / base_m, "grad_norm": gnorm
        }  # fmt: skip

    # --- where the time of a soft_beam step goes ----------------------------------------------
    if args.profile:
        name = next(n for n in methods if n != "mle")
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            timed_step(*methods[name], samples[0], args.device)
        print(f"\n## Profile of one {name} step (top 15 by self time)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


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
