"""scripts/bench_bleu.py: how it measures a process's peak memory, and an end-to-end smoke test on a
few hundred Multi30k pairs with a tiny model: data prep, base MLE, the three continuation arms, test
evaluation, results markdown/JSON/PNG."""

import json
import sys
from pathlib import Path

import pytest
from helpers import ROOT, run

RAW_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"
ARMS = ("mle_base", "mle", "soft_hamming", "soft_risk")


def peak_rss_mib(commands: list, tmp_path: Path) -> list:
    """Each command's max_rss_mib as bench_bleu.py measures it: run_logged called in a fresh process
    that parsed bench_bleu's arguments first, as its main() does (this pytest process, grown by torch
    and fairseq, would lift every child's figure to its own size)."""
    driver = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_bleu; from pathlib import Path; "
        "bench_bleu.parse_args(['--raw-dir', sys.argv[2], '--work', sys.argv[2]]); "
        "print(json.dumps([bench_bleu.run_logged(c, Path(sys.argv[2]) / 'log')['max_rss_mib'] for c in json.loads(sys.argv[3])]))"
    )
    out = run([sys.executable, "-c", driver, ROOT / "scripts", tmp_path, json.dumps(commands)])
    return json.loads(out.strip().splitlines()[-1])


def test_run_logged_reports_the_child_process_peak_rss_in_mib(tmp_path):
    bare, filled = peak_rss_mib([[sys.executable, "-c", "pass"], [sys.executable, "-c", "b = b'x' * (200 * 2**20)"]], tmp_path)
    assert 0 < bare < 40  # a bare interpreter: bench_bleu's own process is not in it (with torch it is about 270)
    assert 195 < filled - bare < 215  # MiB, not KiB or bytes


@pytest.mark.slow
@pytest.mark.skipif(not RAW_DIR.is_dir(), reason=f"Multi30k raw files not found at {RAW_DIR}")
def test_bench_bleu_smoke(tmp_path):
    results = tmp_path / "out" / "results.md"
    cmd = [
        sys.executable,
        ROOT / "scripts" / "bench_bleu.py",
        "--tiny",
        "--subset",
        "300",
        "--vocab-size",
        "500",
        "--mle-updates",
        "6",
        "--continue-updates",
        "2",
        "--validate-every",
        "1",
        "--mle-validate-every",
        "3",
        "--seeds",
        "1",
        "--max-tokens",
        "300",
        "--log-interval",
        "1",
        "--workers",
        "1",
        "--cpu",
        "--work",
        tmp_path / "work",
        "--raw-dir",
        RAW_DIR,
        "--results",
        results,
        # the soft-beam search of an untrained model runs to its length limit: keep it short
        "--max-valid-sentences",
        "16",
        "--beam",
        "2",
        "--continue-max-tokens",
        "120",
        "--eval-max-len-a",
        "0",
        "--eval-max-len-b",
        "4",
        "--soft-beam-size",
        "2",
        "--soft-beam-epsilon",
        "0.1",
        "--search-max-len-b",
        "3",
    ]
    out = run(cmd, timeout=900)
    assert "wrote" in out

    summary = json.loads(results.with_suffix(".json").read_text())
    md_lines, out_lines = results.read_text().splitlines(), out.splitlines()
    (torch_only_mib,) = peak_rss_mib([[sys.executable, "-c", "import torch"]], tmp_path)
    assert {"command", "machine", "settings", "data", "bleu_signature", "chrf_signature", "arms", "targets"} <= set(summary)
    assert summary["bleu_signature"].startswith("nrefs:1") and "nc:" in summary["chrf_signature"]
    assert summary["data"]["train_pairs"] <= 300 and summary["test_sentences"] == 1000
    assert summary["targets"]["full_protocol"] is False and summary["compute_s"] > 0
    assert set(summary["arms"]) == set(ARMS)
    for name, arm in summary["arms"].items():
        assert arm["n_seeds"] == 1 and len(arm["bleu"]) == 1 and len(arm["chrf"]) == 1, name
        assert 0 <= arm["bleu_mean"] <= 100 and 0 <= arm["chrf_mean"] <= 100, name
        assert arm["updates"] == (6 if name == "mle_base" else 2), name
        # the largest peak of the arm's fairseq-train processes (their run.json), under the machine's RAM and
        # above what importing torch alone takes, as the markdown table and the printed summary show it
        arm_runs = sorted((tmp_path / "work").glob(f"{'' if name == 'mle_base' else 'seed*/'}{name}/run.json"))
        assert arm_runs and arm["max_rss_mib"] == max(json.loads(r.read_text())["max_rss_mib"] for r in arm_runs), name
        assert torch_only_mib <= arm["max_rss_mib"] < summary["machine"]["ram_gib"] * 1024, name
        assert any(line.startswith(f"| {arm['label']} |") and line.endswith(f"| {arm['max_rss_mib']:.0f} |") for line in md_lines), name
        assert any(line.startswith(f"[bench] {name} ") and f"RSS {arm['max_rss_mib']:.0f} MiB" in line for line in out_lines), name
        assert arm["process_sec_per_update"] > 0, name
        assert arm["valid_curves"] and arm["valid_curves"][0]["points"], name
        assert all(p["bleu"] is not None for p in arm["valid_curves"][0]["points"]), name
        assert arm["commands"] and all(
            ("train_mle.sh" if name.startswith("mle") else "finetune_soft_beam.sh") in c for c in arm["commands"]
        ), name
    assert [p["num_updates"] for p in summary["arms"]["mle"]["valid_curves"][0]["points"]] == [1, 2]
    assert summary["arms"]["soft_risk"]["last_train_inner"][0].get("beam_loss") is not None

    md = results.read_text()
    for needle in (
        "| arm |",
        "BLEU signature",
        "Reduced scale",
        "valid_bleu.png",
        "## Commands",
        "soft beam, hamming loss",
        "soft beam, risk loss",
        "compute-matched",
    ):
        assert needle in md, needle

    png = results.with_name("results_valid_bleu.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    # a re-run reuses every finished step
    out = run(cmd, timeout=300)
    assert out.count("reusing") == 4
