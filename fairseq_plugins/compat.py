"""Fixes for running fairseq-fixed 0.12.3.1 on torch >= 2.6, applied when the plugin is imported.

torch 2.6 made ``torch.load(weights_only=True)`` the default, and fairseq checkpoints pickle
``argparse.Namespace`` and omegaconf configs, so every ``fairseq-generate`` or resume fails.
We give ``fairseq.checkpoint_utils`` (only it) a view of torch whose ``load`` defaults to
``weights_only=False``, which is how fairseq loaded checkpoints before torch 2.6. As ever with
pickled checkpoints, load only files you trust. ``torch.load`` stays unchanged for everyone else.
"""

from __future__ import annotations

import types

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
    from fairseq import checkpoint_utils

    if not isinstance(checkpoint_utils.torch, _TorchLoadingFullCheckpoints):
        checkpoint_utils.torch = _TorchLoadingFullCheckpoints("torch")
