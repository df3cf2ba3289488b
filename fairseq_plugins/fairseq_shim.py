"""The fairseq internals that the plugin relies on, all in one place.

Written against fairseq-fixed 0.12.3.1 (``fairseq.__version__``; the version ``compat`` patches).
Nothing here is fairseq's public API, so a fairseq upgrade should start by re-checking these:

- ``MultiheadAttention._get_input_buffer`` and ``MultiheadAttention._set_input_buffer`` (private):
  read and write one attention layer's cache in an incremental state, a dict with ``prev_key`` and
  ``prev_value`` of shape (rows, heads, steps, head dim), as fairseq's ``reorder_incremental_state``
  uses them.
- ``MultiheadAttention.self_attention``: tells the decoder's self-attention layers, whose caches
  hold each beam's own past, from its encoder-decoder attention layers.
- ``decoder.embed_tokens``, the token embedding table, and it being looked up on every call: ``TransformerDecoderBase`` calls it once a
  step, on the last input token only under an incremental state, then scales it and adds positions
  and layer norms. So a stand-in module returning given embeddings feeds the stock decoder a mixed
  input. The output projection keeps its own reference to the embedding weight at construction,
  so the swap does not reach the output layer.
- ``metrics.get_active_aggregators()`` and the ``num_updates`` meter that ``Trainer.set_num_updates``
  logs into them: the criterion's only view of the update count (for the ε schedule).
"""

from __future__ import annotations

import contextlib

import torch
from fairseq import metrics
from fairseq.modules import MultiheadAttention


class _GivenEmbedding(torch.nn.Module):
    """Stands in for ``decoder.embed_tokens`` for one call: returns the given values."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.values = values  # (rows, 1, D)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.values


def self_attention_layers(decoder) -> list:
    """The decoder's self-attention layers: the ones whose caches differ between beams."""
    return [m for m in decoder.modules() if isinstance(m, MultiheadAttention) and m.self_attention]


def attention_cache(attn, incremental_state: dict) -> dict:
    """``attn``'s cache in ``incremental_state`` (empty before the first step)."""
    return attn._get_input_buffer(incremental_state)


def set_attention_cache(attn, incremental_state: dict, cache: dict) -> None:
    attn._set_input_buffer(incremental_state, cache)


def token_embeddings(decoder, tokens: torch.Tensor) -> torch.Tensor:
    """The decoder's embeddings of ``tokens`` before scaling and positions: what the search mixes
    and hands back through ``given_input_embeddings``."""
    return decoder.embed_tokens(tokens)


@contextlib.contextmanager
def given_input_embeddings(decoder, values: torch.Tensor):
    """Within the block, the decoder's next step embeds its input as ``values`` (rows, D)."""
    original = decoder.embed_tokens
    decoder.embed_tokens = _GivenEmbedding(values.unsqueeze(1))  # one step: (rows, 1, D)
    try:
        yield
    finally:
        decoder.embed_tokens = original


def trainer_num_updates() -> int | None:
    """fairseq's update count, as its trainer publishes it, or None where it publishes none.

    ``Trainer.set_num_updates`` logs it as the meter ``num_updates`` into every active metrics
    aggregator, ``default`` among them (always active while training), after every update and when
    it resumes a checkpoint; it starts at 0 (no meter) under ``--finetune-from-model``. So it is the
    count of the run being trained, also after a resume and under ``--task translation`` (whose
    ``train_step`` gives the update number to the model, not to the criterion). The *active*
    aggregators are read: on resume, fairseq replaces the stored ``default`` aggregator with the
    checkpoint's copy but keeps logging into the active one, so the stored copy stops at the
    resumed count. Validation runs under a new root aggregator, without the meter: None there.
    """
    counts = [meter.val for agg in metrics.get_active_aggregators() if (meter := agg.get("num_updates")) is not None]
    counts = [int(c) for c in counts if c is not None]
    return max(counts) if counts else None
