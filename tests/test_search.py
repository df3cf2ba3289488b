"""Fast tests of soft_beam.search.beam_search on a pure-torch StepModel (no fairseq, no training).

The double (tests/step_models.py) is a seeded recurrent bigram model in float64: each sentence
has its own initial state and every row's state feeds its next log-probs, so a wrong reorder,
mix or drop of finished sentences changes the hypotheses.
"""

import math

import pytest
import torch
from step_models import BOS, EOS, PAD, UNK, RecurrentBigram

from soft_beam.search import SearchConfig, SearchStats, SettingError, beam_search, candidate_scores

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def config(beam, epsilon=0.0, **kw):
    """Candidates explicit (2 beam^2) so that the config means the same before and after its default changed."""
    return SearchConfig(beam=beam, epsilon=epsilon, candidates=2 * beam * beam, **kw)


def search(model, cfg, sentences=None, src_len=5, stats=None, wrap=None):
    """Runs beam_search on a fresh state of ``model`` over ``sentences`` (default: all of them)."""
    step_model = model.start(cfg.beam, sentences)
    if wrap is not None:
        step_model = wrap(step_model)
    n = model.h0.shape[0] if sentences is None else len(sentences)
    return beam_search(step_model, n, src_len, cfg, bos=BOS, eos=EOS, pad=PAD, unk=UNK, device=CPU, stats=stats)


def max_len_of(cfg, src_len=5):
    cap = math.inf if cfg.max_len_cap is None else cfg.max_len_cap - 1
    return min(int(cfg.max_len_a * src_len + cfg.max_len_b), cap)


def edited(lprobs, step, max_len, min_len, unk_penalty):
    """fairseq's per-step edits of one row's log-probs (V,), written out."""
    lp = lprobs.clone()
    lp[PAD] = -math.inf
    lp[UNK] -= unk_penalty
    if step >= max_len:
        keep = lp[EOS].clone()
        lp[:] = -math.inf
        lp[EOS] = keep
    elif step < min_len:
        lp[EOS] = -math.inf
    return lp


def greedy(model, sentence, max_len, min_len=1, unk_penalty=0.0):
    """Greedy decoding of one sentence: tokens (length,) and per-token scores (length,)."""
    dec = model.start(1, [sentence])
    tokens, scores = [BOS], []
    for step in range(max_len + 1):
        lp = edited(dec.step(torch.tensor([tokens]), None)[0], step, max_len, min_len, unk_penalty)  # (V,)
        token = int(lp.argmax())
        tokens.append(token)
        scores.append(lp[token])
        if token == EOS:
            break
    return torch.tensor(tokens[1:]), torch.stack(scores).detach()


def rescore(model, sentence, tokens, unk_penalty=0.0):
    """Teacher-forces ``tokens`` (length,) through a fresh state: each token's edited log-prob (length,)."""
    dec = model.start(1, [sentence])
    prefix = torch.tensor([[BOS]])  # (1, t + 1)
    scores = []
    for token in tokens.tolist():
        lp = dec.step(prefix, None)[0]  # (V,)
        scores.append(lp[token] - (unk_penalty if token == UNK else 0.0))
        prefix = torch.cat([prefix, torch.tensor([[token]])], 1)
    return torch.stack(scores).detach()


# --- hard search ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "min_len,unk_penalty,eos_rate,max_len_b",
    [(1, 0.0, 0.3, 10), (3, 0.0, 0.3, 10), (1, 1.5, 0.3, 10), (1, -1.0, 0.3, 10), (1, 0.0, -0.5, 4)],
)
def test_hard_search_with_beam_1_is_greedy_decoding(min_len, unk_penalty, eos_rate, max_len_b):
    model = RecurrentBigram(sentences=6, eos_rate=eos_rate, seed=1)
    cfg = config(1, min_len=min_len, unk_penalty=unk_penalty, max_len_b=max_len_b)
    lengths = []
    for s, hyps in enumerate(search(model, cfg)):
        tokens, scores = greedy(model, s, max_len_of(cfg), min_len, unk_penalty)
        assert len(hyps) == 1
        assert torch.equal(hyps[0].tokens, tokens), (s, hyps[0].tokens, tokens)
        torch.testing.assert_close(hyps[0].positional_scores, scores, rtol=0, atol=1e-12)
        torch.testing.assert_close(hyps[0].score.detach(), scores.sum() / len(tokens), rtol=0, atol=1e-12)
        lengths.append(len(tokens))
    if eos_rate < 0:  # the case meant to reach max_len does
        assert max(lengths) == max_len_of(cfg) + 1, lengths
    assert len(set(lengths)) > 1 or eos_rate < 0, lengths  # sentences finish at different steps


@pytest.mark.parametrize("unk_penalty", [0.0, 1.0])
def test_hard_search_positional_scores_are_the_models_log_probs_of_its_tokens(unk_penalty):
    """Teacher-forcing each hypothesis through a fresh state gives back its scores: the search
    kept each beam's state with its tokens through every reorder (beam 4, sentences dropped)."""
    model = RecurrentBigram(sentences=5, eos_rate=0.2, seed=2)
    cfg = config(4, unk_penalty=unk_penalty, max_len_b=12)
    for s, hyps in enumerate(search(model, cfg)):
        for h in hyps:
            torch.testing.assert_close(h.positional_scores, rescore(model, s, h.tokens, unk_penalty), rtol=0, atol=1e-10)


# --- the rules every search keeps -----------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.0, 0.05])
@pytest.mark.parametrize("lenpen", [0.5, 1.0, 2.0])
def test_hypotheses_end_with_eos_fit_max_len_and_are_scored_by_lenpen(epsilon, lenpen):
    beam = 3
    model = RecurrentBigram(sentences=6, eos_rate=0.15, seed=3)
    cfg = config(beam, epsilon, lenpen=lenpen, max_len_a=0.5, max_len_b=4, tol=1e-10)
    max_len = max_len_of(cfg, src_len=6)  # int(0.5 * 6 + 4) = 7
    stats = SearchStats()
    out = search(model, cfg, src_len=6, stats=stats)
    assert len(out) == 6
    lengths = []
    for hyps in out:
        assert len(hyps) == beam
        scores = [float(h.score.detach()) for h in hyps]
        assert scores == sorted(scores, reverse=True)
        for h in hyps:
            n = len(h.tokens)
            lengths.append(n)
            assert h.tokens.dtype == torch.long and h.positional_scores.shape == (n,)
            assert int(h.tokens[-1]) == EOS and EOS not in h.tokens[:-1].tolist() and PAD not in h.tokens.tolist()
            assert 1 <= n <= max_len + 1
            assert h.score.requires_grad  # keeps its graph
            torch.testing.assert_close(h.score.detach(), h.positional_scores.sum() / n**lenpen, rtol=0, atol=1e-12)
        if epsilon == 0:  # distinct: at step 0 only one of the identical beams is expanded
            assert len({tuple(h.tokens.tolist()) for h in hyps}) == beam
    assert max(lengths) == max_len + 1 and min(lengths) < max_len + 1, lengths  # both ways of ending
    assert stats.steps == max(lengths)


@pytest.mark.parametrize(
    "max_len_a,max_len_b,max_len_cap,src_len,expected",
    [(0.0, 6, 100, 5, 6), (1.5, 2, 100, 3, 6), (0.0, 50, 8, 5, 7), (1.2, 5, 12, 10, 11)],
)
@pytest.mark.parametrize("epsilon", [0.0, 0.05])
def test_max_len_is_a_times_src_len_plus_b_capped_below_the_positions_limit(max_len_a, max_len_b, max_len_cap, src_len, expected, epsilon):
    """EOS all but banned: every hypothesis runs to max_len and gets EOS forced there."""
    model = RecurrentBigram(sentences=3, bias={EOS: -30.0}, seed=4)
    cfg = config(2, epsilon, max_len_a=max_len_a, max_len_b=max_len_b, max_len_cap=max_len_cap, tol=1e-10)
    assert max_len_of(cfg, src_len) == expected
    for hyps in search(model, cfg, src_len=src_len):
        assert [len(h.tokens) for h in hyps] == [expected + 1] * 2
        assert all(int(h.tokens[-1]) == EOS for h in hyps)


@pytest.mark.parametrize("epsilon", [0.0, 0.05])
def test_min_len_bans_eos_until_then(epsilon):
    model = RecurrentBigram(sentences=4, bias={EOS: 4.0}, seed=5)
    free = search(model, config(3, epsilon, max_len_b=8, tol=1e-10))
    assert min(len(h.tokens) for hyps in free for h in hyps) < 4  # EOS is wanted early
    out = search(model, config(3, epsilon, min_len=3, max_len_b=8, tol=1e-10))
    lengths = [len(h.tokens) for hyps in out for h in hyps]
    assert min(lengths) == 3 + 1, lengths  # min_len tokens before EOS, and EOS right after
    # min_len == max_len leaves one length
    out = search(model, config(2, epsilon, min_len=5, max_len_b=5, tol=1e-10))
    assert {len(h.tokens) for hyps in out for h in hyps} == {6}


def test_min_len_above_max_len_is_rejected():
    with pytest.raises(ValueError, match="min_len"):
        search(RecurrentBigram(sentences=2), config(2, min_len=6, max_len_b=5))


@pytest.mark.parametrize("epsilon", [0.0, 1e-6])
def test_unk_penalty_removes_or_favours_unk(epsilon):
    model = RecurrentBigram(sentences=6, bias={UNK: 1.0}, eos_rate=0.3, seed=6)

    def unks(penalty):
        out = search(model, config(2, epsilon, unk_penalty=penalty, max_len_b=8, tol=1e-12))
        return out, sum(int((h.tokens == UNK).sum()) for hyps in out for h in hyps)

    _, plain = unks(0.0)
    _, penalised = unks(100.0)
    favoured_out, favoured = unks(-2.0)
    assert penalised == 0 < plain < favoured, (penalised, plain, favoured)
    # The penalty is part of each score (fairseq's), also on the soft search's differentiable path.
    for s, hyps in enumerate(favoured_out):
        for h in hyps:
            torch.testing.assert_close(h.positional_scores, rescore(model, s, h.tokens, -2.0), rtol=0, atol=1e-9)
            torch.testing.assert_close(h.score.detach(), h.positional_scores.sum() / len(h.tokens), rtol=0, atol=1e-9)


class _NaNAt:
    """Wraps a step model: log-prob NaN for ``token`` on every row, as a broken model would give."""

    def __init__(self, inner, token):
        self.inner, self.token = inner, token

    def step(self, tokens, input_embedding):
        lprobs = self.inner.step(tokens, input_embedding).clone()  # (rows, V)
        lprobs[:, self.token] = math.nan
        return lprobs

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("epsilon", [0.0, 0.05])
def test_nan_log_probs_and_pad_are_never_chosen(epsilon):
    """NaN counts as -inf (fairseq's rule), and pad is banned, however much the model wants them."""
    model = RecurrentBigram(sentences=4, bias={5: 3.0, PAD: 3.0}, eos_rate=0.3, seed=7)
    cfg = config(3, epsilon, max_len_b=8, tol=1e-10)
    wanted = search(model, cfg)
    assert any(5 in h.tokens.tolist() for hyps in wanted for h in hyps)
    for hyps in search(model, cfg, wrap=lambda m: _NaNAt(m, 5)):
        assert len(hyps) == 3
        for h in hyps:
            assert 5 not in h.tokens.tolist() and PAD not in h.tokens.tolist()
            assert torch.isfinite(h.score) and torch.isfinite(h.positional_scores).all()


@pytest.mark.parametrize("epsilon", [0.0, 0.05])
def test_a_sentence_searched_in_a_batch_is_searched_as_alone(epsilon):
    """Sentences finish at different steps, so the batch is cut while others still search."""
    model = RecurrentBigram(sentences=6, eos_rate=0.25, seed=8)
    cfg = config(3, epsilon, max_len_b=10, tol=1e-12)
    batch = search(model, cfg)
    assert len({max(len(h.tokens) for h in hyps) for hyps in batch}) > 2
    for s, hyps in enumerate(batch):
        alone = search(model, cfg, sentences=[s])[0]
        assert [h.tokens.tolist() for h in hyps] == [h.tokens.tolist() for h in alone], s
        for a, b in zip(hyps, alone):
            # soft: the solver iterates until every row of the batch converges, so a row alone
            # stops at a different point within its tolerance
            atol = 1e-9 if epsilon else 1e-12
            torch.testing.assert_close(a.score, b.score, rtol=0, atol=atol)
            torch.testing.assert_close(a.positional_scores, b.positional_scores, rtol=0, atol=atol)


# --- the soft search ------------------------------------------------------------------------------


def test_soft_search_tends_to_the_hard_search_as_epsilon_goes_to_zero():
    """epsilon is relative to each step's candidate score range: near-ties stay soft until
    epsilon is below their gap, so agreement grows as epsilon falls (here 1, 2, 7, 8, 8 of 8)."""
    model = RecurrentBigram(sentences=8, eos_rate=0.3, seed=0)
    with torch.no_grad():
        hard = search(model, config(3, max_len_b=10))
        agree, gaps = [], []
        for eps in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
            soft = search(model, config(3, eps, max_len_b=10, tol=1e-10))
            same = [(a[0], b[0]) for a, b in zip(hard, soft) if torch.equal(a[0].tokens, b[0].tokens)]
            agree.append(len(same))
            gaps.append(max((abs(float(a.score - b.score)) for a, b in same), default=math.inf))
    assert agree == sorted(agree) and agree[0] <= 2 and agree[-1] == 8, agree
    assert gaps[-1] < 1e-9 and gaps[-2] < gaps[0] / 10, gaps
    # at the smallest epsilon every hypothesis, not just the best, is the hard search's
    for a, b in zip(hard, soft):
        assert [h.tokens.tolist() for h in a] == [h.tokens.tolist() for h in b]
        torch.testing.assert_close(torch.stack([h.score for h in a]), torch.stack([h.score for h in b]), rtol=0, atol=1e-9)


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 1e-6])
def test_soft_search_feeds_the_model_mixed_input_embeddings(epsilon):
    """StepModel's contract: after the first step a soft search passes the mixture of its
    candidates' embeddings, which tends to the bookkeeping token's as epsilon -> 0; hard passes none."""
    model = RecurrentBigram(sentences=3, eos_rate=0.3, seed=10)
    step_model = model.start(3)
    beam_search(step_model, 3, 5, config(3, epsilon, max_len_b=8, tol=1e-10), bos=BOS, eos=EOS, pad=PAD, unk=UNK, device=CPU)
    assert len(step_model.inputs) > 3 and step_model.inputs[0][1] is None
    gaps = []
    for prev, given in step_model.inputs[1:]:
        assert (given is None) == (epsilon == 0)
        if given is not None:
            assert given.shape == (prev.numel(), model.dim)
            gaps.append(float((given - model.embedding[prev].detach()).abs().max()))
    if epsilon == 0.1:
        assert max(gaps) > 1e-2, gaps
    elif epsilon:
        assert max(gaps) < 1e-9, gaps


def _objective(model, cfg):
    """Sum of every finished hypothesis's score (no sort, so ties between them cannot matter)."""
    out = search(model, cfg, src_len=4)
    return sum(h.score for hyps in out for h in hyps), [h.tokens.tolist() for hyps in out for h in hyps]


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_gradient_through_the_search_matches_central_differences(epsilon):
    """float64, solver tolerance 1e-12, state_grad="full": the exact gradient of the relaxed
    search, checked along one random direction per parameter. "values" keeps the forward but
    cuts the mixing weights' path to the next inputs and states, so its gradient differs."""
    model = RecurrentBigram(sentences=3, eos_rate=0.3, seed=9)
    full = config(2, epsilon, max_len_b=6, tol=1e-12, state_grad="full")
    f, tokens = _objective(model, full)
    params = model.parameters()
    grads = dict(zip(params, torch.autograd.grad(f, list(params.values()))))
    values_f, _ = _objective(model, config(2, epsilon, max_len_b=6, tol=1e-12, state_grad="values"))
    values_grads = dict(zip(params, torch.autograd.grad(values_f, list(params.values()), allow_unused=True)))
    assert float(values_f.detach()) == float(f.detach())
    g = torch.Generator().manual_seed(0)
    h = 1e-6
    values_off = 0.0
    for name, p in params.items():
        d = torch.randn(p.shape, generator=g, dtype=p.dtype)
        d /= d.norm()
        with torch.no_grad():
            p += h * d
            up, up_tokens = _objective(model, full)
            p -= 2 * h * d
            down, down_tokens = _objective(model, full)
            p += h * d
        assert up_tokens == tokens == down_tokens  # the same hypotheses: the objective is smooth here
        numeric = float(up - down) / (2 * h)
        analytic = float((grads[name] * d).sum())
        assert abs(analytic) > 1e-3, name
        # 1e-5: the soft top-k's backward has a ridge (soft_beam/ot.py) that biases each solve's
        # gradient by ~1e-7 relative, ~1.6e-6 through this search; with it set to 0, 1e-8.
        assert abs(numeric - analytic) <= 1e-5 * abs(analytic), (name, numeric, analytic)
        vg = values_grads[name]
        values_off = max(values_off, abs(float((vg * d).sum()) - analytic) / abs(analytic) if vg is not None else 1.0)
    if epsilon > 0:
        assert values_off > 1e-3, values_off
    else:  # nothing is mixed in the hard search
        assert values_off < 1e-12, values_off


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"beam": 0}, "beam must be an integer >= 1, got 0"),
        ({"beam": 2, "epsilon": -1.0}, "epsilon must be a finite number >= 0"),
        ({"beam": 2, "epsilon": float("nan")}, "epsilon must be a finite number >= 0"),
        ({"beam": 2, "candidates": 3}, "candidates must be at least 2 \\* beam = 4.*got 3"),
        ({"beam": 2, "state_grad": "both"}, "state_grad must be 'full' or 'values'"),
        ({"beam": 2, "max_len_cap": 1}, "max_len_cap must be an integer >= 2 or None"),
        ({"beam": 2, "tol": 0.0}, "tol must be a number > 0 or None"),
        ({"beam": 2, "min_len": 0}, "min_len must be an integer >= 1"),
    ],
)
def test_search_config_rejects_bad_values(kwargs, message):
    with pytest.raises(SettingError, match=message) as error:
        SearchConfig(**kwargs)
    assert isinstance(error.value, ValueError) and error.value.setting == next(k for k in kwargs if k != "beam" or len(kwargs) == 1)


def test_candidate_scores_apply_fairseqs_log_prob_edits():
    """Against fairseq's SequenceGenerator edits, written out: NaN -> -inf, pad banned, unk
    penalised, EOS banned before min_len and forced at max_len; then the beam score added."""
    torch.manual_seed(0)
    B, K, V, eos, pad, unk = 3, 2, 9, 2, 1, 3
    lprobs = torch.log_softmax(torch.randn(B * K, V), -1)
    lprobs[0, 5] = float("nan")
    lprobs[3, 7] = float("nan")
    cum = torch.randn(B, K)
    for step, max_len, min_len in [(0, 10, 1), (1, 10, 1), (1, 10, 3), (4, 4, 1)]:
        ref = lprobs.clone()
        ref[ref != ref] = -torch.inf
        ref[:, pad] = -torch.inf
        ref[:, unk] -= 0.5
        if step >= max_len:
            ref[:, :eos] = -torch.inf
            ref[:, eos + 1 :] = -torch.inf
        elif step < min_len:
            ref[:, eos] = -torch.inf
        ref = ref.view(B, K, V)
        ref = ref[:, :1] if step == 0 else ref + cum.unsqueeze(-1)
        got = candidate_scores(lprobs, cum, step, max_len, min_len, eos, pad, unk, 0.5)
        assert torch.equal(got, ref), (step, max_len, min_len)
    assert torch.isnan(lprobs[0, 5]) and torch.isnan(lprobs[3, 7])  # the input is left as it was


def test_unconverged_soft_top_k_rows_are_counted_not_raised():
    """The search's policy for a step whose soft top-k misses its tolerance: keep the solver's
    plan and count the rows (the criterion logs the count as ``unconverged``)."""
    params = RecurrentBigram(sentences=3, seed=2)
    counts = []
    for tol in (None, 1e-30):  # 1e-30 is under float64's rounding floor: no row can reach it
        stats = SearchStats()
        cfg = SearchConfig(beam=2, epsilon=0.1, tol=tol, max_len_b=4)
        beam_search(params.start(2), 3, 3, cfg, bos=BOS, eos=EOS, pad=PAD, unk=UNK, device=CPU, stats=stats)
        counts.append(stats.unconverged)
    assert counts[0] == 0 and counts[1] > 0, counts
