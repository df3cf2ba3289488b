"""scripts/bench_train_step.py on the tiny model: the timing tables with their FLOP columns, per
batch size and precision; generation against stock fairseq; the gradient statistics per span floor."""

import json
import re
import statistics
import sys
from argparse import Namespace

import pytest
from helpers import ROOT, run

sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def bench():
    import bench_train_step

    return bench_train_step


@pytest.mark.slow
def test_bench_train_step_reports_each_batch_size_precision_and_generation(tiny_data_bin, tiny_checkpoint, tmp_path):
    """One table per precision and batch size with the arithmetic floor's columns, and our generator's
    output compared with stock fairseq's."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, ROOT / "scripts" / "bench_train_step.py", "--data", tiny_data_bin, "--checkpoint", tiny_checkpoint,
           "--beams", "2", "--search-fractions", "1,0.5", "--max-tokens", "200,400", "--batches", "1", "--reps", "1",
           "--precisions", "fp32,bf16", "--gen-beam", "2", "--device", "cpu", "--json", out]  # fmt: skip
    printed = run(cmd)
    assert "threads" in printed  # the ratios depend on the thread count
    assert "| GFLOP | FLOP x MLE | time x / FLOP x | GFLOP/s |" in printed
    result = json.loads(out.read_text())
    assert set(result["train"]) == {"fp32", "bf16"}
    for precision in ("fp32", "bf16"):
        assert set(result["train"][precision]) == {"200", "400"}
        for table in result["train"][precision].values():
            assert set(table) == {"mle", "soft_beam k=2 (fraction 1)", "soft_beam k=2 (fraction 0.5)"}
            mle, whole, half = table["mle"], table["soft_beam k=2 (fraction 1)"], table["soft_beam k=2 (fraction 0.5)"]
            assert mle["ratio"] == mle["flop_ratio"] == mle["time_over_flop_ratio"] == 1.0
            # the search's decoder steps are counted, forward and backward, in proportion to the sentences searched
            assert whole["gflop"] > half["gflop"] > mle["gflop"] > 0
            for row in table.values():
                assert row["flop_ratio"] == pytest.approx(row["gflop"] / mle["gflop"], rel=1e-12)
                assert row["time_over_flop_ratio"] == pytest.approx(row["ratio"] / row["flop_ratio"], rel=1e-12)
                assert row["gflop_per_s"] == pytest.approx(row["gflop"] / row["median_s"], rel=1e-12)
            # the search keeps its decoder states for backward, on top of the MLE pass's
            assert whole["memory_ratio"] > half["memory_ratio"] > 1
    # each batch size got its own batches (fairseq's iterator cache once handed every size the first's)
    assert result["train"]["fp32"]["400"]["mle"]["gflop"] > result["train"]["fp32"]["200"]["mle"]["gflop"]
    # bf16 ran a bfloat16 model (fairseq's --bf16): the MLE step saves about half the bytes for backward
    for tokens in ("200", "400"):
        assert result["train"]["bf16"][tokens]["mle"]["memory_bytes"] < 0.75 * result["train"]["fp32"][tokens]["mle"]["memory_bytes"]
    assert result["generate"]["identical"] is True


def test_grad_stats_per_span_floor(bench, tiny_data_bin, tiny_checkpoint, tmp_path, capsys):
    """A floor far above every candidate range makes each soft top-k plan nearly uniform, so the beam
    loss passes almost no gradient and the step's gradient is about the MLE term's (mle weight 0.5):
    smaller than without a floor, on the same batches and dropout."""
    out = tmp_path / "grad.json"
    bench.main(["--data", str(tiny_data_bin), "--checkpoint", str(tiny_checkpoint), "--beams", "2", "--max-tokens", "200",
                "--batches", "3", "--grad-stats", "--min-spans", "0,1000", "--clip-norm", "1.5", "--device", "cpu",
                "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "## Gradient statistics, fp32" in printed and "median s" not in printed  # no timing in this mode
    result = json.loads(out.read_text())
    assert result["clip_norm"] == 1.5 and result["train"] == {} and result["generate"] == {}
    rows = result["grad_stats"]["fp32"]["200"]
    assert set(rows) == {"mle", "soft_beam k=2 (min span 0)", "soft_beam k=2 (min span 1000)"}
    none, huge, mle = rows["soft_beam k=2 (min span 0)"], rows["soft_beam k=2 (min span 1000)"], rows["mle"]
    assert (none["min_span"], huge["min_span"], mle["min_span"]) == (0.0, 1000.0, None)  # as the criteria were built
    assert huge["grad_norm"]["max"] < 0.75 * none["grad_norm"]["max"]
    assert huge["grad_norm_per_token"]["median"] == pytest.approx(0.5 * mle["grad_norm_per_token"]["median"], rel=0.1)
    assert huge["beam_loss_per_token"] != none["beam_loss_per_token"] and mle["beam_loss_per_token"] is None
    for row in rows.values():
        norms, sizes = row["per_step"]["grad_norm"], row["per_step"]["sample_size"]
        per_token = [n / s for n, s in zip(norms, sizes)]
        assert row["steps"] == 3 and row["grad_norm"]["max"] == max(norms) and row["grad_norm_per_token"]["max"] == max(per_token)
        fired = [g for g in per_token if g > 1.5]  # fairseq clips the per-token norm
        assert row["clip_fraction"] == len(fired) / 3
        assert row["clip_factor_median"] == (statistics.median(1.5 / g for g in fired) if fired else None)


def test_percentile_interpolates(bench):
    assert bench.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.9) == pytest.approx(4.6)
    assert bench.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert bench.percentile([7.0], 0.9) == 7.0


@pytest.mark.parametrize(
    "spans, message",
    [("0,-1", r"soft_beam k=2 \(min span -1\): --soft-beam-min-span: min_span must be a finite number >= 0, got -1.0"),
     ("0,nan", r"--soft-beam-min-span: min_span must be a finite number >= 0, got nan"),
     ("0,abc", r"--min-spans '0,abc': not a comma-separated list of float values")],
)  # fmt: skip
def test_bad_min_span_is_refused_by_name(bench, tiny_data_bin, spans, message, capsys):
    """A bad floor is refused by the plugin's own validation, before any data or model is loaded."""
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--data", str(tiny_data_bin), "--checkpoint", "/nonexistent.pt", "--beams", "2", "--grad-stats",
                    "--min-spans", spans, "--device", "cpu"])  # fmt: skip
    text = str(exit_info.value.code) + capsys.readouterr().err
    assert "Traceback" not in text
    assert re.search(message, text), text


def test_counted_flops_include_the_backward(bench, tiny_data_bin, tiny_checkpoint):
    """A matmul's backward costs about twice its forward (input and weight gradients), so a step counted
    forward and backward is well over twice its forward alone."""
    from helpers import load_task_model
    from torch.utils.flop_counter import FlopCounterMode

    cfg, task, model = load_task_model(tiny_data_bin, tiny_checkpoint, "--label-smoothing", "0.1", split="train")
    mle = bench.mle_criterion(task, cfg)
    sample = bench.train_samples(Namespace(batches=1, device="cpu"), task, 200)[0]
    with FlopCounterMode(display=False) as forward:
        mle(model, sample)
    step = bench.counted_flops(model, mle, sample)
    assert step > 2 * forward.get_total_flops() > 0
