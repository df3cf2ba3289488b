"""Fixes for fairseq-fixed 0.12.3.1, applied when the plugin is imported.

1. Checkpoints under torch >= 2.6. torch 2.6 made ``torch.load(weights_only=True)`` the
default, and fairseq checkpoints pickle ``argparse.Namespace`` and omegaconf configs, so every
``fairseq-generate`` or resume fails. We give ``fairseq.checkpoint_utils`` and
``fairseq.distributed.utils`` (only them) a view of torch whose ``load`` defaults to
``weights_only=False``, which is how fairseq loaded checkpoints before torch 2.6. As ever with
pickled checkpoints, load only files you trust. ``torch.load`` stays unchanged for everyone else.

2. Lost sentences. fairseq 0.12's ``data_utils.batch_by_size`` drops the last batch when its
size is not a multiple of ``--required-batch-size-multiple`` (default 8): 100 sentences in
batches of at most 16 come back as 96, so fairseq-generate silently translates fewer
sentences and BLEU is computed on a subset. We give the dropped tail back as a last batch.

3. The NaN report. When gradients are NaN/inf, fairseq's trainer re-runs the step under its
``NanDetector`` to say where they came from, then raises ``FloatingPointError``. The detector's
legacy module backward hooks make current torch look for a tensor at the top of each module's
output; fairseq's encoders return a dict of lists, so the re-run died with a bare
``StopIteration`` that hid the real error. We keep the detector's forward hooks (they name the
first module with a NaN/inf output) and drop its backward hooks.
"""

from __future__ import annotations

import types

import numpy as np
import torch


class _TorchLoadingFullCheckpoints(types.ModuleType):
    """``torch``, except that ``load`` unpickles full objects unless told otherwise."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(f, *args, **kwargs)


def allow_fairseq_checkpoints() -> None:
    # checkpoint_utils loads checkpoints; distributed.utils unpickles the state it broadcasts
    # from rank 0 to the other ranks (resume and --finetune-from-model under DDP).
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    for module in (checkpoint_utils, distributed_utils):
        if not isinstance(module.torch, _TorchLoadingFullCheckpoints):
            module.torch = _TorchLoadingFullCheckpoints("torch")


def _batch_by_size_keeping_the_tail(original):
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

    batch_by_size.keeps_tail = True
    return batch_by_size


def keep_last_partial_batch() -> None:
    from fairseq.data import data_utils

    if not getattr(data_utils.batch_by_size, "keeps_tail", False):
        data_utils.batch_by_size = _batch_by_size_keeping_the_tail(data_utils.batch_by_size)


def report_nans_without_backward_hooks() -> None:
    from fairseq import nan_detector

    original = nan_detector.NanDetector.__init__
    if getattr(original, "forward_hooks_only", False):
        return

    def __init__(self, model, forward=True, backward=True):
        original(self, model, forward=forward, backward=False)

    __init__.forward_hooks_only = True
    nan_detector.NanDetector.__init__ = __init__
