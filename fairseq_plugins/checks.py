"""Checks at the door: a setting or a checkpoint that fairseq would reject deep inside, or silently
work around, is refused here with an error that names the option or the file.

Plain functions; ``compat`` hooks them into fairseq (and the plugin's own task may call them).
"""

from __future__ import annotations

import os
import re
import zipfile

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6 is a zip archive


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded; ``path`` names it."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        super().__init__(f"checkpoint {self.path} {problem}")


def check_checkpoint_file(path) -> None:
    """Raises ``CheckpointError`` for an empty file, or a zip-format checkpoint without its end record.

    A write cut short always loses the end of the file, and the zip's end record is its last bytes,
    so this finds truncation without reading the whole (possibly many GB) file. A missing file is
    left to the caller: fairseq's own errors name it.
    """
    try:
        size = os.path.getsize(path)
    except (OSError, TypeError, ValueError):
        return  # missing, or a remote path for fairseq's PathManager
    if size == 0:
        raise CheckpointError(path, "is empty (0 bytes): its write was cut off, or it was never written")
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if head == _ZIP_MAGIC and not zipfile.is_zipfile(path):
        raise CheckpointError(path, f"is truncated ({size} bytes, no zip end record): its write was cut off")


def checkpoint_name_pattern(suffix: str = "") -> re.Pattern:
    """The names fairseq's save_checkpoint writes (epoch, update, best), except checkpoint_last."""
    return re.compile(r"checkpoint(\d+|_\d+_\d+|_best|\.best_.+)" + re.escape(suffix) + r"\.pt")


def resume_candidates(save_dir, suffix: str = "") -> list[str]:
    """The checkpoints in ``save_dir`` that a resume could fall back to, newest (by mtime) first."""
    try:
        names = os.listdir(save_dir)
    except OSError:
        return []
    pattern = checkpoint_name_pattern(suffix)
    paths = [os.path.join(save_dir, n) for n in names if pattern.fullmatch(n)]
    return sorted(paths, key=lambda p: (os.path.getmtime(p), p), reverse=True)


def check_half_precision(common, cuda: bool, xla: bool) -> None:
    """Refuses --fp16 / --bf16 where fairseq 0.12's trainer cannot run them.

    ``common`` is fairseq's ``cfg.common`` (or a flat argparse namespace); ``cuda``: whether the
    trainer will use a CUDA device; ``xla``: whether torch_xla is installed.
    """
    if getattr(common, "bf16", False) and not xla:
        option = "--memory-efficient-bf16" if getattr(common, "memory_efficient_bf16", False) else "--bf16"
        raise ValueError(
            f"{option} needs a TPU: in fairseq 0.12 it implies --tpu, and torch_xla is not installed. "
            "Drop it to train in float32, or use --fp16 on a CUDA GPU."
        )
    if getattr(common, "tpu", False) and not xla:
        raise ValueError("--tpu needs torch_xla, which is not installed")
    # --memory-efficient-fp16 keeps no fp32 copy on the GPU, and it does run on a CPU.
    if getattr(common, "fp16", False) and not getattr(common, "memory_efficient_fp16", False) and not cuda:
        why = "--cpu is set" if getattr(common, "cpu", False) else "torch sees no CUDA device"
        raise ValueError(
            f"--fp16 needs a CUDA GPU (fairseq's FP16Optimizer keeps its float32 master weights there), "
            f"but {why}. Drop --fp16 to train in float32 on the CPU."
        )


def check_nbest_within_beam(args) -> None:
    """Refuses --nbest above --beam: the search finds --beam hypotheses, and fairseq would print
    only those, silently. ``args``: the generation config (or namespace) a task's build_generator gets."""
    nbest, beam = getattr(args, "nbest", None), getattr(args, "beam", None)
    if nbest is not None and beam is not None and nbest > beam:
        raise ValueError(
            f"--nbest {nbest} is above --beam {beam}: the beam search finds only {beam} hypotheses per "
            f"sentence, so fewer than --nbest would be printed; raise --beam to {nbest} or lower --nbest"
        )
