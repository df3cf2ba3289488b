"""The plugin makes stock fairseq-fixed CLIs work on torch >= 2.6 without any user setting."""

import argparse

import pytest
import torch
from helpers import PLUGIN_DIR, cli, run


def test_plugin_loads_pickled_checkpoint_but_torch_load_stays_safe(tmp_path):
    from fairseq import checkpoint_utils

    import fairseq_plugins  # noqa: F401  (applies the fix)

    path = tmp_path / "ckpt.pt"
    torch.save({"args": argparse.Namespace(arch="transformer"), "model": {}}, path)
    with open(path, "rb") as f:  # what load_checkpoint_to_cpu does
        state = checkpoint_utils.torch.load(f, map_location=torch.device("cpu"))
    assert state["args"].arch == "transformer"
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path)  # the rest of the process keeps torch's safe default


def test_train_help_with_user_dir():
    out = run([cli("fairseq-train"), "--user-dir", PLUGIN_DIR, "--help"])
    assert "--user-dir" in out


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
    import numpy as np
    from fairseq.data import data_utils

    import fairseq_plugins  # noqa: F401  (applies the fix)

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
