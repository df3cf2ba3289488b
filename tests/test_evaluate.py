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


def make_data_dir(root: Path, spm_model: Path, refs: list[str]) -> Path:
    """The parts of a prepared folder that evaluate.py reads."""
    (root / "raw").mkdir(parents=True)
    (root / "spm").mkdir()
    (root / "data-bin").mkdir()
    (root / "raw/test.de").write_text("\n".join(refs) + "\n")
    (root / "spm/spm.model").write_bytes(spm_model.read_bytes())
    (root / "data-bin/dict.de.txt").write_text("▁a 1\n")
    (root / "prep.json").write_text(json.dumps({"src": "en", "tgt": "de", "corpus": "test"}))
    return root


def fake_generate(path: Path, output: str) -> Path:
    """A stand-in fairseq-generate that prints OUTPUT and records its arguments."""
    (path.parent / "generate.out").write_text(output)
    path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{path.parent}/generate.args"\n'
                    f'cat "{path.parent}/generate.out"\n')  # fmt: skip
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


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
            "beam", "lenpen", "max_len_a", "max_len_b", "task", "n_sentences", "hypotheses_file")  # fmt: skip
    assert set(keys) <= set(result), set(keys) - set(result)
    assert (result["split"], result["beam"], result["task"], result["n_sentences"]) == ("test", 4, "translation", 4)

    args = (tmp_path / "generate.args").read_text().split("\n")
    assert args[0] == str(data / "data-bin")
    for flag, value in (("--user-dir", str(ROOT / "fairseq_plugins")), ("--task", "translation"),
                        ("--path", str(ckpt)), ("--gen-subset", "test"), ("--beam", "4"), ("--lenpen", "1.0"),
                        ("--max-len-a", "1.2"), ("--max-len-b", "10"), ("--source-lang", "en"),
                        ("--required-batch-size-multiple", "1")):  # fmt: skip
        assert args[args.index(flag) + 1] == value, flag
    assert "--cpu" in args and "--fp16" in args and args[args.index("--seed") + 1] == "3"


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


# ---------------------------------------------------------------- end to end, real fairseq


@pytest.mark.slow
def test_evaluate_end_to_end_with_fairseq(tmp_path):
    """prepare-multi30k.sh on tiny synthetic files, one training update, real fairseq-generate."""
    rng = random.Random(5)
    letters = "abcdefghij"
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 80), ("val", 10), ("test_2016_flickr", 12)):
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
               "--output", out_json])  # fmt: skip
    result = json.loads(out_json.read_text())
    hyps = evaluate.read_lines(result["hypotheses_file"])
    refs = evaluate.read_lines(data / "raw/test.de")
    assert result["n_sentences"] == len(hyps) == len(refs) == 12
    assert result["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert result["chrf"] == sacrebleu.corpus_chrf(hyps, [refs]).score
    assert "signature: nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp" in log
    assert Path(result["hypotheses_file"]) == tmp_path / "eval/result.hyp.txt"
