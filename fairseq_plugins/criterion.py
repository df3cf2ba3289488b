"""Criterion ``soft_beam``: label-smoothed MLE mixed with a loss on a beam search run inside
training, whose beam selection is the SOFT top-k, so the loss's gradient flows through the search.

(No ``from __future__ import annotations`` here: fairseq reads the config's field types at runtime.)
"""

import math
from dataclasses import dataclass, field

import torch
from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.dataclass import ChoiceEnum
from sacrebleu.metrics import BLEU

from soft_beam.search import SearchConfig, SearchStats, beam_search

from .decoding import FairseqStepModel, unwrap_model, wrapped_in_c10d_ddp
from .task import TranslationSoftBeamTask

BEAM_LOSSES = ChoiceEnum(["hamming", "risk"])


@dataclass
class SoftBeamCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    beam_loss: BEAM_LOSSES = field(
        default="hamming",
        metadata={
            "help": "loss on the search result: 'hamming' (relaxed token errors of the top hypothesis "
            "against the reference) or 'risk' (expected 1 - sentence BLEU under the softmax of the final "
            "hypothesis scores)"
        },
    )
    mle_weight: float = field(default=0.5, metadata={"help": "loss = mle_weight * label-smoothed MLE + (1 - mle_weight) * beam loss"})
    search_fraction: float = field(
        default=1.0,
        metadata={
            "help": "fraction of each batch's sentences on which the beam search runs (a random subset, drawn "
            "anew every update; validation searches every sentence); the MLE term always covers the whole batch, "
            "and the beam loss is scaled by batch / searched sentences so that it keeps its weight. Below 1 a step "
            "costs less: the search, not the MLE pass, is most of it"
        },
    )
    max_len_a: float = field(default=1.2, metadata={"help": "search max length = a * source length + b"})
    max_len_b: int = field(default=10, metadata={"help": "search max length = a * source length + b"})


_SENTENCE_BLEU = BLEU(tokenize="none", effective_order=True)


def sentence_bleu(hyp: list, ref: list) -> float:
    """Smoothed sentence BLEU in [0, 1] of two token-id sequences (EOS and pad removed)."""
    if not hyp:
        return 0.0
    return _SENTENCE_BLEU.sentence_score(" ".join(map(str, hyp)), [" ".join(map(str, ref))]).score / 100.0


def hamming_loss(match: torch.Tensor, ref_len: int) -> torch.Tensor:
    """Relaxed token errors: sum over the reference's positions (EOS included) of 1 - P(match).

    match: (hyp_len,) soft probability that hypothesis position t holds reference token t.
    """
    n = min(ref_len, match.numel())
    return ref_len - match[:n].sum()


def risk_loss(scores: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """Expected cost under the softmax of the hypotheses' normalised scores. scores, costs: (n,)."""
    return (torch.softmax(scores, dim=0) * costs).sum()


@register_criterion("soft_beam", dataclass=SoftBeamCriterionConfig)
class SoftBeamCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        beam_loss="hamming",
        mle_weight=0.5,
        search_fraction=1.0,
        max_len_a=1.2,
        max_len_b=10,
        ignore_prefix_size=0,
        report_accuracy=False,
    ):
        if not isinstance(task, TranslationSoftBeamTask):
            raise ValueError(f"the soft_beam criterion needs --task translation_soft_beam, got the task {type(task).__name__}")
        if not 0.0 <= mle_weight <= 1.0:
            raise ValueError(f"--mle-weight must be in [0, 1], got {mle_weight}")
        if not 0.0 < search_fraction <= 1.0:
            raise ValueError(f"--search-fraction must be in (0, 1], got {search_fraction}")
        if max_len_b < 1 or max_len_a < 0:
            raise ValueError(f"--max-len-a must be >= 0 and --max-len-b >= 1, got {max_len_a} and {max_len_b}")
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.beam_loss = str(beam_loss)
        self.mle_weight = mle_weight
        self.search_fraction = search_fraction
        search = task.training_search_config()
        self.search = SearchConfig(**{**search.__dict__, "max_len_a": max_len_a, "max_len_b": max_len_b})

    def forward(self, model, sample, reduce=True):
        if wrapped_in_c10d_ddp(model):
            raise ValueError(
                "the soft_beam criterion calls the decoder step by step, which c10d DDP cannot see; "
                "use --ddp-backend legacy_ddp (or no_c10d)"
            )
        fs_model = unwrap_model(model)
        net_input = sample["net_input"]
        encoder_out = fs_model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])

        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mle_weight > 0):
            net_output = fs_model.decoder(net_input["prev_output_tokens"], encoder_out=encoder_out, src_lengths=net_input["src_lengths"])
            mle_loss, nll_loss = self.compute_loss(fs_model, net_output, sample, reduce=True)

        # Validation searches every sentence: its loss, which picks checkpoint_best, must not depend on a draw.
        fraction = self.search_fraction if fs_model.training else 1.0
        beam_loss, top_bleu, searched, stats = self.search_loss(fs_model, sample, encoder_out, fraction)
        loss = self.mle_weight * mle_loss + (1 - self.mle_weight) * beam_loss

        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "mle_loss": mle_loss.data,
            "beam_loss": beam_loss.data,
            "top_bleu": top_bleu,
            "searched": searched,
            "solver_iters": float(sum(stats.solver_iterations)),
            "solver_calls": len(stats.solver_iterations),
            "marginal_error": float(sum(stats.marginal_errors)),
            "search_steps": stats.steps,
            "batches": 1,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        return loss, sample_size, logging_output

    def search_loss(self, model, sample, encoder_out, fraction=None):
        """Runs the soft beam search on the whole batch or, with a ``fraction`` (default:
        --search-fraction) below 1, on a random subset of its sentences. Returns the beam loss
        summed over sentences and scaled to the whole batch, the top beams' summed sentence BLEU,
        the number of sentences searched, and the search's stats."""
        net_input = sample["net_input"]
        src_tokens = net_input["src_tokens"]
        target = sample["target"]  # (B, T) ending with EOS, right-padded
        batch = src_tokens.shape[0]
        fraction = self.search_fraction if fraction is None else fraction
        searched = batch if fraction >= 1 else max(1, math.ceil(fraction * batch))
        if searched < batch:
            # the global RNG, which fairseq seeds: runs repeat, and each update draws anew
            keep = torch.randperm(batch)[:searched].sort().values.to(src_tokens.device)  # (searched,)
            src_tokens, target = src_tokens[keep], target[keep]  # (searched, S), (searched, T)
            net_input = {"src_tokens": src_tokens, "src_lengths": net_input["src_lengths"][keep]}
            encoder_out = model.encoder.reorder_encoder_out(encoder_out, keep)
        bsz, src_len = src_tokens.shape
        tgt_dict = self.task.target_dictionary
        eos, pad = tgt_dict.eos(), tgt_dict.pad()
        stats = SearchStats()
        step_model = FairseqStepModel(model, net_input, self.search.beam, encoder_out=encoder_out)
        finalized = beam_search(
            step_model, bsz, src_len, self.search, bos=eos, eos=eos, pad=pad, unk=tgt_dict.unk(),
            device=src_tokens.device, reference=target if self.beam_loss == "hamming" else None, stats=stats,
        )  # fmt: skip

        losses, top_bleu = [], 0.0
        for s, hyps in enumerate(finalized):
            ref = [t for t in target[s].tolist() if t not in (pad, eos)]
            ref_len = len(ref) + 1  # with EOS
            token_lists = [[t for t in h.tokens.tolist() if t not in (pad, eos)] for h in hyps]
            top_bleu += sentence_bleu(token_lists[0], ref)
            if self.beam_loss == "hamming":
                losses.append(hamming_loss(hyps[0].reference_match, ref_len))
            else:
                scores = torch.stack([h.score for h in hyps])
                if scores.dtype in (torch.float16, torch.bfloat16):
                    scores = scores.float()
                costs = torch.tensor([1.0 - sentence_bleu(t, ref) for t in token_lists], dtype=scores.dtype,
                                     device=src_tokens.device)  # fmt: skip
                # Scaled by the reference length, so that it sums over tokens like the MLE loss.
                losses.append(ref_len * risk_loss(scores, costs))
        # batch / searched: an unbiased estimate of the whole batch's sum, as the MLE term is
        return torch.stack(losses).sum() * (batch / bsz), top_bleu, bsz, stats

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)

        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        sample_size = total("sample_size")
        searched = total("searched")
        metrics.log_scalar("beam_loss", total("beam_loss") / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("mle_loss", total("mle_loss") / sample_size / math.log(2), sample_size, round=3)
        if searched:
            metrics.log_scalar("top_bleu", 100 * total("top_bleu") / searched, searched, round=2)
        calls = total("solver_calls")
        if calls:
            metrics.log_scalar("solver_iters", total("solver_iters") / calls, calls, round=1)
            metrics.log_scalar("marginal_err", total("marginal_error") / calls, calls, round=6)
        metrics.log_scalar("search_steps", total("search_steps") / max(total("batches"), 1), round=1)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        # Summable logs take fairseq's all_reduce path; the other path (all_gather_list)
        # allocates CUDA buffers and fails on CPU-only distributed runs.
        return True
