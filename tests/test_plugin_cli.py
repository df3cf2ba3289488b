"""The plugin from the stock fairseq command line: train, resume, fine-tune, generate,
distributed data parallel, and early errors for bad options."""

import json
import socket
import subprocess
import sys

import pytest
import torch
from helpers import PLUGIN_DIR, ROOT, TINY_ARCH, batches, cli, load_task_model, run

SOFT_BEAM = ["--user-dir", PLUGIN_DIR, "--task", "translation_soft_beam", "--criterion", "soft_beam",
             "--label-smoothing", "0.1", *TINY_ARCH, "--optimizer", "adam", "--lr", "0.001",
             "--max-tokens", "400", "--cpu", "--seed", "3", "--log-format", "json", "--log-interval", "1",
             "--clip-norm", "1.0",
             "--no-epoch-checkpoints"]  # fmt: skip


def train_log(output: str) -> list[dict]:
    return [json.loads(line.split("| train_inner | ", 1)[1]) for line in output.splitlines() if "| train_inner | " in line]


@pytest.mark.slow
def test_finetune_resume_and_generate(tiny_data_bin, tiny_checkpoint, tmp_path):
    save = tmp_path / "soft"
    bleu_args = json.dumps({"beam": 2, "max_len_a": 1.2, "max_len_b": 5})
    common = [cli("fairseq-train"), tiny_data_bin, *SOFT_BEAM, "--save-dir", save, "--eval-bleu",
              "--eval-bleu-args", bleu_args, "--eval-bleu-detok", "space", "--soft-beam-size", "3"]  # fmt: skip
    out = run([*common, "--finetune-from-model", tiny_checkpoint, "--max-update", "4"])
    log = train_log(out)
    assert [int(r["num_updates"]) for r in log] == [1, 2, 3, 4]
    assert {"beam_loss", "top_bleu", "solver_iters", "marginal_err", "unconverged", "nll_loss"} <= set(log[0])
    assert "valid_bleu" in out or '"bleu"' in out  # --eval-bleu ran our generator

    out = run([*common, "--max-update", "6"])  # resumes from save/checkpoint_last.pt
    assert "Loaded checkpoint" in out and "@ 4 updates" in out
    assert [int(r["num_updates"]) for r in train_log(out)] == [5, 6]

    gen = run([cli("fairseq-generate"), tiny_data_bin, "--path", save / "checkpoint_last.pt", "--user-dir", PLUGIN_DIR,
               "--task", "translation_soft_beam", "--beam", "3", "--max-len-a", "1.2", "--max-len-b", "5",
               "--batch-size", "16", "--cpu", "--gen-subset", "test"])  # fmt: skip
    assert gen.count("\nH-") == 45 and "BLEU4" in gen


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", ["0.1", "0"])  # 0: classical minimum-risk training over the beam
def test_risk_loss_falls_from_scratch(tiny_data_bin, tmp_path, epsilon):
    # (The relaxed Hamming loss of the top beam barely moves in 40 updates from scratch, measured
    # 1.329 -> 1.331 bits/token, while MLE drives the total loss; that it learns through the
    # search is tested in test_losses.py, where the hard search's errors must fall.)
    out = run([cli("fairseq-train"), tiny_data_bin, *SOFT_BEAM, "--beam-loss", "risk", "--max-update", "40",
               "--soft-beam-size", "2", "--soft-beam-epsilon", epsilon, "--no-save", "--save-dir", tmp_path])  # fmt: skip
    log = train_log(out)
    assert len(log) == 40
    assert ("solver_iters" in log[0]) == (epsilon != "0")  # the hard search calls no solver

    def mean(key, rows):
        return sum(float(r[key]) for r in rows) / len(rows)

    first, last = log[:10], log[-10:]
    assert mean("loss", last) < 0.8 * mean("loss", first)  # the criterion's loss: MLE + beam loss
    assert mean("beam_loss", last) < mean("beam_loss", first)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_cpu_distributed_keeps_ranks_equal(tiny_data_bin, tiny_checkpoint, tmp_path):
    port = _free_port()
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, ROOT / "tests" / "ddp_worker.py", tmp_path / f"rank{rank}.pt", tiny_data_bin, *SOFT_BEAM,
               "--finetune-from-model", tiny_checkpoint, "--max-update", "3", "--save-dir", tmp_path / "ckpt",
               "--distributed-world-size", "2", "--distributed-backend", "gloo",
               "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
               "--ddp-backend", "legacy_ddp", "--distributed-rank", str(rank)]  # fmt: skip
        procs.append(subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for rank in (1, 0):  # a crash on rank 1 shows on rank 0 only as a closed connection
        assert procs[rank].returncode == 0, outputs[rank][-5000:]
    assert 'num_updates": "3"' in outputs[0] or "num_updates=3" in outputs[0] or '"num_updates": "3"' in outputs[0]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    start = torch.load(tiny_checkpoint, weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it did train


@pytest.mark.parametrize(
    "args,message",
    [
        (["--soft-beam-size", "0"], "--soft-beam-size: beam must be an integer >= 1, got 0"),
        (["--soft-beam-epsilon", "-0.1"], "--soft-beam-epsilon: epsilon must be a finite number >= 0"),
        (["--soft-beam-epsilon", "0"], "--beam-loss hamming has no gradient through a hard search"),
        (["--soft-beam-gen-epsilon", "-1"], "--soft-beam-gen-epsilon: epsilon must be a finite number >= 0"),
        (["--soft-beam-size", "4", "--soft-beam-candidates", "5"], "--soft-beam-candidates: candidates must be at least 2 \\* beam = 8"),
        (["--soft-beam-tol", "0"], "--soft-beam-tol: tol must be a number > 0"),
        (["--soft-beam-min-span", "-1"], "--soft-beam-min-span: min_span must be a finite number >= 0"),
        (["--max-len-a", "-1"], "--max-len-a: max_len_a must be a finite number >= 0"),
        (["--beam-loss", "risk", "--risk-sharpness", "0"], "--risk-sharpness: risk_sharpness must be a finite number > 0"),
        (["--mle-weight", "1.5"], "--mle-weight must be in \\[0, 1\\]"),
        (["--search-fraction", "0"], "--search-fraction must be in \\(0, 1\\]"),
        (["--search-fraction", "1.5"], "--search-fraction must be in \\(0, 1\\]"),
    ],
)
def test_bad_options_fail_early_with_clear_messages(tiny_data_bin_unbuilt, args, message):
    with pytest.raises(ValueError, match=message):
        task, cfg = setup_task(tiny_data_bin_unbuilt, "translation_soft_beam", *args)
        task.build_criterion(cfg)


def setup_task(data_bin, task_name, *args):
    from fairseq import options, tasks

    import fairseq_plugins  # noqa: F401

    cfg = options.parse_args_and_arch(
        options.get_training_parser(),
        [str(data_bin), "-s", "src", "-t", "tgt", "--user-dir", str(PLUGIN_DIR), "--task", task_name,
         "--criterion", "soft_beam", "--arch", "transformer", "--cpu", *args],
    )  # fmt: skip
    return tasks.setup_task(cfg), cfg


def test_risk_loss_trains_through_a_hard_search(tiny_data_bin_unbuilt):
    """--soft-beam-epsilon 0 with the risk loss: classical minimum-risk training over the beam."""
    task, cfg = setup_task(tiny_data_bin_unbuilt, "translation_soft_beam", "--beam-loss", "risk", "--soft-beam-epsilon", "0")
    assert task.build_criterion(cfg).search.epsilon == 0


@pytest.mark.slow
def test_criterion_trains_under_the_stock_translation_task(tiny_data_bin, tiny_checkpoint):
    """The criterion owns the training search's options: --task translation --criterion soft_beam works."""
    from fairseq import checkpoint_utils
    from fairseq.tasks.translation import TranslationTask

    task, cfg = setup_task(tiny_data_bin, "translation", "--soft-beam-size", "2", "--label-smoothing", "0.1", "--mle-weight", "0")
    assert type(task) is TranslationTask
    criterion = task.build_criterion(cfg)
    assert criterion.search.beam == 2 and criterion.search.soft_candidates == 8
    model = checkpoint_utils.load_model_ensemble([str(tiny_checkpoint)], task=task)[0][0].train()
    task.load_dataset("valid")
    loss, _, log = criterion(model, batches(task, "valid", max_sentences=4)[0])
    loss.backward()
    assert log["solver_calls"] > 0 and torch.isfinite(loss)
    assert model.decoder.layers[0].self_attn.k_proj.weight.grad.norm() > 0  # through the search alone (MLE weight 0)


def test_training_search_stops_at_the_models_learned_positions(tiny_data_bin_unbuilt):
    """A decoder with 8 learned positions and a source whose length rule allows 46 steps: the
    training search stops at the model's max_decoder_positions(), as fairseq's generator does."""
    task, cfg = setup_task(tiny_data_bin_unbuilt, "translation_soft_beam", *TINY_ARCH, "--decoder-learned-pos",
                           "--max-target-positions", "8", "--soft-beam-size", "2", "--soft-beam-epsilon", "0.1")  # fmt: skip
    torch.manual_seed(0)
    model = task.build_model(cfg).train()
    criterion = task.build_criterion(cfg)
    d = task.source_dictionary
    src = torch.randint(d.nspecial, len(d), (2, 30))  # (B, S): max_len = 1.2 * 30 + 10 = 46
    target = torch.cat([torch.randint(d.nspecial, len(d), (2, 5)), torch.full((2, 1), d.eos())], 1)  # (B, 6)
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([30, 30])}, "target": target}
    encoder_out = model.encoder(src, src_lengths=sample["net_input"]["src_lengths"])
    stats = criterion.search_loss(model, sample, encoder_out)[3]
    assert stats.steps == 8  # steps 0..7: the positions limit, 8, less one (fairseq's rule)


def test_target_dictionary_without_eos_is_refused(tiny_data_bin_unbuilt):
    from fairseq import options
    from fairseq.data import Dictionary

    from fairseq_plugins.task import TranslationSoftBeamTask

    parser = options.get_training_parser()
    cfg = options.parse_args_and_arch(
        parser, [str(tiny_data_bin_unbuilt), "-s", "src", "-t", "tgt", "--user-dir", str(PLUGIN_DIR), "--task", "translation_soft_beam",
                 "--arch", "transformer"]
    )  # fmt: skip
    broken = Dictionary()
    broken.eos_index = None
    with pytest.raises(ValueError, match="no EOS symbol"):
        TranslationSoftBeamTask(cfg, Dictionary(), broken)


@pytest.mark.slow
def test_generator_refuses_unsupported_generation_options(tiny_data_bin, tiny_checkpoint):
    from argparse import Namespace

    _, task, model = load_task_model(tiny_data_bin, tiny_checkpoint)
    with pytest.raises(ValueError, match="does not support --sampling"):
        task.build_generator([model], Namespace(beam=2, sampling=True))
    with pytest.raises(ValueError, match="^--nbest 3 is above --beam 2"):
        task.build_generator([model], Namespace(beam=2, nbest=3))
    gen = task.build_generator([model], Namespace(beam=2, max_len_a=1.2, max_len_b=5))
    with pytest.raises(ValueError, match="prefix tokens"):
        gen.generate([model], batches(task)[0], prefix_tokens=torch.zeros(1, 1, dtype=torch.long))
