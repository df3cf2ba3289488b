"""Averages the parameters of fairseq checkpoints (fairseq's own average_checkpoints.py is not installed with the wheel).

    python scripts/average_checkpoints.py --inputs A.pt B.pt ... --output AVG.pt
    python scripts/average_checkpoints.py --last 8 SAVE_DIR --output SAVE_DIR/checkpoint_avg8.pt

``--last N DIR`` takes the newest N interval checkpoints ``checkpoint_EPOCH_UPDATES.pt`` of DIR, by update
number (scripts/train_base.sh keeps the last 8). Every floating-point entry of the checkpoints' ``model``
state dict is averaged elementwise, accumulated in float64 and cast back to its dtype; other entries
(integer buffers) are the newest checkpoint's. The output keeps the rest of the newest checkpoint (by update
number with --last, else the last of --inputs): ``cfg``/``args``, ``optimizer_history``, ``extra_state``,
``task_state``; it drops ``last_optimizer_state`` (Adam's moments belong to the newest weights, not to their
average, and --finetune-from-model resets the optimizer anyway), so the output is for evaluation and for
fine-tuning, not for resuming that run. The output is written to a temporary file and renamed, so a killed
run never leaves half a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

INTERVAL_RE = re.compile(r"^checkpoint_(\d+)_(\d+)\.pt$")


class AverageError(ValueError):
    """A problem with the user's input: reported as one message."""


def newest_interval_checkpoints(folder: Path, n: int) -> list[Path]:
    """The newest n ``checkpoint_E_U.pt`` of folder, oldest first (by update number U)."""
    if n < 1:
        raise AverageError(f"--last needs N >= 1 (got {n})")
    if not Path(folder).is_dir():
        raise AverageError(f"--last: folder not found: {folder}")
    found = sorted((int(m.group(2)), p) for p in Path(folder).iterdir() if (m := INTERVAL_RE.match(p.name)))
    if len(found) < n:
        raise AverageError(f"--last {n}: {folder} has {len(found)} interval checkpoint(s) checkpoint_E_U.pt, fewer than {n}")
    return [p for _, p in found[-n:]]


def load(path: Path) -> dict:
    import torch

    if not Path(path).is_file():
        raise AverageError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise AverageError(f"{path} is not a fairseq checkpoint (no 'model' state dict)")
    return state


def check_same_layout(reference: dict, ref_path: Path, model: dict, path: Path) -> None:
    """Every checkpoint must hold the same parameter names with the same shapes as the first."""
    missing, extra = sorted(set(reference) - set(model)), sorted(set(model) - set(reference))
    if missing or extra:
        raise AverageError(
            f"{path}: parameter names differ from {ref_path} (missing {missing[:5]}, unexpected {extra[:5]}); "
            "only checkpoints of the same model can be averaged"
        )
    for name, t in reference.items():
        if tuple(model[name].shape) != tuple(t.shape):
            raise AverageError(f"{path}: parameter {name} has shape {tuple(model[name].shape)}, {ref_path} has {tuple(t.shape)}")


def average(paths: list[Path]) -> dict:
    """The newest checkpoint (the last of paths) with its model replaced by the elementwise mean of all
    of paths' floating-point parameters; without its optimizer state."""
    import torch

    if not paths:
        raise AverageError("no checkpoints to average")
    if len(set(map(Path.resolve, map(Path, paths)))) != len(paths):
        raise AverageError(f"a checkpoint is given twice: {', '.join(map(str, paths))}")
    sums, first, newest = None, None, None
    for path in paths:
        state = load(path)
        model = state["model"]
        if sums is None:
            first = (model, path)
            # float64 sums: 8 float32 terms would otherwise lose their low bits to rounding
            sums = {k: t.to(torch.float64) for k, t in model.items() if t.is_floating_point()}
        else:
            check_same_layout(first[0], first[1], model, path)
            for k in sums:
                sums[k] += model[k].to(torch.float64)
        newest = state
    averaged = dict(newest["model"])
    for k, s in sums.items():
        averaged[k] = (s / len(paths)).to(first[0][k].dtype)
    out = {k: v for k, v in newest.items() if k != "last_optimizer_state"}
    out["model"] = averaged
    out["averaged_checkpoints"] = [str(Path(p).resolve()) for p in paths]
    return out


def save_atomic(state: dict, output: Path) -> None:
    import torch

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, output)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--inputs", nargs="+", type=Path, metavar="CKPT", help="the checkpoints to average")
    src.add_argument("--last", nargs=2, metavar=("N", "DIR"), help="the newest N checkpoint_E_U.pt of DIR, by update number")
    p.add_argument("--output", type=Path, required=True, help="the averaged checkpoint (written atomically)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.last:
            n, folder = args.last
            if not re.fullmatch(r"[0-9]+", n):
                raise AverageError(f"--last N DIR: N must be a positive integer (got {n!r})")
            paths = newest_interval_checkpoints(Path(folder), int(n))
        else:
            paths = list(args.inputs)
        if args.output.resolve() in {Path(p).resolve() for p in paths}:
            raise AverageError(f"--output {args.output} is one of the inputs")
        save_atomic(average(paths), args.output)
    except (AverageError, OSError) as e:
        print(f"average_checkpoints.py: error: {e}", file=sys.stderr)
        return 1
    print(f"averaged {len(paths)} checkpoint(s) into {args.output}: " + ", ".join(p.name for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
