"""Adapts a stock fairseq encoder-decoder model to ``soft_beam.search.StepModel``.

What this needs of fairseq beyond its public model API is in ``fairseq_shim``.
"""

from __future__ import annotations

import contextlib

import torch
from fairseq.models import FairseqEncoderDecoderModel

from . import fairseq_shim


def unwrap_model(model):
    """The fairseq model inside fairseq's (legacy) DDP and proxy wrappers."""
    while not isinstance(model, FairseqEncoderDecoderModel) and hasattr(model, "module"):
        model = model.module
    return model


def wrapped_in_c10d_ddp(model) -> bool:
    while hasattr(model, "module"):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return True
        model = model.module
    return False


class FairseqStepModel:
    """Incremental decoding of one fairseq encoder-decoder model over sentence-major beam rows.

    The decoder is the stock one: mixed input embeddings are fed by swapping its
    ``embed_tokens`` for one call (``fairseq_shim.given_input_embeddings``), so positions,
    scaling and layer norms apply as usual.
    """

    def __init__(self, model, net_input: dict, beam: int, encoder_out=None):
        self.model = unwrap_model(model)
        if not isinstance(self.model, FairseqEncoderDecoderModel):
            raise ValueError(f"soft-beam needs a fairseq encoder-decoder model, got {type(self.model).__name__}")
        self.decoder = self.model.decoder
        if encoder_out is None:
            encoder_out = self.model.encoder.forward_torchscript(net_input)
        bsz = net_input["src_tokens"].shape[0]
        order = torch.arange(bsz, device=net_input["src_tokens"].device).repeat_interleave(beam)  # (B K,)
        self.encoder_out = self.model.encoder.reorder_encoder_out(encoder_out, order)
        self.incremental_state: dict = {}
        # Self-attention caches get mixed. Encoder-decoder caches are equal across a sentence's
        # beams, so they need no mixing (fairseq skips their same-size reorders for that reason).
        self.self_attentions = fairseq_shim.self_attention_layers(self.decoder)

    def step(self, tokens, input_embedding):
        if input_embedding is None:
            ctx = contextlib.nullcontext()
        else:
            ctx = fairseq_shim.given_input_embeddings(self.decoder, input_embedding)
        with ctx:
            logits, extra = self.decoder(tokens, encoder_out=self.encoder_out, incremental_state=self.incremental_state)
        lprobs = self.model.get_normalized_probs((logits[:, -1:, :], extra), log_probs=True)  # (rows, 1, V)
        return lprobs[:, -1, :]

    def embed(self, tokens):
        return fairseq_shim.token_embeddings(self.decoder, tokens)

    def reorder(self, order):
        self.decoder.reorder_incremental_state_scripting(self.incremental_state, order)
        self.encoder_out = self.model.encoder.reorder_encoder_out(self.encoder_out, order)

    def mix(self, weights):
        B, K, _ = weights.shape
        for attn in self.self_attentions:
            buffer = fairseq_shim.attention_cache(attn, self.incremental_state)
            for key in ("prev_key", "prev_value"):
                cache = buffer.get(key)
                if cache is None:
                    continue
                flat = cache.reshape(B, K, -1)  # (rows, H, T, d) -> (B, K, H T d)
                mixed = torch.bmm(weights.to(flat.dtype), flat)  # (B, K_new, H T d)
                buffer[key] = mixed.view_as(cache)
            fairseq_shim.set_attention_cache(attn, self.incremental_state, buffer)
