"""soft_beam.losses and the search's TokenFeatures hook, on the pure-torch test double."""

import pytest
import torch
from step_models import BOS, EOS, PAD, UNK, RecurrentBigram

from soft_beam.losses import BEAM_LOSSES, ExpectedRisk, LossOptions, ReferenceHits, RelaxedHamming, expected_risk, relaxed_hamming
from soft_beam.search import Hypothesis, SearchConfig, beam_search

pytestmark = pytest.mark.usefixtures("one_thread")
V = 10


def search(params, cfg, features=None, sentences=4):
    return beam_search(params.start(cfg.beam), sentences, 5, cfg, bos=BOS, eos=EOS, pad=PAD, unk=UNK,
                       device=torch.device("cpu"), features=features)  # fmt: skip


class OneHotTokens:
    """A loss-side feature the search has never heard of: the token itself, one-hot (F = V)."""

    size = V

    def __call__(self, tokens, sentences, step):
        return torch.nn.functional.one_hot(tokens, V).double()  # (S, M, V)


def config(beam=3, epsilon=0.0, **kw):
    return SearchConfig(beam=beam, epsilon=epsilon, max_len_a=1.0, max_len_b=3, tol=1e-10, max_iter=200, **kw)


def test_hard_search_tracks_each_hypothesis_own_tokens():
    # Reordering beams must carry each beam's history: the features are the hypothesis's tokens.
    params = RecurrentBigram(sentences=4, vocab=V, seed=3)
    hyps = search(params, config(beam=3), OneHotTokens())
    for sentence in hyps:
        assert len(sentence) == 3
        for h in sentence:
            assert torch.equal(h.features, torch.nn.functional.one_hot(h.tokens, V).double())


def test_soft_search_features_are_mixtures_that_tend_to_the_hard_ones():
    params = RecurrentBigram(sentences=4, vocab=V, seed=4, sharpness=5.0)
    for s, h in enumerate(search(params, config(beam=3, epsilon=0.3), OneHotTokens())):
        f = h[0].features  # (length, V): at each position a distribution over tokens
        torch.testing.assert_close(f.sum(-1), torch.ones(f.shape[0], dtype=f.dtype), rtol=0, atol=1e-9)
        assert f[:-1].max() < 1 - 1e-3, s  # really mixed at this epsilon (the last, EOS, is its own)
    # Near-ties stay soft until epsilon is below their gap (epsilon is relative to each step's
    # score range), so the top hypotheses agree with the hard search's as epsilon falls
    # (measured: 1, 3, 4 of 4 sentences), and then so do their features.
    hard = [h[0] for h in search(params, config(beam=3), OneHotTokens())]
    agree = []
    for eps in (1e-2, 1e-3, 1e-4):
        top = [h[0] for h in search(params, config(beam=3, epsilon=eps), OneHotTokens())]
        agree.append(sum(torch.equal(a.tokens, b.tokens) for a, b in zip(top, hard)))
    assert agree == sorted(agree) and agree[0] < 4 == agree[-1], agree
    for a, b in zip(top, hard):
        torch.testing.assert_close(a.features, b.features, rtol=0, atol=1e-6)


def test_reference_hits_give_the_hamming_distance_in_a_hard_search():
    params = RecurrentBigram(sentences=4, vocab=V, seed=5)
    g = torch.Generator().manual_seed(0)
    target = torch.randint(4, V, (4, 6), generator=g)  # (B, T) content tokens
    lengths = [3, 6, 2, 4]
    for s, n in enumerate(lengths):
        target[s, n - 1] = EOS
        target[s, n:] = PAD
    hyps = search(params, config(beam=2), ReferenceHits(target, PAD))
    for s, n in enumerate(lengths):
        h = hyps[s][0]
        hits = sum(int(h.tokens[t] == target[s, t]) for t in range(min(n, len(h.tokens))))
        assert float(relaxed_hamming(h.features[:, 0], n)) == n - hits
        assert float(RelaxedHamming(LossOptions(EOS, PAD)).sentence_loss(hyps[s], target[s, : n - 1].tolist())) == n - hits


def test_relaxed_hamming_gradient_through_the_soft_search_matches_finite_differences():
    params = RecurrentBigram(sentences=3, vocab=V, seed=7, sharpness=2.0)
    target = torch.tensor([[4, 5, 6, EOS], [7, 7, EOS, PAD], [5, 4, 9, EOS]])
    loss_fn = RelaxedHamming(LossOptions(EOS, PAD))
    cfg = config(beam=2, epsilon=0.2, state_grad="full")

    def loss():
        hyps = search(params, cfg, loss_fn.features(target), sentences=3)
        refs = [[t for t in row.tolist() if t not in (EOS, PAD)] for row in target]
        return sum(loss_fn.sentence_loss(h, r) for h, r in zip(hyps, refs))

    value = loss()
    value.backward()
    g = torch.Generator().manual_seed(1)
    for name, p in params.parameters().items():
        d = torch.randn(p.shape, generator=g, dtype=p.dtype)
        analytic = float((p.grad * d).sum())
        with torch.no_grad():
            p += 1e-6 * d
            up = float(loss())
            p -= 2e-6 * d
            down = float(loss())
            p += 1e-6 * d
        numeric = (up - down) / 2e-6
        assert abs(analytic) > 1e-3, name  # the loss reaches every parameter
        assert abs(numeric - analytic) <= 1e-5 * abs(analytic), (name, numeric, analytic)


def hyp(tokens, score):
    t = torch.tensor(tokens)
    return Hypothesis(t, torch.tensor(score, dtype=torch.float64, requires_grad=True), torch.zeros(len(tokens)), None)


def test_expected_risk_is_the_softmax_weighted_cost_scaled_by_the_reference_length():
    scores = torch.tensor([0.0, -1.0, -3.0], dtype=torch.float64)
    costs = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    p = torch.softmax(scores, 0)
    torch.testing.assert_close(expected_risk(scores, costs), (p * costs).sum())
    reference = [4, 5, 6]
    hyps = [hyp([4, 5, 6, EOS], -0.1), hyp([9, 9, EOS], -0.5)]  # exact copy: cost 0
    loss = ExpectedRisk(LossOptions(EOS, PAD)).sentence_loss(hyps, reference)
    q = torch.softmax(torch.tensor([-0.1, -0.5], dtype=torch.float64), 0)
    torch.testing.assert_close(loss, 4 * q[1] * 1.0)  # (3 + EOS) * P(second) * (1 - BLEU 0)
    loss.backward()
    assert hyps[0].score.grad < 0 < hyps[1].score.grad  # moves mass to the better hypothesis


@pytest.mark.parametrize("name", sorted(BEAM_LOSSES))
def test_every_registered_loss_states_whether_it_needs_a_soft_search(name):
    """needs_soft_search is True exactly when the loss has no gradient through a hard search (the
    criterion refuses epsilon 0 for it); such a loss must track features, its only path."""
    loss_fn = BEAM_LOSSES[name](LossOptions(EOS, PAD))
    params = RecurrentBigram(sentences=3, vocab=V, seed=6)
    target = torch.tensor([[4, 5, 6, EOS], [7, 7, EOS, PAD], [5, 4, 9, EOS]])
    hyps = search(params, config(beam=2), loss_fn.features(target), sentences=3)
    refs = [[t for t in row.tolist() if t not in (EOS, PAD)] for row in target]
    loss = sum(loss_fn.sentence_loss(h, r) for h, r in zip(hyps, refs))
    assert loss_fn.needs_soft_search == (not torch.is_tensor(loss) or not loss.requires_grad)
    if loss_fn.needs_soft_search:
        assert loss_fn.features(target) is not None


def test_training_through_the_soft_search_on_the_hamming_loss_cuts_the_hard_searchs_errors():
    """The point of the project, in miniature: 30 Adam steps on the relaxed Hamming loss of the
    soft search (no MLE term) make the *hard* search's top hypotheses closer to the references
    (measured: 28 -> 17 token errors of 30). With the soft top-k's weights detached where they
    mix the candidates' features, it fell only to 26 (measured)."""
    params = RecurrentBigram(sentences=6, vocab=V, seed=0)
    target = torch.randint(4, V, (6, 5), generator=torch.Generator().manual_seed(1))  # (B, T)
    target[:, -1] = EOS
    references = [row[:-1].tolist() for row in target]
    loss_fn = RelaxedHamming(LossOptions(EOS, PAD))
    hard, soft = SearchConfig(beam=3, max_len_b=6), SearchConfig(beam=3, epsilon=0.3, max_len_b=6)

    def errors():
        with torch.no_grad():
            hyps = beam_search(params.start(3), 6, 5, hard, bos=BOS, eos=EOS, pad=PAD, unk=UNK,
                               device=torch.device("cpu"), features=loss_fn.features(target))  # fmt: skip
        return sum(float(loss_fn.sentence_loss(h, r)) for h, r in zip(hyps, references))

    before = errors()
    optimizer = torch.optim.Adam(list(params.parameters().values()), lr=0.05)
    for _ in range(30):
        optimizer.zero_grad()
        hyps = beam_search(params.start(3), 6, 5, soft, bos=BOS, eos=EOS, pad=PAD, unk=UNK,
                           device=torch.device("cpu"), features=loss_fn.features(target))  # fmt: skip
        sum(loss_fn.sentence_loss(h, r) for h, r in zip(hyps, references)).backward()
        optimizer.step()
    assert errors() <= 0.75 * before, (before, errors())
