"""scripts/evaluate.py: generate-output parsing, sentencepiece decoding, sacreBLEU scoring, the CLI."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
from helpers import BIN, ROOT, TINY_ARCH, cli, run

spec = importlib.util.spec_from_file_location("evaluate", ROOT / "scripts" / "evaluate.py")
evaluate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate)

HYPS = ["The cat sat on the mat.", "A dog runs in the park!", "Two men, one ladder.", ""]
REFS = ["The cat sat on a mat.", "A dog is running in the park!", "Two men and one ladder.", "Nothing here."]
SENTENCES = [
    "Ein Mann fährt Fahrrad.",
    "Zwei junge Männer spielen im Park Fußball, während es regnet.",
    "Eine Frau liest ein Buch über Ägypten (1999), Seite 42!",
    '"Hallo", sagte das Kind.',
]


# ---------------------------------------------------------------- scoring


def test_score_files_is_exactly_sacrebleu(tmp_path):
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("\n".join(HYPS) + "\n")
    ref.write_text("\n".join(REFS) + "\n")
    scores = evaluate.score_files(hyp, ref)

    bleu = sacrebleu.corpus_bleu(HYPS, [REFS])
    chrf = sacrebleu.corpus_chrf(HYPS, [REFS])
    assert scores["bleu"] == bleu.score and scores["chrf"] == chrf.score
    assert scores["bleu_verbose"] == str(bleu) and scores["n_sentences"] == 4
    assert scores["bleu"] == pytest.approx(35.59, abs=0.01)  # pinned: sacreBLEU 2.x, 13a, exp smoothing
    assert scores["bleu_signature"] == f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    assert scores["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|")
    assert evaluate.score_lines(REFS, REFS)["bleu"] == pytest.approx(100.0)
    assert evaluate.score_lines(HYPS[::-1], REFS)["bleu"] < scores["bleu"]  # order matters


def test_score_count_mismatch_is_an_error(tmp_path):
    with pytest.raises(evaluate.EvalError, match="3 hypotheses but 4 references"):
        evaluate.score_lines(HYPS[:3], REFS)


# ---------------------------------------------------------------- sentencepiece


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A small joint model, trained by the recipes' own helper."""
    root = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = " ".join(SENTENCES + REFS).replace(".", " ").split()
    text = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    (root / "train.txt").write_text("\n".join(SENTENCES + REFS + text) + "\n")
    run([sys.executable, ROOT / "data_prep/spm_train.py", "--input", root / "train.txt",
         "--model-prefix", root / "spm", "--vocab-size", 120])  # fmt: skip
    return root / "spm.model"


def test_sentencepiece_round_trip(spm_model, tmp_path):
    pieces = evaluate.encode_pieces(SENTENCES, spm_model)
    assert all("▁" in p and " " in p for p in pieces)
    assert evaluate.decode_pieces(pieces, spm_model) == SENTENCES

    # the same through the recipes' encoder, file to file
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + "\n\n")
    run([sys.executable, ROOT / "data_prep/spm_encode.py", "--model", spm_model,
         "--inputs", tmp_path / "in.txt", "--outputs", tmp_path / "out.txt"])  # fmt: skip
    encoded = evaluate.read_lines(tmp_path / "out.txt")
    assert encoded == pieces + [""]  # line count kept, empty line included
    assert evaluate.decode_pieces(encoded, spm_model) == SENTENCES + [""]


# ---------------------------------------------------------------- fairseq-generate output


def generate_output(pieces: list[str], order: list[int]) -> str:
    out = ["2026-01-01 | INFO | fairseq_cli.generate | loading model(s)"]
    for i in order:
        out += [f"S-{i}\tsource {i}", f"T-{i}\t{pieces[i]}", f"H-{i}\t-0.{i}123\t{pieces[i]}",
                f"D-{i}\t-0.{i}123\t{pieces[i]}", f"P-{i}\t-0.1 -0.2"]  # fmt: skip
    out.append("Generate test with beam=5: BLEU4 = 12.34, 40.0/20.0/10.0/5.0 (BP=1.000, ratio=1.000)")
    return "\n".join(out) + "\n"


def test_parse_generate_output_restores_order():
    pieces = [f"▁sentence ▁{i}" for i in range(12)]
    order = list(range(12))
    random.Random(3).shuffle(order)
    assert order != sorted(order)
    assert evaluate.parse_generate_output(generate_output(pieces, order)) == pieces
    # list input, an empty hypothesis (with or without its tab), nbest > 1 keeps the best (first)
    lines = ["H-1\t-1.5\t▁b", "H-0\t-0.5\t▁a", "H-0\t-0.9\t▁worse", "H-2\t-3.0\t", "H-3\t-3.0"]
    assert evaluate.parse_generate_output(lines) == ["▁a", "▁b", "", ""]


def test_parse_generate_output_errors():
    with pytest.raises(evaluate.EvalError, match="no hypotheses"):
        evaluate.parse_generate_output("S-0\tx\nT-0\ty\n")
    with pytest.raises(evaluate.EvalError, match="ids 1$"):
        evaluate.parse_generate_output("H-0\t-1\t▁a\nH-2\t-1\t▁c\n")
    with pytest.raises(evaluate.EvalError, match="2 hypotheses but 4 are needed.*ids 1, 3$"):
        evaluate.parse_generate_output("H-0\t-1\t▁a\nH-2\t-1\t▁c\n", expected=4)
    with pytest.raises(evaluate.EvalError, match="ids up to 2 but there are 2 references"):
        evaluate.parse_generate_output("H-0\t-1\t▁a\nH-1\t-1\t▁b\nH-2\t-1\t▁c\n", expected=2)


# ---------------------------------------------------------------- the CLI


def make_data_dir(root: Path, spm_model: Path, refs: list[str], tests: dict | None = None) -> Path:
    """The parts of a prepared folder that evaluate.py reads; TESTS: split -> (set name, references)."""
    (root / "raw").mkdir(parents=True)
    (root / "spm").mkdir()
    (root / "data-bin").mkdir()
    (root / "raw/test.de").write_text("\n".join(refs) + "\n")
    (root / "spm/spm.model").write_bytes(spm_model.read_bytes())
    (root / "data-bin/dict.de.txt").write_text("▁a 1\n")
    prep = {"src": "en", "tgt": "de", "corpus": "test"}
    if tests:
        prep["test_sets"] = {split: name for split, (name, _) in tests.items()}
        for split, (_, lines) in tests.items():
            (root / f"raw/{split}.de").write_text("\n".join(lines) + "\n")
    (root / "prep.json").write_text(json.dumps(prep))
    return root


def fake_generate(path: Path, output: str) -> Path:
    """A stand-in fairseq-generate that prints OUTPUT and records its arguments."""
    (path.parent / "generate.out").write_text(output)
    path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{path.parent}/generate.args"\n'
                    f'cat "{path.parent}/generate.out"\n')  # fmt: skip
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_generate_by(folder: Path, outputs: dict) -> Path:
    """A stand-in fairseq-generate that prints OUTPUTS[(gen-subset, beam)] and logs each call."""
    for (split, beam), output in outputs.items():
        (folder / f"gen.{split}.{beam}.out").write_text(output)
    path = folder / "fake-generate-by"
    path.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{folder}/generate.calls"\n'
                    'while (($#)); do case $1 in --gen-subset) s=$2 ;; --beam) b=$2 ;; esac; shift; done\n'
                    f'cat "{folder}/gen.$s.$b.out"\n')  # fmt: skip
    path.chmod(0o755)
    return path


def calls(folder: Path) -> list[str]:
    log = folder / "generate.calls"
    return log.read_text().splitlines() if log.is_file() else []


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, ROOT / "scripts/evaluate.py", *map(str, args)], capture_output=True,
                          text=True, env=dict(os.environ, **(env or {})), timeout=600)  # fmt: skip


def test_cli_with_stand_in_generate(spm_model, tmp_path):
    data = make_data_dir(tmp_path / "data", spm_model, SENTENCES)
    ckpt = tmp_path / "ckpts/checkpoint_best.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not read by the stand-in")
    hyps = SENTENCES[:3] + ["Das Kind sagte hallo."]
    pieces = evaluate.encode_pieces(hyps, spm_model)
    gen = fake_generate(tmp_path / "fake-generate", generate_output(pieces, [3, 1, 0, 2]))

    proc = run_cli("--data", data, "--checkpoint", ckpt, "--task", "translation", "--cpu", "--beam", 4,
                   "--extra", "--fp16 --seed 3", env={"FAIRSEQ_GENERATE": str(gen)})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out_json = tmp_path / "ckpts/checkpoint_best.test.eval.json"
    result = json.loads(out_json.read_text())
    expected = sacrebleu.corpus_bleu(hyps, [SENTENCES])
    assert result["bleu"] == expected.score and result["chrf"] == sacrebleu.corpus_chrf(hyps, [SENTENCES]).score
    assert f"{expected} (signature: {result['bleu_signature']})" in proc.stdout
    assert "chrF2 = " in proc.stdout
    assert evaluate.read_lines(result["hypotheses_file"]) == hyps  # detokenised, corpus order
    assert Path(result["hypotheses_file"]).parent == out_json.parent
    keys = ("bleu", "chrf", "bleu_signature", "chrf_signature", "bleu_verbose", "checkpoint", "data", "split",
            "beam", "lenpen", "max_len_a", "max_len_b", "task", "n_sentences", "hypotheses_file", "bleu_lowercase",
            "length_ratio", "sets")  # fmt: skip
    assert set(keys) <= set(result), set(keys) - set(result)
    assert (result["split"], result["beam"], result["task"], result["n_sentences"]) == ("test", 4, "translation", 4)
    assert list(result["sets"]) == ["test"] and result["sets"]["test"]["bleu"] == result["bleu"]  # no names: legacy
    assert "beam_sweep" not in result["sets"]["test"] and result["beams"] is None

    args = (tmp_path / "generate.args").read_text().split("\n")
    assert args[0] == str(data / "data-bin")
    for flag, value in (("--user-dir", str(ROOT / "fairseq_plugins")), ("--task", "translation"),
                        ("--path", str(ckpt)), ("--gen-subset", "test"), ("--beam", "4"), ("--lenpen", "1.0"),
                        ("--max-len-a", "1.2"), ("--max-len-b", "10"), ("--source-lang", "en"),
                        ("--required-batch-size-multiple", "1")):  # fmt: skip
        assert args[args.index(flag) + 1] == value, flag
    assert "--cpu" in args and "--fp16" in args and args[args.index("--seed") + 1] == "3"


MSCOCO = ["Ein Hund rennt im Park.", "Zwei Frauen lesen ein Buch.", "Das Kind spielt Fußball."]


def sweep_setup(spm_model, tmp_path):
    """Two prepared test sets and, for each split and beam 1 and 4, different hypotheses."""
    data = make_data_dir(tmp_path / "data", spm_model, SENTENCES,
                         tests={"test": ("test_2016_flickr", SENTENCES), "test1": ("test_2017_mscoco", MSCOCO)})  # fmt: skip
    ckpt = tmp_path / "ckpts/checkpoint_best.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    hyps = {
        ("test", 4): SENTENCES[:3] + ["Das Kind sagte hallo."],
        ("test", 1): ["Ein Mann fährt.", "Zwei Männer spielen Fußball.", "Eine Frau liest.", "Hallo."],
        ("test1", 4): ["ein hund rennt im park.", "Zwei Frauen lesen ein Buch über Ägypten.", "Das Kind spielt."],
        ("test1", 1): ["Ein Hund.", "Zwei Frauen.", "Das Kind."],
    }
    outputs = {key: generate_output(evaluate.encode_pieces(h, spm_model), list(range(len(h)))) for key, h in hyps.items()}
    return data, ckpt, hyps, fake_generate_by(tmp_path, outputs)


def expected_scores(hyps: list[str], refs: list[str]) -> dict:
    bleu = sacrebleu.corpus_bleu(hyps, [refs])
    return {"bleu": bleu.score, "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
            "bleu_lowercase": sacrebleu.corpus_bleu(hyps, [refs], lowercase=True).score,
            "length_ratio": bleu.sys_len / bleu.ref_len}  # fmt: skip


def test_cli_all_test_sets_and_beam_sweep(spm_model, tmp_path):
    data, ckpt, hyps, gen = sweep_setup(spm_model, tmp_path)
    proc = run_cli("--data", data, "--checkpoint", ckpt, "--task", "translation", "--beam", 4, "--beams", "1,4",
                   "--test-set", "all", env={"FAIRSEQ_GENERATE": str(gen)})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "ckpts/checkpoint_best.all.eval.json").read_text())
    refs = {"test": SENTENCES, "test1": MSCOCO}
    assert list(result["sets"]) == ["test_2016_flickr", "test_2017_mscoco"]
    for (name, entry), split in zip(result["sets"].items(), ("test", "test1")):
        assert (entry["test_set"], entry["split"], entry["beam"], entry["n_sentences"]) == (name, split, 4, len(refs[split]))
        want = expected_scores(hyps[(split, 4)], refs[split])
        assert {k: entry[k] for k in want} == want, name
        assert entry["bleu_lowercase"] != entry["bleu"] or split == "test"  # test1's beam-4 output is lowercased
        assert "case:lc" in entry["bleu_lowercase_signature"] and "Multi30k" in entry["bleu_lowercase_note"]
        assert evaluate.read_lines(entry["hypotheses_file"]) == hyps[(split, 4)]
        assert entry["hypotheses_file"].endswith(f"checkpoint_best.all.eval.{name}.hyp.txt")
        sweep = entry["beam_sweep"]
        assert [p["beam"] for p in sweep] == [1, 4]
        for point in sweep:
            want = expected_scores(hyps[(split, point["beam"])], refs[split])
            assert {k: point[k] for k in ("bleu", "chrf", "length_ratio")} == {k: want[k] for k in ("bleu", "chrf", "length_ratio")}
            assert evaluate.read_lines(point["hypotheses_file"]) == hyps[(split, point["beam"])]
        assert sweep[0]["bleu"] != sweep[1]["bleu"] and sweep[0]["hypotheses_file"].endswith(f".{name}.beam1.hyp.txt")
    # the top level is the first set, as a one-set result; each (split, beam) decoded once
    assert result["test_set"] == "test_2016_flickr" and result["bleu"] == result["sets"]["test_2016_flickr"]["bleu"]
    assert result["beams"] == [1, 4]
    decoded = sorted((c.split("--gen-subset ")[1].split()[0], c.split("--beam ")[1].split()[0]) for c in calls(tmp_path))
    assert decoded == [("test", "1"), ("test", "4"), ("test1", "1"), ("test1", "4")]
    assert "== test_2017_mscoco (split test1, 3 sentences, beam 4)" in proc.stdout and "beam   1: BLEU" in proc.stdout

    # one set by name: its own default file names, no sweep
    proc = run_cli("--data", data, "--checkpoint", ckpt, "--task", "translation", "--beam", 4,
                   "--test-set", "test_2017_mscoco", env={"FAIRSEQ_GENERATE": str(gen)})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "ckpts/checkpoint_best.test_2017_mscoco.eval.json").read_text())
    assert list(result["sets"]) == ["test_2017_mscoco"] and result["split"] == "test1"
    assert result["bleu"] == expected_scores(hyps[("test1", 4)], MSCOCO)["bleu"]
    assert result["hypotheses_file"].endswith("checkpoint_best.test_2017_mscoco.eval.hyp.txt")


def test_cli_refuses_to_overwrite_a_result(spm_model, tmp_path):
    data, ckpt, hyps, gen = sweep_setup(spm_model, tmp_path)
    args = ("--data", data, "--checkpoint", ckpt, "--task", "translation", "--beam", 4)
    env = {"FAIRSEQ_GENERATE": str(gen)}
    assert run_cli(*args, env=env).returncode == 0
    out = tmp_path / "ckpts/checkpoint_best.test.eval.json"
    before, n_calls = out.read_bytes(), len(calls(tmp_path))

    proc = run_cli(*args, "--beam", 1, env=env)  # another setting, same paths
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{out} already exists (and 1 more of its files)" in proc.stderr and "--overwrite" in proc.stderr
    assert out.read_bytes() == before and len(calls(tmp_path)) == n_calls  # refused before decoding

    out.unlink()  # a hypotheses file alone is an earlier result too
    proc = run_cli(*args, env=env)
    assert proc.returncode == 1 and f"{tmp_path / 'ckpts/checkpoint_best.test.eval.hyp.txt'} already exists" in proc.stderr

    proc = run_cli(*args, "--beam", 1, "--overwrite", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["bleu"] == expected_scores(hyps[("test", 1)], SENTENCES)["bleu"]


def test_cli_bad_input(spm_model, tmp_path):
    data = make_data_dir(tmp_path / "data", spm_model, SENTENCES)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"x")

    def fails(*args, match, env=None):
        proc = run_cli(*args, env=env)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert match in proc.stderr, proc.stderr

    fails("--data", data, "--checkpoint", tmp_path / "missing.pt", match="checkpoint not found")
    fails("--data", tmp_path / "nowhere", "--checkpoint", ckpt, match="data folder not found")
    fails("--data", tmp_path, "--checkpoint", ckpt, match="prep.json not found")
    # fairseq-generate gives 3 hypotheses for 4 references
    pieces = evaluate.encode_pieces(SENTENCES, spm_model)
    gen = fake_generate(tmp_path / "gen3", generate_output(pieces, [2, 0, 1]))
    fails("--data", data, "--checkpoint", ckpt, match="3 hypotheses but 4 are needed",
          env={"FAIRSEQ_GENERATE": str(gen)})  # fmt: skip
    # fairseq-generate fails: its message is shown
    bad = tmp_path / "gen-fails"
    bad.write_text("#!/usr/bin/env bash\necho 'RuntimeError: model exploded' >&2\nexit 1\n")
    bad.chmod(0o755)
    fails("--data", data, "--checkpoint", ckpt, match="model exploded", env={"FAIRSEQ_GENERATE": str(bad)})


def test_cli_bad_test_sets_and_beams(spm_model, tmp_path):
    data = make_data_dir(tmp_path / "data", spm_model, SENTENCES,
                         tests={"test": ("test_2016_flickr", SENTENCES), "test1": ("test_2017_mscoco", MSCOCO)})  # fmt: skip
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"x")
    base = ("--data", data, "--checkpoint", ckpt)

    def fails(*args, match):
        proc = run_cli(*base, *args, env={"FAIRSEQ_GENERATE": "/bin/false"})
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert match in proc.stderr, proc.stderr

    fails("--test-set", "test_2018_flickr",
          match=f"test set 'test_2018_flickr' is not prepared in {data} (prep.json has: test_2016_flickr, test_2017_mscoco)")  # fmt: skip
    fails("--test-set", "test_2017_mscoco,test_2017_mscoco", match="'test_2017_mscoco' given twice")
    fails("--test-set", "all", "--test-set", "test_2016_flickr", match="--test-set all cannot be combined")
    fails("--test-set", "all", "--split", "test", match="give --test-set or --split, not both")
    fails("--split", "train", match="argument --split: a fairseq split is valid, test, test1")
    fails("--beams", "1,0", match="argument --beams: must be a positive integer (got '0')")
    fails("--beams", "5,1,5", match="a beam size is given twice")
    fails("--beam", "-2", match="argument --beam: must be a positive integer")
    (data / "raw/test1.de").unlink()
    fails("--test-set", "all", match=f"reference of test_2017_mscoco (split test1) not found: {data}/raw/test1.de")


# ---------------------------------------------------------------- end to end, real fairseq


@pytest.mark.slow
def test_evaluate_end_to_end_with_fairseq(tmp_path):
    """prepare-multi30k.sh on tiny synthetic files with two of the test sets, one training update,
    real fairseq-generate on both splits (test, test1). (The beam sweep's runs differ only in --beam:
    the stand-in tests above check it.)"""
    rng = random.Random(5)
    letters = "abcdefghij"
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 80), ("val", 10), ("test_2016_flickr", 12), ("test_2017_mscoco", 7)):
        en = [" ".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(n)]
        de = [" ".join(w.upper() for w in reversed(s.split())) for s in en]
        for lang, text in (("en", en), ("de", de)):
            (raw / f"{split}.{lang}.gz").write_bytes(gzip.compress(("\n".join(text) + "\n").encode(), mtime=0))
    data = tmp_path / "data"
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    run(["bash", ROOT / "data_prep/prepare-multi30k.sh", "--tgt", "de", "--raw-dir", raw, "--no-download",
         "--out", data, "--vocab-size", 40, "--workers", 1], env=env)  # fmt: skip
    save = tmp_path / "ckpt"
    run([cli("fairseq-train"), data / "data-bin", "--task", "translation", *TINY_ARCH, "--optimizer", "adam",
         "--lr", "0.001", "--max-tokens", "2000", "--max-update", "1", "--disable-validation", "--cpu",
         "--save-dir", save, "--no-progress-bar", "--seed", "1"])  # fmt: skip
    out_json = tmp_path / "eval/result.json"
    log = run([sys.executable, ROOT / "scripts/evaluate.py", "--data", data, "--checkpoint",
               save / "checkpoint_last.pt", "--task", "translation", "--cpu", "--beam", 2, "--max-len-b", 3,
               "--output", out_json, "--test-set", "all"])  # fmt: skip
    result = json.loads(out_json.read_text())
    assert list(result["sets"]) == ["test_2016_flickr", "test_2017_mscoco"]
    for name, split, n in (("test_2016_flickr", "test", 12), ("test_2017_mscoco", "test1", 7)):
        entry = result["sets"][name]
        hyps = evaluate.read_lines(entry["hypotheses_file"])
        refs = evaluate.read_lines(data / f"raw/{split}.de")
        assert entry["n_sentences"] == len(hyps) == len(refs) == n
        assert entry["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score
        assert entry["chrf"] == sacrebleu.corpus_chrf(hyps, [refs]).score
    assert "signature: nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp" in log
    assert Path(result["hypotheses_file"]) == tmp_path / "eval/result.test_2016_flickr.hyp.txt"
