"""Pure-torch test doubles of ``soft_beam.search.StepModel``: searches in milliseconds, no fairseq.

:class:`RecurrentBigram` holds the parameters; :meth:`RecurrentBigram.start` gives a fresh
:class:`RecurrentBigramStep` (the mutable decoder state) for one search, so finite differences can
rerun a search after editing a parameter. Every part of the state matters: the recurrent vector h
is per row (so a wrong ``reorder`` or ``mix`` changes the next log-probs), the bigram term reads
the hard ``tokens[:, -1]`` (so wrong bookkeeping tokens do too), and each sentence starts from its
own h0 row (so sentences differ and a batch mix-up shows).
"""

from __future__ import annotations

import torch

__all__ = ["RecurrentBigram", "RecurrentBigramStep", "BOS", "EOS", "PAD", "UNK"]

# fairseq's dictionary layout: <s>=0, <pad>=1, </s>=2, <unk>=3; its generators start from EOS.
BOS, PAD, EOS, UNK = 2, 1, 2, 3


class RecurrentBigram:
    """h_t = tanh(x_t + h_{t-1} W), logits = sharpness * (h_t O + bigram[prev]) + bias + eos_rate * t.

    Args:
        sentences: rows of h0, one initial state per sentence.
        sharpness: scales the logits: large for clear winners, small for a flat distribution
            with near-ties.
        bias: {token: value} added to that token's logit (after the sharpness), e.g. to make the
            model want unk, pad or EOS.
        eos_rate: added to EOS's logit per position t (t = 0 for the first token); > 0 makes
            hypotheses end, < 0 drives them to max_len.
    """

    def __init__(
        self,
        sentences: int = 4,
        vocab: int = 10,
        dim: int = 5,
        *,
        seed: int = 0,
        sharpness: float = 1.0,
        bias: dict[int, float] | None = None,
        eos_rate: float = 0.0,
        dtype: torch.dtype = torch.float64,
    ):
        g = torch.Generator().manual_seed(seed)

        def param(*shape, scale=1.0):
            return (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()

        self.vocab, self.dim, self.sharpness, self.eos_rate = vocab, dim, sharpness, eos_rate
        self.embedding = param(vocab, dim)  # (V, D)
        self.recurrence = param(dim, dim, scale=1.5 * dim**-0.5)  # (D, D)
        self.output = param(dim, vocab)  # (D, V)
        self.bigram = param(vocab, vocab, scale=0.5)  # (V, V) row: previous token
        self.h0 = param(sentences, dim, scale=2.0)  # (S, D)
        self.bias = torch.zeros(vocab, dtype=dtype)  # (V,) fixed, not a parameter
        self.eos_onehot = torch.zeros(vocab, dtype=dtype)  # (V,)
        self.eos_onehot[EOS] = 1.0
        for token, value in (bias or {}).items():
            self.bias[token] = value

    def parameters(self) -> dict[str, torch.Tensor]:
        """The leaves that gradients reach, by name (finite differences edit them in place)."""
        return {"embedding": self.embedding, "recurrence": self.recurrence, "output": self.output, "bigram": self.bigram, "h0": self.h0}

    def start(self, beam: int, sentences: list[int] | None = None) -> RecurrentBigramStep:
        """A decoder state for a search over ``sentences`` (default: all), each repeated beam times."""
        idx = torch.arange(self.h0.shape[0]) if sentences is None else torch.as_tensor(sentences)
        return RecurrentBigramStep(self, self.h0[idx].repeat_interleave(beam, 0))

    def log_probs(self, h: torch.Tensor, prev: torch.Tensor, position: int) -> torch.Tensor:
        """h (rows, D) the new state, prev (rows,) the previous token -> log-probs (rows, V)."""
        logits = self.sharpness * (h @ self.output + self.bigram[prev]) + self.bias  # (rows, V)
        if self.eos_rate:
            logits = logits + self.eos_onehot * (self.eos_rate * position)
        return torch.log_softmax(logits, -1)


class RecurrentBigramStep:
    """The StepModel: a state h (rows, D), rows sentence-major as the search lays them out."""

    def __init__(self, params: RecurrentBigram, h: torch.Tensor):
        self.params, self.h = params, h  # (rows, D)
        self.calls = 0
        self.inputs: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # per step: tokens[:, -1], input_embedding

    def step(self, tokens: torch.Tensor, input_embedding: torch.Tensor | None) -> torch.Tensor:
        p = self.params
        if tokens.shape != (self.h.shape[0], self.calls + 1) or not bool((tokens[:, 0] == BOS).all()):
            raise AssertionError(f"step {self.calls}: tokens {tuple(tokens.shape)} for {self.h.shape[0]} rows, BOS first")
        prev = tokens[:, -1]  # (rows,)
        self.inputs.append((prev, None if input_embedding is None else input_embedding.detach()))
        x = p.embedding[prev] if input_embedding is None else input_embedding  # (rows, D)
        self.h = torch.tanh(x + self.h @ p.recurrence)  # (rows, D)
        self.calls += 1
        return p.log_probs(self.h, prev, self.calls - 1)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.params.embedding[tokens]  # (..., D)

    def reorder(self, order: torch.Tensor) -> None:
        self.h = self.h[order]  # (new_rows, D)

    def mix(self, weights: torch.Tensor) -> None:
        S, K, _ = weights.shape  # (sentences, beam new, beam old)
        self.h = torch.bmm(weights, self.h.view(S, K, -1)).reshape(S * K, -1)  # (rows, D)
