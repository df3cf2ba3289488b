"""soft_beam.losses.expected_bleu and the ExpectedBleu loss (--beam-loss bleu), on the pure-torch test double."""

import random

import pytest
import torch
from sacrebleu.metrics import BLEU
from step_models import BOS, EOS, PAD, UNK, RecurrentBigram

from soft_beam.losses import ExpectedBleu, LossOptions, ReferenceTokens, content_ids, expected_bleu
from soft_beam.search import SearchConfig, beam_search

pytestmark = pytest.mark.usefixtures("one_thread")
V = 8


def sacrebleu_add_k(hyp: list[int], ref: list[int], k=1.0, order=4) -> float:
    bleu = BLEU(tokenize="none", smooth_method="add-k", smooth_value=k, max_ngram_order=order, effective_order=True)
    return bleu.sentence_score(" ".join(map(str, hyp)), [" ".join(map(str, ref))]).score / 100


def hard_p(hyp: list[int], ref: list[int]) -> torch.Tensor:
    """0/1 matches (L, R): what a hard search's ReferenceTokens give."""
    return torch.tensor([[float(h == r) for r in ref] for h in hyp], dtype=torch.float64).reshape(len(hyp), len(ref))


# by hand: clipping (the hypothesis repeats 4 more often than the reference), a reference that
# repeats an n-gram (dedup by identity), an exact copy, no match, shorter than the order, empty
CASES = [
    ([4, 4, 4, 4, 5], [4, 5, 6, 7]),
    ([4, 5, 4, 5, 4, 5], [4, 5, 6, 4, 5, 7, 4, 5]),
    ([6, 7, 4, 5, 6], [6, 7, 4, 5, 6]),
    ([4, 4, 5], [6, 7, 6, 7]),
    ([5, 6], [4, 5, 6, 7, 4]),
    ([], [4, 5]),
    ([4, 5, 6], []),
]


@pytest.mark.parametrize("k, order", [(1.0, 4), (0.5, 4), (1.0, 2)])
def test_hard_limit_is_sacrebleus_add_k_sentence_bleu(k, order):
    rng = random.Random(0)
    pairs = CASES + [([rng.randint(4, 7) for _ in range(rng.randint(1, 12))], [rng.randint(4, 7) for _ in range(rng.randint(1, 12))])
                     for _ in range(200)]  # fmt: skip
    for hyp, ref in pairs:
        want = sacrebleu_add_k(hyp, ref, k, order)
        got = float(expected_bleu(hard_p(hyp, ref), ref, max_order=order, smooth=k))
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (hyp, ref)
    # the by-hand cases exercise the clip and the dedup: without either these two would differ
    assert sacrebleu_add_k(*CASES[0]) == pytest.approx(float(expected_bleu(hard_p(*CASES[0]), CASES[0][1])), rel=1e-12)
    assert 0 < sacrebleu_add_k(*CASES[1]) < 1


def test_a_batch_of_zero_padded_hypotheses_scores_each_as_alone():
    ref = [4, 5, 6, 4, 5]
    hyps = [[4, 5, 6], [4, 5, 6, 4, 5, 7, 7], [5]]
    p = torch.zeros(3, 7, 5, dtype=torch.float64)  # (H, L, R)
    for h, hyp in enumerate(hyps):
        p[h, : len(hyp)] = hard_p(hyp, ref)
    got = expected_bleu(p, ref, hyp_len=torch.tensor([len(h) for h in hyps]))
    torch.testing.assert_close(got, torch.tensor([sacrebleu_add_k(h, ref) for h in hyps], dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("scale", [0.14, 0.9])
def test_gradient_matches_finite_differences(scale):
    """At scale 0.14 no expected count reaches its reference count, so every entry has a gradient;
    at 0.9 most unigram counts are clipped (the hard min: no gradient past the clip)."""
    g = torch.Generator().manual_seed(0)
    p = (0.01 + scale * torch.rand(2, 6, 5, generator=g, dtype=torch.float64)).requires_grad_()  # (H, L, R)
    ref = [4, 5, 4, 5, 6]  # a repeated bigram: the dedup's mean is on the gradient's path
    hyp_len = torch.tensor([6, 4])
    with torch.no_grad():
        p[1, 4:] = 0  # rows past hyp_len are padding
    assert torch.autograd.gradcheck(lambda q: expected_bleu(q, ref, hyp_len), (p,), eps=1e-6, atol=1e-9, rtol=1e-6)
    expected_bleu(p, ref, hyp_len).sum().backward()
    if scale < 0.5:
        assert p.grad[0].abs().min() > 0 and p.grad[1, :4].abs().min() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"p": torch.zeros(5)}, "p must be a floating"),
        ({"p": torch.zeros(2, 3, dtype=torch.long)}, "p must be a floating"),
        ({"reference": [4, 5]}, "reference must hold p's R = 3"),
        ({"hyp_len": torch.tensor([2, 2])}, "hyp_len must have p's batch shape"),
        ({"max_order": 0}, "max_order must be an integer >= 1"),
        ({"smooth": 0.0}, "smooth must be a finite number > 0"),
    ],
)
def test_bad_input_raises_value_error_naming_it(kwargs, message):
    args = {"p": torch.zeros(2, 3), "reference": [4, 5, 6], **kwargs}
    with pytest.raises(ValueError, match=message):
        expected_bleu(**args)


def references(sentences=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(4, V, (sentences, 7), generator=g)  # (B, T) few token types: n-grams recur
    for s, n in enumerate([4, 7, 3, 6][:sentences]):
        target[s, n - 1] = EOS
        target[s, n:] = PAD
    return target


def search(params, cfg, target, loss_fn):
    return beam_search(params.start(cfg.beam), target.shape[0], 5, cfg, bos=BOS, eos=EOS, pad=PAD, unk=UNK,
                       device=torch.device("cpu"), features=loss_fn.features(target))  # fmt: skip


def test_in_a_hard_search_the_loss_is_mrt_with_sacrebleus_add_1_bleu():
    params = RecurrentBigram(sentences=4, vocab=V, seed=2)
    target = references()
    loss_fn = ExpectedBleu(LossOptions(EOS, PAD, risk_sharpness=2.0))
    hyps = search(params, SearchConfig(beam=3, max_len_b=6), target, loss_fn)
    for s, sentence in enumerate(hyps):
        ref = content_ids(target[s], (EOS, PAD))
        q = torch.softmax(2.0 * torch.stack([h.score.detach() for h in sentence]), 0)
        bleu = torch.tensor([sacrebleu_add_k(content_ids(h.tokens, (EOS, PAD)), ref) for h in sentence], dtype=q.dtype)
        loss = loss_fn.sentence_loss(sentence, ref)
        torch.testing.assert_close(loss.detach(), (len(ref) + 1) * (q * (1 - bleu)).sum(), rtol=1e-12, atol=1e-12)
        assert loss.requires_grad  # through the scores: MRT


def test_reference_tokens_mark_every_position_of_a_matching_token():
    target = torch.tensor([[4, 5, 4, EOS, PAD], [6, EOS, PAD, PAD, PAD]])
    tokens = torch.tensor([[4, 5, EOS], [6, 4, PAD]])  # (S, M)
    f = ReferenceTokens(target, EOS, PAD)(tokens, torch.tensor([0, 1]), step=3)
    want = torch.tensor([[[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]])
    assert torch.equal(f, want.float())


def test_training_through_the_soft_search_on_the_bleu_loss_raises_the_hard_searchs_bleu():
    """20 Adam steps on the expected-BLEU loss of the soft search (no MLE term) raise the add-1
    sentence BLEU of the *hard* search's top hypotheses, summed over 4 sentences (measured:
    0.91 -> 2.37). With the tracked features detached, so that only the scores carry the gradient
    (MRT's path), it rose to 1.60 (measured): the soft n-gram matches do the rest."""
    params = RecurrentBigram(sentences=4, vocab=V, seed=0)
    target = references()
    refs = [content_ids(row, (EOS, PAD)) for row in target]
    loss_fn = ExpectedBleu(LossOptions(EOS, PAD))
    hard, soft = SearchConfig(beam=3, max_len_b=6), SearchConfig(beam=3, epsilon=0.3, max_len_b=6)

    def top_bleu():
        with torch.no_grad():
            hyps = search(params, hard, target, loss_fn)
        return sum(sacrebleu_add_k(content_ids(h[0].tokens, (EOS, PAD)), r) for h, r in zip(hyps, refs))

    before = top_bleu()
    optimizer = torch.optim.Adam(list(params.parameters().values()), lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        hyps = search(params, soft, target, loss_fn)
        sum(loss_fn.sentence_loss(h, r) for h, r in zip(hyps, refs)).backward()
        optimizer.step()
    assert top_bleu() >= before + 1.0, (before, top_bleu())
