"""Criterion ``soft_beam``: label-smoothed MLE mixed with a loss on a beam search run inside
training, whose beam selection is the SOFT top-k, so the loss's gradient flows through the search.

It owns the training search's options, so it works with any translation task (``--task
translation`` too). The losses themselves are ``soft_beam.losses``; this module only adapts.

(No ``from __future__ import annotations`` here: fairseq reads the config's field types at runtime.)
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.dataclass import ChoiceEnum

from soft_beam.losses import BEAM_LOSSES, LossOptions, content_ids, sentence_bleu
from soft_beam.search import SearchConfig, SearchStats, beam_search

from .decoding import FairseqStepModel, unwrap_model, wrapped_in_c10d_ddp
from .fairseq_shim import trainer_num_updates
from .search_options import EpsilonSchedule, check_target_dictionary, length_capped, validated


@dataclass
class SoftBeamCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    beam_loss: ChoiceEnum(list(BEAM_LOSSES)) = field(
        default="hamming",
        metadata={
            "help": "loss on the search result: 'hamming' (relaxed token errors of the top hypothesis "
            "against the reference; needs --soft-beam-epsilon > 0), 'risk' (expected 1 - sentence BLEU under "
            "the softmax of the final hypothesis scores; with --soft-beam-epsilon 0, minimum-risk training over the beam) "
            "or 'bleu' (the same expectation of 1 - soft BLEU: expected n-gram matches from the soft probabilities that "
            "each position holds each reference token, which the search's weights mix; add-1 smoothed sentence BLEU "
            "in the hard limit, so with --soft-beam-epsilon 0 it is MRT too)"
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
    soft_beam_size: int = field(default=4, metadata={"help": "beam size k of the search inside training"})
    soft_beam_epsilon: float = field(
        default=0.01,
        metadata={
            "help": "entropic regularisation of the SOFT top-k in training (relative to a per-step cost "
            "normalised to [0, 1]); smaller is closer to hard beam search, 0 is hard beam search"
        },
    )
    soft_beam_epsilon_final: Optional[float] = field(  # noqa: UP045 (fairseq parses typing.Optional)
        default=None,
        metadata={
            "help": "anneal epsilon from --soft-beam-epsilon to this value, geometrically, over "
            "--soft-beam-epsilon-anneal-updates updates, then keep it; default: no schedule"
        },
    )
    soft_beam_epsilon_anneal_updates: int = field(
        default=0,
        metadata={"help": "updates over which epsilon goes from --soft-beam-epsilon to --soft-beam-epsilon-final (the trainer's count)"},
    )
    soft_beam_candidates: Optional[int] = field(  # noqa: UP045 (fairseq parses typing.Optional, not X | None)
        default=None,
        metadata={"help": "candidates (beam, token) per sentence that the soft top-k ranks; default 2 * k * k; at least 2 * k"},
    )
    soft_beam_tol: float = field(default=1e-4, metadata={"help": "solver tolerance: relative marginal error of the soft top-k"})
    soft_beam_min_span: float = field(
        # 0.5: under every span measured on the trained Multi30k model (the smallest of 24071 rows was
        # 1.16 nats, scripts/bench_spans.py), so it changes nothing there, and it still bounds a
        # near-tie's gradient where candidates are fewer or the model is fresh (docs/benchmarks.md)
        default=0.5,
        metadata={
            "help": "floor on each step's candidate score range (nats) in the soft top-k's normalisation: below it "
            "epsilon is absolute rather than relative to the range, so near-ties give a smooth plan and a gradient "
            "entry at most 1 / (2 * epsilon * floor); 0: always relative"
        },
    )
    soft_beam_state_grad: ChoiceEnum(["full", "values"]) = field(
        default="values",
        metadata={
            "help": "'full': the exact gradient of the relaxed search, also through the soft-top-k weights "
            "that mix the next decoder inputs and states; 'values': those mixtures pass gradient to the "
            "mixed values only (the weights still get it through beam scores and the loss). 'full' compounds "
            "over decoding steps: 1e4 to 4e5 per token on a trained model, against about 1 for MLE"
        },
    )
    risk_sharpness: float = field(
        default=1.0,
        metadata={
            "help": "MRT's alpha (Shen et al. 2016) for --beam-loss risk and bleu: the risk's distribution over the n-best "
            "is softmax(alpha * score), with the scores length-normalised log-probs"
        },
    )
    max_len_a: float = field(default=1.2, metadata={"help": "search max length = a * source length + b"})
    max_len_b: int = field(default=10, metadata={"help": "search max length = a * source length + b"})


# SearchConfig, LossOptions and EpsilonSchedule field -> this criterion's option, for error messages
OPTION_NAMES = {
    "beam": "--soft-beam-size",
    "epsilon": "--soft-beam-epsilon",
    "epsilon_final": "--soft-beam-epsilon-final",
    "epsilon_anneal_updates": "--soft-beam-epsilon-anneal-updates",
    "candidates": "--soft-beam-candidates",
    "tol": "--soft-beam-tol",
    "min_span": "--soft-beam-min-span",
    "state_grad": "--soft-beam-state-grad",
    "max_len_a": "--max-len-a",
    "max_len_b": "--max-len-b",
    "risk_sharpness": "--risk-sharpness",
}


@register_criterion("soft_beam", dataclass=SoftBeamCriterionConfig)
class SoftBeamCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, cfg: SoftBeamCriterionConfig):
        if not 0.0 <= cfg.mle_weight <= 1.0:
            raise ValueError(f"--mle-weight must be in [0, 1], got {cfg.mle_weight}")
        if not 0.0 < cfg.search_fraction <= 1.0:
            raise ValueError(f"--search-fraction must be in (0, 1], got {cfg.search_fraction}")
        self.search = validated(
            OPTION_NAMES, SearchConfig, beam=cfg.soft_beam_size, epsilon=cfg.soft_beam_epsilon, candidates=cfg.soft_beam_candidates,
            tol=cfg.soft_beam_tol, min_span=cfg.soft_beam_min_span, state_grad=str(cfg.soft_beam_state_grad),
            max_len_a=cfg.max_len_a, max_len_b=cfg.max_len_b,
        )  # fmt: skip
        self.epsilon_schedule = validated(
            OPTION_NAMES, EpsilonSchedule, epsilon=cfg.soft_beam_epsilon, epsilon_final=cfg.soft_beam_epsilon_final,
            epsilon_anneal_updates=cfg.soft_beam_epsilon_anneal_updates,
        )  # fmt: skip
        self.num_updates = 0
        tgt_dict = getattr(task, "target_dictionary", None)
        if tgt_dict is None:
            raise ValueError(f"the soft_beam criterion needs a translation task with a target dictionary, got {type(task).__name__}")
        check_target_dictionary(tgt_dict)
        options = validated(OPTION_NAMES, LossOptions, eos=tgt_dict.eos(), pad=tgt_dict.pad(), risk_sharpness=cfg.risk_sharpness)
        self.loss = BEAM_LOSSES[str(cfg.beam_loss)](options)
        if self.loss.needs_soft_search and self.search.epsilon == 0:
            raise ValueError(f"--beam-loss {cfg.beam_loss} has no gradient through a hard search: set --soft-beam-epsilon > 0")
        super().__init__(task, cfg.sentence_avg, cfg.label_smoothing, cfg.ignore_prefix_size, cfg.report_accuracy)
        self.mle_weight = cfg.mle_weight
        self.search_fraction = cfg.search_fraction

    def set_num_updates(self, num_updates: int) -> None:
        """The update count that the epsilon schedule follows. ``forward`` sets it from fairseq's
        trainer (:func:`fairseq_shim.trainer_num_updates`) where it publishes one; validation keeps the last
        training forward's count; other drivers call this."""
        if not (isinstance(num_updates, int) and num_updates >= 0):
            raise ValueError(f"num_updates must be an integer >= 0, got {num_updates!r}")
        self.num_updates = num_updates

    @property
    def epsilon(self) -> float:
        """The training search's epsilon at the current update (--soft-beam-epsilon without a schedule)."""
        return self.epsilon_schedule.at(self.num_updates)

    def forward(self, model, sample, reduce=True):
        if wrapped_in_c10d_ddp(model):
            raise ValueError(
                "the soft_beam criterion calls the decoder step by step, which c10d DDP cannot see; "
                "use --ddp-backend legacy_ddp (or no_c10d)"
            )
        trainer_updates = trainer_num_updates()
        if trainer_updates is not None:
            self.set_num_updates(trainer_updates)
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
            "unconverged": stats.unconverged,
            "search_steps": stats.steps,
            "epsilon": self.epsilon,
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
        batch = sample["target"].shape[0]
        net_input, target, encoder_out = _searched_part(model, sample, encoder_out, self.search_fraction if fraction is None else fraction)
        src_tokens = net_input["src_tokens"]
        bsz, src_len = src_tokens.shape
        tgt_dict = self.task.target_dictionary
        special = (tgt_dict.eos(), tgt_dict.pad())
        stats = SearchStats()
        cfg = length_capped(dataclasses.replace(self.search, epsilon=self.epsilon), model)
        finalized = beam_search(
            FairseqStepModel(model, net_input, self.search.beam, encoder_out=encoder_out), bsz, src_len,
            cfg, bos=tgt_dict.eos(), eos=tgt_dict.eos(), pad=tgt_dict.pad(), unk=tgt_dict.unk(),
            device=src_tokens.device, features=self.loss.features(target), stats=stats,
        )  # fmt: skip
        losses, top_bleu = [], 0.0
        for s, hyps in enumerate(finalized):
            reference = content_ids(target[s], special)
            top_bleu += sentence_bleu(content_ids(hyps[0].tokens, special), reference)
            losses.append(self.loss.sentence_loss(hyps, reference))
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
            # soft top-k rows that missed --soft-beam-tol, per update: the search used their plans as they were
            metrics.log_scalar("unconverged", total("unconverged") / max(total("batches"), 1), round=2)
        metrics.log_scalar("search_steps", total("search_steps") / max(total("batches"), 1), round=1)
        if total("batches"):
            metrics.log_scalar("epsilon", total("epsilon") / total("batches"), round=6)  # the training search's, at this update

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        # Summable logs take fairseq's all_reduce path; the other path (all_gather_list)
        # allocates CUDA buffers and fails on CPU-only distributed runs.
        return True


def _searched_part(model, sample, encoder_out, fraction):
    """The net input (src_tokens, src_lengths), targets and encoder output of the sentences to
    search: all of them, or a random ``fraction`` of them (at least one)."""
    net_input, target = sample["net_input"], sample["target"]  # target (B, T) ending with EOS, right-padded
    src_tokens = net_input["src_tokens"]
    batch = src_tokens.shape[0]
    searched = batch if fraction >= 1 else max(1, math.ceil(fraction * batch))
    if searched == batch:
        return net_input, target, encoder_out
    # the global RNG, which fairseq seeds: runs repeat, and each update draws anew
    keep = torch.randperm(batch)[:searched].sort().values.to(src_tokens.device)  # (searched,)
    part = {"src_tokens": src_tokens[keep], "src_lengths": net_input["src_lengths"][keep]}  # (searched, S), (searched,)
    return part, target[keep], model.encoder.reorder_encoder_out(encoder_out, keep)
