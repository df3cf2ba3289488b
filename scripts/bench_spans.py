"""How wide are the candidate score ranges that the training search hands the SOFT top-k?

    python scripts/bench_spans.py --data runs/multi30k.en-de --checkpoint CKPT [--beam 4] [--batches 8]

The operator min-max normalises each row of candidate scores, so ε is relative to the row's span
(max − min over its finite scores, in nats for log-probs), and ``--soft-beam-min-span`` floors that
span. This script runs the soft_beam criterion's forward (its search, no backward) on real training
batches and records every soft top-k row's span. It prints the span's quantiles and, for each floor
in ``--floors``, the share of rows the floor would change (span below it). A floor no row reaches
is inert on this model; its gradient bound then only matters for other models or score scales.
No timing: it can share the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as bench  # noqa: E402  (the fairseq plumbing: config, model, batches)

import soft_beam.search as search  # noqa: E402


def row_spans(scores: torch.Tensor) -> torch.Tensor:
    """scores: (S, M) with -inf for blocked candidates. Returns (S,) max − min over the finite ones."""
    finite = torch.isfinite(scores)  # (S, M)
    hi = scores.masked_fill(~finite, -torch.inf).amax(1)  # (S,)
    lo = scores.masked_fill(~finite, torch.inf).amin(1)  # (S,)
    return (hi - lo)[finite.sum(1) > 1]


def record_spans(spans: list):
    """Wrap the search's soft top-k so that every row's span is appended to ``spans`` (a list of tensors)."""
    inner = search.sorted_soft_topk

    def recording(scores, *args, **kwargs):
        spans.append(row_spans(scores.detach().float()))
        return inner(scores, *args, **kwargs)

    return inner, recording


def measure(args) -> dict:
    cfg = bench.parse_cfg(args.data / "data-bin", args.beam, args.beam_loss, "cpu")
    task = bench.tasks.setup_task(cfg)
    criterion = task.build_criterion(cfg)
    model = bench.load_model(task, cfg, args.checkpoint, "cpu")
    task.load_dataset("train")
    batches = bench.train_samples(argparse.Namespace(batches=args.batches, device="cpu"), task, args.max_tokens)
    spans: list = []
    inner, recording = record_spans(spans)
    search.sorted_soft_topk = recording
    try:
        model.train()
        with torch.no_grad():
            for seed, sample in enumerate(batches):
                torch.manual_seed(seed)
                criterion(model, sample)
    finally:
        search.sorted_soft_topk = inner
    every = torch.cat(spans).double()  # (rows,)
    quantiles = {q: float(every.quantile(q)) for q in (0.0, 0.001, 0.01, 0.1, 0.5)}
    below = {f: float((every < f).double().mean()) for f in args.floors}
    return {"rows": every.numel(), "quantiles": quantiles, "share_below_floor": below}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a folder prepared by data_prep/prepare-multi30k.sh")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--beam-loss", default="hamming")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--floors", default="0.1,0.5,1,2,5", help="comma-separated span floors (nats)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    try:
        args.floors = [float(f) for f in args.floors.split(",")]
    except ValueError:
        p.error(f"--floors: expected comma-separated numbers, got {args.floors!r}")
    if not args.checkpoint.is_file():
        p.error(f"--checkpoint: no such file: {args.checkpoint}")
    result = measure(args)
    q = result["quantiles"]
    print(f"{result['rows']} soft top-k rows; span quantiles (nats): "
          + ", ".join(f"q{k:g} {v:.3g}" for k, v in q.items()))  # fmt: skip
    for f, share in result["share_below_floor"].items():
        print(f"floor {f:g}: {share:.4%} of rows below it")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
