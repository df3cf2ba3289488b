"""Fixes for fairseq-fixed 0.12.3.1 under current torch: the one place that patches fairseq.

``apply()`` (called when the plugin is imported) installs each patch of ``PATCHES``. A patch is
written for the fairseq versions it names: on any other version it is not installed and a warning
names the version, because fairseq code it replaces or wraps may have changed. A patch installs
once per process and logs that at INFO (logger ``fairseq_plugins.compat``); a second ``apply()``
finds the marks it left on fairseq's objects and does nothing, even if the plugin was imported
again under another module name.

Each patch changes fairseq for every task in the process, not only ``translation_soft_beam``:
the code it fixes is called by fairseq's CLIs or trainer directly, with no task in between (each
patch's docstring says where). Apart from the fault it fixes, fairseq behaves as stock.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger("fairseq_plugins.compat")

FAIRSEQ_0_12 = ("0.12.3.1",)  # fairseq-fixed 0.12.3.1: the version these patches were written and tested against
_MARK = "_soft_beam_patch"  # attribute on every installed replacement: the patch's name
_warned: set[tuple[str, str]] = set()


def fairseq_version() -> str:
    """What the imported fairseq reports (fairseq-fixed sets ``fairseq.__version__``)."""
    import fairseq

    version = getattr(fairseq, "__version__", None)
    if version:
        return str(version)
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    for dist in ("fairseq-fixed", "fairseq"):
        try:
            return dist_version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


@dataclass(frozen=True)
class Patch:
    """Replaces attributes of fairseq objects: ``replace(original)`` for each of ``targets()``."""

    name: str
    written_for: tuple[str, ...]
    targets: Callable[[], list[tuple[object, str]]]  # (owner, attribute name); imports lazily
    replace: Callable[[object], object]
    summary: str

    def installed(self) -> bool:
        return all(getattr(getattr(owner, attr), _MARK, None) == self.name for owner, attr in self.targets())

    def apply(self, version: str) -> bool:
        """Installs the patch unless installed already or ``version`` is not one it was written for."""
        if version not in self.written_for:
            if (self.name, version) not in _warned:
                _warned.add((self.name, version))
                logger.warning(
                    "not applying %s: written for fairseq %s, but fairseq %s is installed; without it: %s",
                    self.name, " / ".join(self.written_for), version, self.summary,
                )  # fmt: skip
            return False
        changed = False
        for owner, attr in self.targets():
            current = getattr(owner, attr)
            if getattr(current, _MARK, None) != self.name:
                replacement = self.replace(current)
                setattr(replacement, _MARK, self.name)
                setattr(owner, attr, replacement)
                changed = True
        if changed:
            logger.info("applied %s (fairseq %s): fixes %s", self.name, version, self.summary)
        return changed


PATCHES: list[Patch] = []  # in the order they are declared below


def patch(name: str, targets, summary: str, written_for: tuple[str, ...] = FAIRSEQ_0_12):
    """Declares the decorated ``replace(original)`` a patch of ``targets()`` (see ``Patch``)."""

    def declare(replace):
        PATCHES.append(Patch(name, written_for, targets, replace, summary))
        return replace

    return declare


def apply() -> list[str]:
    """Installs every patch that fits the installed fairseq; returns the names installed now."""
    version = fairseq_version()
    return [p.name for p in PATCHES if p.apply(version)]


# --------------------------------------------------------------------------- 1. checkpoints


class _TorchLoadingFullCheckpoints(types.ModuleType):
    """``torch``, except that ``load`` unpickles full objects unless told otherwise."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(f, *args, **kwargs)


def _checkpoint_modules():
    # checkpoint_utils loads checkpoints; distributed.utils unpickles the state it broadcasts
    # from rank 0 to the other ranks (resume and --finetune-from-model under DDP).
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    return [(checkpoint_utils, "torch"), (distributed_utils, "torch")]


@patch("allow_fairseq_checkpoints", _checkpoint_modules, "fairseq checkpoints failing to load under torch >= 2.6 (weights_only=True)")
def _torch_loading_full_checkpoints(original):
    """torch 2.6 made ``torch.load(weights_only=True)`` the default, and fairseq checkpoints pickle
    ``argparse.Namespace`` and omegaconf configs, so every ``fairseq-generate`` or resume fails.
    ``fairseq.checkpoint_utils`` and ``fairseq.distributed.utils`` (only they) get a view of torch
    whose ``load`` defaults to ``weights_only=False``, which is how fairseq loaded checkpoints
    before torch 2.6. As ever with pickled checkpoints, load only files you trust; ``torch.load``
    stays unchanged for everyone else.

    Process-wide because fairseq-generate, fairseq-train's resume and ``--finetune-from-model`` load
    checkpoints through ``checkpoint_utils`` before or outside any task, whatever ``--task`` is.
    """
    view = _TorchLoadingFullCheckpoints("torch")
    view.__wrapped__ = original  # what a test puts back to see the patch install
    return view


# --------------------------------------------------------------------------- 2. the last partial batch


def _batch_by_size_target():
    from fairseq.data import data_utils

    return [(data_utils, "batch_by_size")]


@patch("keep_last_partial_batch", _batch_by_size_target, "data_utils.batch_by_size dropping the sentences after the last full batch")
def _batch_by_size_keeping_the_tail(original):
    """fairseq 0.12's ``data_utils.batch_by_size`` drops the last batch when its size is not a multiple
    of ``--required-batch-size-multiple`` (default 8): 100 sentences in batches of at most 16 come
    back as 96, so fairseq-generate silently translates fewer sentences and BLEU is computed on a
    subset. The dropped tail comes back as a last batch; the other batches are fairseq's own.

    Process-wide because ``FairseqDataset.batch_by_size`` calls it for every task, and users decode
    stock ``--task translation`` checkpoints with ``--user-dir`` too (the CLI test counts all 45
    sentences); a task-only fix would leave that BLEU on a subset.
    """

    @functools.wraps(original)
    def batch_by_size(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None, max_sentences=None,
                      required_batch_size_multiple=1, fixed_shapes=None):  # fmt: skip
        indices = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        batches = original(indices, num_tokens_fn, num_tokens_vec, max_tokens, max_sentences,
                           required_batch_size_multiple, fixed_shapes)  # fmt: skip
        kept = sum(len(b) for b in batches)
        if fixed_shapes is None and kept < len(indices):
            # Batches are consecutive slices of `indices`: the dropped tail is what follows them.
            batches = list(batches) + [indices[kept:]]
        return batches

    return batch_by_size


# --------------------------------------------------------------------------- 3. the NaN report


def _nan_detector_target():
    from fairseq import nan_detector

    return [(nan_detector.NanDetector, "__init__")]


@patch(
    "report_nans_without_backward_hooks", _nan_detector_target, "NanDetector's re-run dying with StopIteration instead of naming the NaN"
)
def _nan_detector_without_backward_hooks(original):
    """When gradients are NaN/inf, fairseq's trainer re-runs the step under its ``NanDetector`` to say
    where they came from, then raises ``FloatingPointError``. The detector's legacy module backward
    hooks make current torch look for a tensor at the top of each module's output; fairseq's
    encoders return a dict of lists, so the re-run died with a bare ``StopIteration`` that hid the
    real error. The detector keeps its forward hooks (they name the first module with a NaN/inf
    output) and loses its backward hooks.

    Process-wide because ``fairseq.trainer.Trainer`` builds the detector itself, for any task or
    criterion, with no hook for a plugin to pass options.
    """

    @functools.wraps(original)
    def __init__(self, model, forward=True, backward=True):
        original(self, model, forward=forward, backward=False)

    return __init__
