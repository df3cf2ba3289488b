"""The plugin makes stock fairseq-fixed CLIs work on torch >= 2.6 without any user setting."""

import argparse
import logging
import subprocess

import numpy as np
import pytest
import torch
from helpers import PLUGIN_DIR, cli, run

import fairseq_plugins  # noqa: F401  (applies the fixes)
from fairseq_plugins import compat


def _put_back_fairseqs_own(monkeypatch):
    """fairseq's unpatched objects for the test's duration; monkeypatch reinstalls the patched ones."""
    for patch in compat.PATCHES:
        for owner, attr in patch.targets():
            monkeypatch.setattr(owner, attr, getattr(owner, attr).__wrapped__)
        assert not patch.installed(), patch.name


def _compat_records(caplog):
    return [r for r in caplog.records if r.name == "fairseq_plugins.compat"]


def test_each_patch_logs_once_and_applying_again_does_nothing(monkeypatch, caplog):
    _put_back_fairseqs_own(monkeypatch)
    caplog.set_level(logging.INFO, logger="fairseq_plugins.compat")
    names = [p.name for p in compat.PATCHES]
    assert compat.apply() == names
    records = _compat_records(caplog)
    assert [r.levelno for r in records] == [logging.INFO] * len(names)
    assert all(name in r.getMessage() and "0.12.3.1" in r.getMessage() for name, r in zip(names, records))
    assert all(p.installed() for p in compat.PATCHES)
    installed = [getattr(owner, attr) for p in compat.PATCHES for owner, attr in p.targets()]

    caplog.clear()
    assert compat.apply() == []
    assert _compat_records(caplog) == []
    assert [getattr(owner, attr) for p in compat.PATCHES for owner, attr in p.targets()] == installed


def test_patches_skip_another_fairseq_version_with_a_warning(monkeypatch, caplog):
    import fairseq
    from fairseq.data import data_utils

    _put_back_fairseqs_own(monkeypatch)
    monkeypatch.setattr(compat, "_warned", set())
    monkeypatch.setattr(fairseq, "__version__", "0.13.0")
    assert compat.fairseq_version() == "0.13.0"
    caplog.set_level(logging.INFO, logger="fairseq_plugins.compat")
    assert compat.apply() == []
    records = _compat_records(caplog)
    assert len(records) == len(compat.PATCHES) and all(r.levelno == logging.WARNING for r in records)
    for patch, r in zip(compat.PATCHES, records):
        assert patch.name in r.getMessage() and "fairseq 0.13.0" in r.getMessage() and "0.12.3.1" in r.getMessage()
    assert not any(p.installed() for p in compat.PATCHES)
    # fairseq's own batching, which drops 100 - 96 sentences: what the skipped patch would fix
    batches = data_utils.batch_by_size(np.arange(100), lambda i: 5, max_sentences=16, required_batch_size_multiple=8)
    assert sum(len(b) for b in batches) == 96

    caplog.clear()
    assert compat.apply() == [] and _compat_records(caplog) == []  # warned once


def test_installed_fairseq_is_the_version_the_patches_were_written_for():
    import fairseq

    assert fairseq.__version__ == "0.12.3.1" and all(p.written_for == ("0.12.3.1",) for p in compat.PATCHES)


def test_plugin_loads_pickled_checkpoint_but_torch_load_stays_safe(tmp_path):
    from fairseq import checkpoint_utils

    path = tmp_path / "ckpt.pt"
    torch.save({"args": argparse.Namespace(arch="transformer"), "model": {}}, path)
    with open(path, "rb") as f:  # what load_checkpoint_to_cpu does
        state = checkpoint_utils.torch.load(f, map_location=torch.device("cpu"))
    assert state["args"].arch == "transformer"
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path)  # the rest of the process keeps torch's safe default


def test_fairseq_train_accepts_the_plugins_options(tmp_path):
    """fairseq-train's --help stops before the task and criterion add their options (stock ones too),
    so the check is the second parse: everything but a made-up option is recognised. Without the
    plugin fairseq rejects the task; with a stock task and criterion the three options are unknown."""
    cmd = [cli("fairseq-train"), tmp_path, "--user-dir", PLUGIN_DIR, "--task", "translation_soft_beam", "--criterion", "soft_beam",
           "--arch", "transformer", "--beam-loss", "risk", "--soft-beam-size", "3", "--soft-beam-gen-epsilon", "0.5",
           "--not-an-option"]  # fmt: skip
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.rstrip().endswith("fairseq-train: error: unrecognized arguments: --not-an-option"), proc.stderr


@pytest.mark.slow
def test_stock_checkpoint_generates_with_user_dir(tiny_data_bin, tiny_checkpoint):
    args = [
        cli("fairseq-generate"),
        tiny_data_bin,
        "--path",
        tiny_checkpoint,
        "--gen-subset",
        "test",
        "--beam",
        "2",
        "--max-len-a",
        "1.2",
        "--max-len-b",
        "5",
        "--batch-size",
        "16",
        "--cpu",
    ]
    with pytest.raises(AssertionError, match="weights_only"):
        run(args)  # stock fairseq-fixed on torch >= 2.6: the bug the plugin fixes
    out = run([*args, "--user-dir", PLUGIN_DIR])
    assert out.count("\nH-") == 45  # all of them: the last partial batch is kept


@pytest.mark.parametrize("n,max_sentences", [(12, 64), (100, 16), (96, 16), (1, 8)])
def test_no_sentence_is_dropped_by_batching(n, max_sentences):
    from fairseq.data import data_utils

    batches = data_utils.batch_by_size(np.arange(n), lambda i: 5, max_sentences=max_sentences, required_batch_size_multiple=8)
    assert np.array_equal(np.concatenate(batches), np.arange(n))
    assert all(len(b) % 8 == 0 for b in batches[:-1]) and all(len(b) <= max_sentences for b in batches)


@pytest.mark.slow
def test_nan_detector_rerun_works_on_a_stock_transformer(tiny_data_bin, tiny_checkpoint):
    """fairseq re-runs a step with NaN/inf gradients under NanDetector; on current torch its
    backward hooks failed with StopIteration on the encoder's dict output (unless fixed)."""
    from fairseq.nan_detector import NanDetector
    from helpers import batches, load_task_model

    _, task, model = load_task_model(tiny_data_bin, tiny_checkpoint, split="valid")
    model.train()
    net_input = batches(task, "valid", max_sentences=4)[0]["net_input"]
    with NanDetector(model):
        out, _ = model(**net_input)
        out.float().sum().backward()
    assert any(p.grad is not None for p in model.parameters())
