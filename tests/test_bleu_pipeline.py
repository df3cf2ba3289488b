"""scripts/bench_bleu.py: how it measures a process's peak memory, how it pools hypotheses over seeds,
and an end-to-end smoke test on a few hundred Multi30k pairs with a tiny model: data prep, base MLE, the
four continuation arms (mle, mrt, soft_hamming, soft_risk), evaluation on two test sets with a beam
sweep, the paired significance tests, results markdown/JSON/PNG, resuming, and --base."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, run

RAW_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"
ARMS = ("mle_base", "mle", "mrt", "soft_hamming", "soft_risk")
TEST_SETS = {"test_2016_flickr": 1000, "test_2017_mscoco": 50}
# the sweep at --beam alone: each more beam is one more fairseq-generate per set and checkpoint (~5 s on a
# 2-core CPU, most of it importing fairseq); test_set_summary_with_a_beam_sweep covers several beams
SWEEP = [2]
# each baseline, and the arms tested against it
VERSUS = {"mle": ("mrt", "soft_hamming", "soft_risk"), "mrt": ("soft_hamming", "soft_risk")}


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
    # MiB, not KiB or bytes: 200 MiB over the interpreter's own ~10 (not filled - bare: bare is the larger of the
    # interpreter's and the driver's size at the spawn, ~16 MiB, which a child's peak starts from)
    assert 200 < filled < 200 + 40


def test_pool_concatenates_the_seeds_and_repeats_the_references(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_bleu

    ref, seeds = tmp_path / "ref.de", [tmp_path / "s1.txt", tmp_path / "s2.txt"]
    ref.write_text("r1\nr2\n")
    seeds[0].write_text("a1\na2\n")
    seeds[1].write_text("b1\nb2\n")
    hyp, pooled_ref = bench_bleu.pool(seeds, ref, tmp_path / "pooled" / "x.hyp.txt")
    assert hyp.read_text() == "a1\na2\nb1\nb2\n" and pooled_ref.read_text() == "r1\nr2\nr1\nr2\n"
    before = hyp.stat().st_mtime_ns
    bench_bleu.pool(seeds, ref, hyp)  # unchanged content keeps the file, so a comparison on it stays cached
    assert hyp.stat().st_mtime_ns == before


def test_set_summary_with_a_beam_sweep_over_seeds(tmp_path):
    """Per test set, each score and each beam of the sweep as mean and std over the seeds, and as the per-set table
    shows them (the smoke test runs one seed and one beam)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_bleu

    def entry(bleu, b1):
        sweep = [{"beam": 1, "bleu": b1, "chrf": 50.0, "length_ratio": 0.9}, {"beam": 5, "bleu": bleu, "chrf": 51.0, "length_ratio": 1.0}]
        return {"n_sentences": 7, "hypotheses_file": "h", "bleu": bleu, "chrf": 51.0, "bleu_lowercase": bleu + 1, "length_ratio": 1.0,
                "beam_sweep": sweep}  # fmt: skip

    t = bench_bleu.set_summary([entry(30.0, 28.0), entry(32.0, 29.0)], {"mle": None})
    assert (t["bleu_mean"], t["bleu_std"], t["bleu_lowercase_mean"]) == (31.0, 2**0.5, 32.0)
    assert [(p["beam"], p["bleu_mean"], p["bleu"]) for p in t["beam_sweep"]] == [(1, 28.5, [28.0, 29.0]), (5, 31.0, [30.0, 32.0])]
    assert t["vs_mle"] is None and t["vs_mrt"] is None
    summary = {"settings": {"beam": 5, "sweep_beams": [1, 5]}, "test_sets": {"s": 7},
               "arms": {"mle": {"label": "L", "n_seeds": 2, "sets": {"s": t}}}}  # fmt: skip
    md = bench_bleu.md_test_sets(summary)
    assert "| arm | seeds | BLEU mean ± std | chrF mean ± std | lowercased BLEU | length ratio | BLEU beam 1 | BLEU beam 5 |" in md
    assert "| L | 2 | 31.00 ± 1.41 | 51.00 ± 0.00 | 32.00 | 1.000 | 28.50 | 31.00 |" in md


def test_significance_table_puts_each_p_value_in_its_column():
    """The smoke test's untrained arms translate alike (every p is 1): here each p differs."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_bleu

    def entry(seed, base):
        p = {"paired_bs": {"bleu": base, "chrf": base + 0.1}, "paired_ar": {"bleu": base + 0.2, "chrf": base + 0.3}}
        return {"seed": seed, "p_value": p, "difference": {"bleu": -1.25, "chrf": 0.5}, "bootstrap": {"bleu": {"mean": 30.1, "ci95": 0.8}}}

    sig = {"per_seed": [entry(1, 0.01), entry(2, 0.02)], "pooled": entry(None, 0.0004)}
    summary = {"settings": {"paired_bs_n": 1000, "paired_ar_n": 10000}, "test_sets": {"s": 7},
               "arms": {"mle": {"label": "M", "sets": {"s": {"vs_mle": None, "vs_mrt": None}}},
                        "soft_risk": {"label": "R", "sets": {"s": {"vs_mle": None, "vs_mrt": sig}}}}}  # fmt: skip
    md = bench_bleu.md_significance(summary)
    assert "| s | R | MRT | -1.25 | 30.10 ± 0.80 | <0.001 | 0.100 | 0.200 | 0.300 | s1 0.010, s2 0.020 |" in md
    assert not any(line.startswith("| s | M |") for line in md)


def raw_dir_with_two_test_sets(tmp_path: Path) -> Path:
    """The shared Multi30k files, linked, and a second test set under a real name (the recipe knows sets by
    name), test_2017_mscoco, made of the first 50 val pairs: the shared folder has only test_2016_flickr."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in RAW_DIR.glob("*.gz"):
        (raw / f.name).symlink_to(f)
    for lang in ("en", "de"):
        with gzip.open(RAW_DIR / f"val.{lang}.gz", "rt", encoding="utf-8") as f:
            lines = [next(f) for _ in range(TEST_SETS["test_2017_mscoco"])]
        with gzip.open(raw / f"test_2017_mscoco.{lang}.gz", "wt", encoding="utf-8") as f:
            f.writelines(lines)
    return raw


def bench_command(tmp_path: Path, results: Path) -> list:
    return [
        sys.executable, ROOT / "scripts" / "bench_bleu.py",
        "--tiny", "--subset", "300", "--vocab-size", "500", "--mle-updates", "6", "--continue-updates", "2",
        "--validate-every", "1", "--mle-validate-every", "3", "--seeds", "1", "--max-tokens", "300",
        "--log-interval", "1", "--workers", "1", "--cpu", "--work", tmp_path / "work",
        "--raw-dir", raw_dir_with_two_test_sets(tmp_path), "--results", results,
        "--sweep-beams", ",".join(map(str, SWEEP)), "--paired-bs-n", "100", "--paired-ar-n", "100",
        # the soft-beam search of an untrained model runs to its length limit: keep it short
        "--max-valid-sentences", "16", "--beam", "2", "--continue-max-tokens", "120",
        "--eval-max-len-a", "0", "--eval-max-len-b", "4",
        "--soft-beam-size", "2", "--soft-beam-epsilon", "0.1", "--search-max-len-b", "3",
    ]  # fmt: skip


def check_arms(summary: dict, tmp_path: Path, md_lines: list, out_lines: list) -> None:
    (torch_only_mib,) = peak_rss_mib([[sys.executable, "-c", "import torch"]], tmp_path)
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
    # mrt is the risk loss over the hard search; the soft arms search with their epsilon
    assert all("BEAM_LOSS=risk " in c and "BEAM_EPSILON=0 " in c for c in summary["arms"]["mrt"]["commands"])
    assert all("BEAM_EPSILON=0.1 " in c for a in ("soft_hamming", "soft_risk") for c in summary["arms"][a]["commands"])
    for arm in ("mrt", "soft_risk"):
        assert summary["arms"][arm]["last_train_inner"][0].get("beam_loss") is not None, arm


def check_sets(summary: dict, md: str) -> None:
    """Every arm scored on every test set, with every column of the per-set tables."""
    assert summary["test_sets"] == TEST_SETS and summary["test_sentences"] == 1000
    for name, arm in summary["arms"].items():
        assert list(arm["sets"]) == list(TEST_SETS), name
        for set_name, t in arm["sets"].items():
            assert t["n_sentences"] == TEST_SETS[set_name], (name, set_name)
            for key in ("bleu", "chrf", "bleu_lowercase"):
                assert 0 <= t[f"{key}_mean"] <= 100 and t[f"{key}_std"] == 0.0, (name, set_name, key)
            assert 0 < t["length_ratio_mean"] < 10, (name, set_name)
            assert [p["beam"] for p in t["beam_sweep"]] == SWEEP, (name, set_name)
            assert t["beam_sweep"][0]["bleu"] == t["bleu"], (name, set_name)  # the --beam decode, reused
            assert all(Path(f).is_file() for f in t["hypotheses_files"]), (name, set_name)
        assert arm["sets"]["test_2016_flickr"]["bleu"] == arm["bleu"], name
        assert f"| {arm['label']} | 1 | {t['bleu_mean']:.2f} ± 0.00 | {t['chrf_mean']:.2f} ± 0.00 | " in md, name
    for needle in ("### test_2016_flickr (1000 sentences)", "### test_2017_mscoco (50 sentences)", "| length ratio | BLEU beam 2 |"):
        assert needle in md, needle


def check_significance(summary: dict, work: Path, md_lines: list) -> None:
    """Every arm against MLE and the soft arms against MRT, per seed and pooled, from compare.py's JSONs."""
    files = set()
    for set_name in TEST_SETS:
        ref = work / "data" / "raw" / ("test.de" if set_name == "test_2016_flickr" else "test1.de")
        assert (work / "compare" / set_name / "pooled" / "ref.txt").read_text() == ref.read_text()  # one seed: once
        for name, arm in summary["arms"].items():
            for baseline in VERSUS:
                sig = arm["sets"][set_name][f"vs_{baseline}"]
                if name not in VERSUS[baseline]:
                    assert sig is None, (name, set_name, baseline)
                    continue
                assert [e["seed"] for e in sig["per_seed"]] == [1] and sig["pooled"]["seeds"] == [1]
                for entry, folder in ((sig["per_seed"][0], work / "seed1"), (sig["pooled"], work / "compare" / set_name / "pooled")):
                    p = entry["p_value"]
                    assert all(0 < p[t][m] <= 1 for t in ("paired_bs", "paired_ar") for m in ("bleu", "chrf")), (name, baseline)
                    assert isinstance(entry["difference"]["bleu"], float) and entry["bootstrap"]["bleu"]["ci95"] >= 0
                    result = json.loads(Path(entry["compare_json"]).read_text())
                    assert result["tests"]["paired_bs"]["n"] == 100 and result["tests"]["paired_ar"]["n"] == 100
                    assert result["baseline"]["file"].startswith(str(folder)) and baseline in result["baseline"]["file"]
                    assert any(name in s["file"] for s in result["systems"]) and result["n_sentences"] == TEST_SETS[set_name]
                    files.add(entry["compare_json"])
                pooled = sig["pooled"]["p_value"]
                cells = [f"{pooled[t][m]:.3f}" for t in ("paired_bs", "paired_ar") for m in ("bleu", "chrf")]
                row = f"| {set_name} | {arm['label']} | {baseline.upper()} | {sig['pooled']['difference']['bleu']:+.2f} | "
                tail = " | ".join(cells) + f" | s1 {cells[0]} |"
                assert any(line.startswith(row) and line.endswith(tail) for line in md_lines), (row, tail)
    assert sorted(files) == summary["significance_files"] and len(files) == 2 * 2 * 2  # sets x (seed 1, pooled) x baselines


def check_rerun_with_base(cmd: list, work: Path, results: Path) -> None:
    """A re-run reuses every finished step; an evaluation whose JSON is gone is redone over its leftover
    hypotheses; --base skips the base's training even where a re-run without it would train again."""
    (work / "seed1" / "mrt" / "test.eval.json").unlink()
    (work / "mle_base" / "run.json").unlink()
    out = run([*cmd, "--base", work / "mle_base" / "checkpoint_last.pt"], timeout=300)
    ran = [line for line in out.splitlines() if line.startswith("[bench] running:")]
    steps = [line for line in ran if "compare.py" not in line]
    assert len(steps) == 2 and "prepare-multi30k.sh" in steps[0] and "evaluate.py" in steps[1], steps
    # only the per-seed comparisons read the re-written mrt hypotheses; the pooled files did not change
    assert len(ran) - len(steps) == 4 and all("seed1.vs_" in line for line in ran if "compare.py" in line), ran
    assert "--overwrite" in steps[1] and str(work / "seed1" / "mrt" / "checkpoint_last.pt") in steps[1]
    assert out.count("reusing") == 4 + 4  # the arms' training; the evaluations of the base and three arms
    summary = json.loads(results.with_suffix(".json").read_text())
    assert summary["base"] == {"checkpoint": str(work / "mle_base" / "checkpoint_last.pt"), "reused": True}
    assert summary["arms"]["mle_base"]["updates"] is None and summary["arms"]["mrt"]["sets"]["test_2017_mscoco"]["bleu_mean"] is not None
    assert "- base MLE: reused with --base" in results.read_text()

    missing = subprocess.run([*map(str, cmd), "--base", str(work / "nope.pt")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and f"--base {work / 'nope.pt'}: no such checkpoint file" in missing.stderr


@pytest.mark.slow
@pytest.mark.skipif(not RAW_DIR.is_dir(), reason=f"Multi30k raw files not found at {RAW_DIR}")
def test_bench_bleu_smoke(tmp_path):
    results = tmp_path / "out" / "results.md"
    cmd = bench_command(tmp_path, results)
    out = run(cmd, timeout=900)
    assert "wrote" in out

    summary = json.loads(results.with_suffix(".json").read_text())
    md = results.read_text()
    md_lines, out_lines = md.splitlines(), out.splitlines()
    assert {"command", "machine", "settings", "data", "bleu_signature", "chrf_signature", "arms", "targets"} <= set(summary)
    assert summary["bleu_signature"].startswith("nrefs:1") and "nc:" in summary["chrf_signature"]
    assert summary["data"]["train_pairs"] <= 300 and summary["base"]["reused"] is False
    assert summary["targets"]["full_protocol"] is False and summary["compute_s"] > 0
    check_arms(summary, tmp_path, md_lines, out_lines)
    check_sets(summary, md)
    check_significance(summary, tmp_path / "work", md_lines)
    for needle in (
        "| arm |",
        "BLEU signature",
        "Reduced scale",
        "valid_bleu.png",
        "## Commands",
        "soft beam, hamming loss",
        "soft beam, risk loss",
        "MRT (risk loss, hard beam search)",
        "compute-matched",
        "## Significance",
    ):
        assert needle in md, needle

    png = results.with_name("results_valid_bleu.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    check_rerun_with_base(cmd, tmp_path / "work", results)
