"""The search inside fairseq: hard mode equals stock beam search, and the gradient of the
criterion's losses reaches a real model's encoder and decoder through the SOFT top-k. The search's
own rules are tested without fairseq, on a test double (test_search.py)."""

from argparse import Namespace

import fairseq.utils
import pytest
import torch
from fairseq.tasks.translation import TranslationTask
from helpers import batches, load_task_model

pytestmark = pytest.mark.slow  # needs the tiny model trained by stock fairseq-train


def gen_args(beam, lenpen, min_len=1, unkpen=0.0, **kw):
    return Namespace(beam=beam, lenpen=lenpen, max_len_a=1.2, max_len_b=5, min_len=min_len, unkpen=unkpen, **kw)


@pytest.mark.parametrize(
    "beam,lenpen,min_len,unkpen", [(1, 1.0, 1, 0.0), (3, 1.0, 1, 0.0), (5, 0.3, 1, 0.0), (4, 2.0, 1, 0.0), (3, 1.0, 4, -8.0)]
)
def test_hard_mode_generator_is_token_identical_to_fairseq(tiny_data_bin, tiny_checkpoint, beam, lenpen, min_len, unkpen):
    _, task, model = load_task_model(tiny_data_bin, tiny_checkpoint)
    ours = task.build_generator([model], gen_args(beam, lenpen, min_len, unkpen))
    stock = TranslationTask.build_generator(task, [model], gen_args(beam, lenpen, min_len, unkpen))
    assert type(ours).__name__ == "SoftBeamGenerator" and type(stock).__name__ == "SequenceGenerator"
    compared = 0
    for sample in batches(task):
        for mine, ref in zip(task.inference_step(ours, [model], sample), task.inference_step(stock, [model], sample)):
            assert len(mine) == len(ref) == beam
            for h, r in zip(mine, ref):
                assert torch.equal(h["tokens"], r["tokens"])
                torch.testing.assert_close(h["score"], r["score"], rtol=0, atol=1e-6)
                torch.testing.assert_close(h["positional_scores"], r["positional_scores"], rtol=0, atol=1e-5)
            compared += 1
    assert compared == 45  # not a multiple of 8: the last partial batch is decoded too


def float64_model(model, request, monkeypatch):
    """The model in float64, with fairseq's float32-casting softmaxes replaced, for tests that
    compare gradients to float64 precision."""
    model.double()
    monkeypatch.setattr(fairseq.utils, "log_softmax", lambda x, dim, onnx_trace=False: torch.log_softmax(x, dim))
    monkeypatch.setattr(fairseq.utils, "softmax", lambda x, dim, onnx_trace=False: torch.softmax(x, dim))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    request.addfinalizer(lambda: torch.set_default_dtype(previous))


@pytest.mark.parametrize("beam_loss", ["hamming", "risk", "bleu"])
def test_gradient_reaches_encoder_and_decoder_through_the_search(tiny_data_bin, tiny_checkpoint, beam_loss, request, monkeypatch):
    args = ["--beam-loss", beam_loss, "--mle-weight", "0", "--soft-beam-size", "3",
            "--soft-beam-epsilon", "0.1", "--soft-beam-tol", "1e-10", "--soft-beam-state-grad", "full"]  # fmt: skip
    cfg, task, model = load_task_model(tiny_data_bin, tiny_checkpoint, *args, split="valid")
    criterion = task.build_criterion(cfg)
    sample = batches(task, "valid", max_sentences=6)[0]
    net_input = sample["net_input"]
    # float64 throughout: in float32 the central difference is at the loss's rounding level and
    # its result changed with the thread count.
    float64_model(model, request, monkeypatch)

    def loss():
        enc = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        return criterion.search_loss(model, sample, enc)[0]

    model.zero_grad()
    loss().backward()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    # With --mle-weight 0 the only path from the Hamming loss to the model is the soft top-k's
    # weights (the relaxed matches are mixtures of 0/1 indicators): a nonzero gradient there
    # has come through the top-k and the soft reordering. The expected-BLEU loss's n-gram
    # matches are such mixtures too (of "is reference token j" indicators).
    for name in ("encoder.layers.0.fc1.weight", "decoder.layers.0.self_attn.k_proj.weight"):
        p = params[name]
        d = torch.randn(p.shape, generator=g)
        d /= d.norm()
        analytic = float((p.grad * d).sum())
        h = 1e-4
        with torch.no_grad():
            p += h * d
            up = float(loss())
            p -= 2 * h * d
            down = float(loss())
            p += h * d
        numeric = (up - down) / (2 * h)
        assert abs(analytic) > 1e-4, name
        assert abs(numeric - analytic) <= 1e-5 * abs(analytic), (name, numeric, analytic)


def test_mrt_at_epsilon_zero_is_the_risk_of_the_teacher_forced_n_best(tiny_data_bin, tiny_checkpoint, request, monkeypatch):
    """--soft-beam-epsilon 0 --beam-loss risk is classical minimum-risk training: its gradient
    equals that of the same risk computed by scoring each n-best hypothesis with an ordinary
    teacher-forced forward pass (Shen et al. 2016; Edunov et al. 2018)."""
    from soft_beam.losses import content_ids, expected_risk, sentence_bleu

    args = ["--beam-loss", "risk", "--mle-weight", "0", "--soft-beam-size", "3", "--soft-beam-epsilon", "0", "--risk-sharpness", "2"]
    cfg, task, model = load_task_model(tiny_data_bin, tiny_checkpoint, *args, split="valid")
    criterion = task.build_criterion(cfg)
    sample = batches(task, "valid", max_sentences=5)[0]
    net_input = sample["net_input"]
    float64_model(model, request, monkeypatch)
    encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    model.zero_grad()
    criterion.search_loss(model, sample, encoder_out)[0].backward()
    searched = {n: p.grad.clone() for n, p in model.named_parameters()}

    # the same n-best, from the search's output, then scored again by teacher forcing
    d = task.target_dictionary
    special = (d.eos(), d.pad())
    hyps = _n_best(criterion, model, sample)
    model.zero_grad()
    total = 0
    for s, sentence in enumerate(hyps):
        reference = content_ids(sample["target"][s], special)
        scores = torch.stack([_teacher_forced_score(model, net_input, s, h) for h in sentence])  # (n,)
        costs = torch.tensor([1 - sentence_bleu(content_ids(h, special), reference) for h in sentence])
        total = total + (len(reference) + 1) * expected_risk(scores, costs, sharpness=2.0)
    total.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(searched[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert max(float(g.abs().max()) for g in searched.values()) > 1e-3  # the risk does reach the model


def _n_best(criterion, model, sample):
    """Each sentence's hypotheses (token tensors ending with EOS) from the criterion's search."""
    from fairseq_plugins.decoding import FairseqStepModel
    from fairseq_plugins.search_options import length_capped
    from soft_beam.search import beam_search

    d = criterion.task.target_dictionary
    src = sample["net_input"]["src_tokens"]
    with torch.no_grad():
        finalized = beam_search(FairseqStepModel(model, sample["net_input"], criterion.search.beam), src.shape[0], src.shape[1],
                                length_capped(criterion.search, model), bos=d.eos(), eos=d.eos(), pad=d.pad(), unk=d.unk(),
                                device=src.device)  # fmt: skip
    return [[h.tokens for h in sentence] for sentence in finalized]


def _teacher_forced_score(model, net_input, s, tokens):
    """Sum of the hypothesis's token log-probs under an ordinary forward pass, / its length."""
    eos = model.decoder.dictionary.eos()
    src = net_input["src_tokens"][s : s + 1]  # (1, S)
    prev = torch.cat([tokens.new_tensor([eos]), tokens[:-1]]).unsqueeze(0)  # (1, L)
    logits, extra = model(src, net_input["src_lengths"][s : s + 1], prev)
    lprobs = model.get_normalized_probs((logits, extra), log_probs=True)[0]  # (L, V)
    return lprobs.gather(1, tokens.unsqueeze(1)).sum() / len(tokens)


def test_values_state_grad_keeps_the_forward_and_still_reaches_the_model(tiny_data_bin, tiny_checkpoint):
    """--soft-beam-state-grad values (the default) cuts only the weights -> next input/state path."""
    results = {}
    for mode in ("full", "values"):
        args = ["--beam-loss", "hamming", "--mle-weight", "0", "--soft-beam-size", "3",
                "--soft-beam-epsilon", "0.05", "--soft-beam-state-grad", mode]  # fmt: skip
        cfg, task, model = load_task_model(tiny_data_bin, tiny_checkpoint, *args, split="valid")
        criterion = task.build_criterion(cfg)
        sample = batches(task, "valid", max_sentences=6)[0]
        enc = model.encoder(sample["net_input"]["src_tokens"], src_lengths=sample["net_input"]["src_lengths"])
        loss = criterion.search_loss(model, sample, enc)[0]
        model.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[mode] = (float(loss), grads)
    (full_loss, full_g), (values_loss, values_g) = results["full"], results["values"]
    assert values_loss == full_loss
    for name in ("encoder.layers.0.fc1.weight", "decoder.layers.0.self_attn.k_proj.weight"):
        g = values_g[name]
        assert torch.isfinite(g).all() and g.norm() > 0, name
    # a different gradient: the cut path carries part of the exact one
    diff = max(float((values_g[n] - full_g[n]).norm() / full_g[n].norm()) for n in values_g)
    assert diff > 1e-3, diff


def test_search_fraction_searches_a_random_subset_and_scales_its_loss(tiny_data_bin, tiny_checkpoint):
    args = ["--beam-loss", "hamming", "--soft-beam-size", "3", "--soft-beam-epsilon", "0.05", "--search-fraction", "0.3"]
    cfg, task, model = load_task_model(tiny_data_bin, tiny_checkpoint, *args, split="valid")
    part = task.build_criterion(cfg)
    whole = task.build_criterion(Namespace(**{**vars(cfg), "search_fraction": 1.0}))
    sample = batches(task, "valid", max_sentences=10)[0]
    src, lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    assert src.shape[0] == 10  # so 3 sentences are searched
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        torch.manual_seed(0)
        keep = torch.randperm(10)[:3].sort().values
        torch.manual_seed(0)
        loss, bleu, searched, _ = part.search_loss(model, sample, enc)
        # the same three sentences, searched on their own by the whole-batch criterion
        sub = {"net_input": {"src_tokens": src[keep], "src_lengths": lengths[keep]}, "target": sample["target"][keep]}
        ref, ref_bleu, ref_searched, _ = whole.search_loss(model, sub, model.encoder.reorder_encoder_out(enc, keep))
    assert searched == ref_searched == 3 and bleu == pytest.approx(ref_bleu)
    torch.testing.assert_close(loss, ref * 10 / 3)  # scaled to estimate the whole batch's sum
    # validation (the model in eval mode) searches every sentence, whatever the fraction
    with torch.no_grad():
        assert part(model, sample)[2]["searched"] == 10


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_training_step_on_cuda(tiny_data_bin, tiny_checkpoint, dtype):
    # As under --fp16/--bf16: the model in half precision, the soft top-k solved in float32.
    from fairseq import utils

    cfg, task, model = load_task_model(tiny_data_bin, tiny_checkpoint, "--soft-beam-size", "3", split="valid")
    criterion = task.build_criterion(cfg)
    model = model.to("cuda", dtype).train()
    sample = utils.move_to_cuda(batches(task, "valid", max_sentences=8)[0])
    loss, _, log = criterion(model, sample)
    loss.backward()
    assert torch.isfinite(loss) and log["solver_calls"] > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g.float()).all() for g in grads)
