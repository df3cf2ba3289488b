"""The data recipes (data_prep/prepare-wmt14.sh, data_prep/prepare-multi30k.sh), offline.

WMT'14: tiny archives with the real file names and member layout (a few hundred lines each, with
planted empty, too long, badly proportioned and duplicate pairs) go through the whole recipe, for
en-de and en-fr. Multi30k: the real files from ../shared/data/multi30k when present, and tiny files
with the real names of all four test sets. Test sets (--test-sets): each its own split, never
cleaned. Bad input: missing or truncated archives, a missing member, a missing tool, a failed
download, unknown, repeated or missing test sets.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import BIN, ROOT

PREP = ROOT / "data_prep"
WMT = PREP / "prepare-wmt14.sh"
M30K = PREP / "prepare-multi30k.sh"
MULTI30K_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/multi30k"

WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name"
).split()
N_GOOD = 60  # clean pairs per training corpus


def translate(words: list[str], lang: str) -> list[str]:
    """A deterministic 'translation' of English words (same length, so ratio 1)."""
    if lang == "en":
        return list(words)
    if lang == "de":
        return [w[::-1].capitalize() for w in words]
    return [w + "e" for w in words]  # fr


class Corpus:
    """Parallel text with planted bad pairs; knows which pairs a correct cleaner keeps."""

    def __init__(self, rng: random.Random, used: set, xx: str, earlier: list | None = None):
        self.en, self.xx, self.good = [], [], []
        planted = {
            5: ("", "a b c"),  # empty source
            9: ("a b c", ""),  # empty target
            13: ("   \t ", "x y"),  # whitespace only
            17: (" ".join(["long"] * 260), " ".join(["lang"] * 260)),  # too long (> 250 words)
            21: ("two words", "eins zwei drei vier fuenf sechs sieben acht"),  # length ratio 4
        }
        i = 0
        while len(self.good) < N_GOOD:
            if i in planted:
                self._add(*planted[i])
            elif i == 25:
                self._add(*self.good[2])  # duplicate within the corpus
            elif i == 29:
                self._add("  " + self.good[3][0].replace(" ", "   ") + " ", self.good[3][1] + "  ")  # same after spaces
            elif i == 33 and earlier:
                self._add(*earlier[0])  # duplicate of an earlier corpus
            else:
                while True:
                    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
                    if " ".join(words) not in used:
                        break
                used.add(" ".join(words))
                pair = (" ".join(words), " ".join(translate(words, xx)))
                self._add(*pair)
                self.good.append(pair)
            i += 1

    def _add(self, en: str, xx: str):
        self.en.append(en)
        self.xx.append(xx)

    def text(self, lang: str) -> str:
        return "\n".join(self.en if lang == "en" else self.xx) + "\n"


def _tar(path: Path, members: dict[str, bytes | str]):
    mode = "w:gz" if path.suffix == ".tgz" else "w"
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_400_000_000
            tar.addfile(info, io.BytesIO(data))


def _sgm(segs: list[str], kind: str, lang: str) -> str:
    head = ('<srcset setid="newstest2014" srclang="any">' if kind == "src"
            else f'<refset setid="newstest2014" srclang="any" trglang="{lang}">')  # fmt: skip
    lines = [head, '<doc sysid="ref" docid="1012-bbc" genre="news" origlang="en">', "<p>"]
    lines += [f'<seg id="{i + 1}">{s}</seg>' for i, s in enumerate(segs)]
    lines += ["</p>", "</doc>", "</srcset>" if kind == "src" else "</refset>"]
    return "\n".join(lines) + "\n"


def build_dev_archive(raw: Path, rng: random.Random, expect: dict) -> None:
    """dev.tgz: newstest2013 (valid) and newstest2012 (a test set on request), trilingual plain text."""
    # newstest2013 (valid): trilingual plain text, one empty line that cleaning drops
    dev_en = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(30)]
    dev_en[4] = ""
    dev = {lang: [" ".join(translate(s.split(), lang)) for s in dev_en] for lang in ("en", "de", "fr")}
    # newstest2012 (a test set on request): plain text, not cleaned (empty, 300-word, repeated lines stay)
    nt12_en = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(12)]
    nt12_en[2], nt12_en[5], nt12_en[6] = "", " ".join(["long"] * 300), nt12_en[4]
    nt12 = {lang: [" ".join(translate(s.split(), lang)) for s in nt12_en] for lang in ("en", "de", "fr")}
    _tar(raw / "dev.tgz", {
        **{f"dev/newstest2013.{lang}": "\n".join(v) + "\n" for lang, v in dev.items()},
        **{f"dev/newstest2012.{lang}": "\n".join("  " + s.replace(" ", " \t ") for s in v) + "\n"
           for lang, v in nt12.items()},
        "dev/newstest2013-src.en.sgm": _sgm(dev["en"], "src", "en"),
    })  # fmt: skip
    for xx in ("de", "fr"):
        expect[xx]["valid"] = {lang: [s for i, s in enumerate(v) if i != 4] for lang, v in dev.items()}
        expect[xx]["newstest2012"] = nt12


def build_wmt_archives(raw: Path) -> dict:
    """All WMT'14 archives both pairs use, tiny; returns what a correct recipe must produce."""
    raw.mkdir(parents=True, exist_ok=True)
    rng, used = random.Random(1234), set()
    expect = {}
    corpora = {}
    for xx, names in (("de", ["europarl", "commoncrawl", "nc"]),
                      ("fr", ["europarl", "commoncrawl", "un", "nc", "giga"])):  # fmt: skip
        good, first = [], None
        for name in names:
            c = Corpus(rng, used, xx, earlier=first)
            first = first or c.good
            corpora[(name, xx)] = c
            good += c.good
        expect[xx] = {"train": good}

    def pair_files(prefix, name, xx):
        c = corpora[(name, xx)]
        return {f"{prefix}.{xx}": c.text(xx), f"{prefix}.en": c.text("en")}

    _tar(raw / "training-parallel-europarl-v7.tgz", {
        **pair_files("training/europarl-v7.de-en", "europarl", "de"),
        **pair_files("training/europarl-v7.fr-en", "europarl", "fr"),
        "training/europarl-v7.cs-en.cs": "x\n", "training/europarl-v7.cs-en.en": "x\n",
    })  # fmt: skip
    _tar(raw / "training-parallel-commoncrawl.tgz", {
        **pair_files("commoncrawl.de-en", "commoncrawl", "de"),
        **pair_files("commoncrawl.fr-en", "commoncrawl", "fr"),
        "commoncrawl.de-en.annotation": "http://example.com\n",
    })  # fmt: skip
    _tar(raw / "training-parallel-un.tgz", pair_files("un/undoc.2000.fr-en", "un", "fr"))
    _tar(raw / "training-parallel-nc-v9.tgz", {
        **pair_files("training/news-commentary-v9.de-en", "nc", "de"),
        **pair_files("training/news-commentary-v9.fr-en", "nc", "fr"),
    })  # fmt: skip
    giga = corpora[("giga", "fr")]
    _tar(raw / "training-giga-fren.tar", {
        "giga-fren.release2.fixed.fr.gz": gzip.compress(giga.text("fr").encode(), mtime=0),
        "giga-fren.release2.fixed.en.gz": gzip.compress(giga.text("en").encode(), mtime=0),
    })  # fmt: skip

    build_dev_archive(raw, rng, expect)

    # newstest2014 (test): SGML, not cleaned (empty, long and repeated segments stay)
    test_en = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(25)]
    test_en[3] = " ".join(["long"] * 300)
    test_en[7] = ""
    test_en[9] = test_en[8]
    test_en[11] = "AT&amp;T and  spaces"
    segs = {lang: [" ".join(translate(s.split(), lang)) if s else "" for s in test_en] for lang in ("en", "de", "fr")}
    segs["en"][11] = "AT&amp;T and  spaces"
    members = {}
    for xx in ("de", "fr"):
        tag = f"{xx}en"
        for kind in ("src", "ref"):
            for lang in ("en", xx):
                members[f"test-full/newstest2014-{tag}-{kind}.{lang}.sgm"] = _sgm(segs[lang], kind, lang)
        members[f"test-full/newstest2014-{tag}-src.{xx}.sgm"] = _sgm(
            ["  " + s + "   " for s in segs[xx]], "src", xx
        )  # spaces around: stripped
    _tar(raw / "test-full.tgz", members)
    for xx in ("de", "fr"):
        expect[xx]["test"] = {lang: [" ".join(s.split()) for s in segs[lang]] for lang in ("en", xx)}
    return expect


@pytest.fixture(scope="module")
def wmt_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("wmt-archives")
    return raw, build_wmt_archives(raw)


def prep_env(**extra) -> dict:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONWARNINGS="ignore", **extra)


def run_recipe(script: Path, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *map(str, args)], env=env or prep_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout + proc.stderr


def failed(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, f"expected a failure\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stderr


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def check_layout(out: Path, src: str, tgt: str, n_train: int, n_valid: int, tests: dict[str, int]):
    """The fixed output layout, with consistent line counts through every stage; TESTS: split -> lines."""
    counts = {"train": n_train, "valid": n_valid, **tests}
    for split, n in counts.items():
        for lang in (src, tgt):
            assert len(lines(out / "raw" / f"{split}.{lang}")) == n, (split, lang)
            enc = lines(out / "spm-encoded" / f"{split}.{lang}")
            assert len(enc) == n, (split, lang)
    assert (out / "spm" / "spm.model").is_file() and (out / "spm" / "spm.vocab").is_file()
    assert any("▁" in line for line in lines(out / "spm-encoded" / f"train.{src}"))
    bin_ = out / "data-bin"
    dict_src, dict_tgt = (bin_ / f"dict.{src}.txt").read_text(), (bin_ / f"dict.{tgt}.txt").read_text()
    assert dict_src == dict_tgt and len(dict_src.splitlines()) > 20  # --joined-dictionary

    from fairseq.data.indexed_dataset import MMapIndexedDataset

    for split, n in counts.items():
        for lang in (src, tgt):
            ds = MMapIndexedDataset(str(bin_ / f"{split}.{src}-{tgt}.{lang}"))
            assert len(ds) == n, (split, lang)
    info = json.loads((out / "prep.json").read_text())
    assert {k: info[k] for k in ("src", "tgt", "train_pairs")} == {"src": src, "tgt": tgt, "train_pairs": n_train}
    return info


@pytest.mark.slow
def test_wmt14_en_de_cleans_encodes_binarises_and_reruns(wmt_raw, tmp_path):
    raw, expect = wmt_raw
    out = tmp_path / "wmt14.en-de"
    args = ["--pair", "en-de", "--src", "en", "--tgt", "de", "--raw-dir", raw, "--no-download", "--out", out,
            "--vocab-size", 150, "--workers", 2]  # fmt: skip
    log = ok(run_recipe(WMT, *args))
    exp = expect["de"]
    info = check_layout(out, "en", "de", len(exp["train"]), len(exp["valid"]["en"]), {"test": len(exp["test"]["en"])})
    assert info["corpus"] == "wmt14" and info["vocab_size"] == 150 and info["subset"] is None
    assert info["test_sets"] == {"test": "newstest2014"}  # the default
    assert info["test_set_pairs"] == {"newstest2014": len(exp["test"]["en"])}

    # training: exactly the clean pairs of the three corpora, in order (empty, whitespace-only, > 250
    # words, ratio > 1.5, duplicates within and across corpora and up to spaces all dropped)
    assert list(zip(lines(out / "raw/train.en"), lines(out / "raw/train.de"), strict=True)) == exp["train"]
    assert len(exp["train"]) == 3 * N_GOOD
    assert lines(out / "raw/valid.en") == exp["valid"]["en"] and lines(out / "raw/valid.de") == exp["valid"]["de"]
    # test: SGML stripped, nothing cleaned (an empty, a 300-word and a repeated segment stay)
    assert lines(out / "raw/test.en") == exp["test"]["en"] and lines(out / "raw/test.de") == exp["test"]["de"]
    assert "" in lines(out / "raw/test.en") and "AT&amp;T and spaces" in lines(out / "raw/test.en")
    assert "commoncrawl.de-en.de" in log

    # a re-run does nothing again
    stamp = (out / "spm/spm.model").stat().st_mtime_ns, (out / "data-bin/dict.en.txt").stat().st_mtime_ns
    log2 = ok(run_recipe(WMT, *args))
    for step in ("extract", "raw", "spm", "encode", "binarize"):
        assert f"step {step}: " in log2 and "skipping" in log2.split(f"step {step}: ")[1].split("\n")[0], step
    assert "training a joint sentencepiece" not in log2
    assert stamp == ((out / "spm/spm.model").stat().st_mtime_ns, (out / "data-bin/dict.en.txt").stat().st_mtime_ns)

    # a changed option redoes what depends on it, and only that
    log3 = ok(run_recipe(WMT, *args[:-4], "--vocab-size", 120, "--workers", 2))
    assert "step raw: " in log3 and "skipping" in log3.split("step raw: ")[1].split("\n")[0]
    assert "training a joint sentencepiece model (vocab 120)" in log3
    assert json.loads((out / "prep.json").read_text())["vocab_size"] == 120


@pytest.mark.slow
def test_wmt14_fr_en_subset_through_giga_fren(wmt_raw, tmp_path):
    raw, expect = wmt_raw
    exp = expect["fr"]
    subset = len(exp["train"]) - 5  # ends in Giga-fren, the last corpus (a .gz inside the .tar)
    out = tmp_path / "wmt14.fr-en"
    log = ok(run_recipe(WMT, "--pair", "en-fr", "--src", "fr", "--tgt", "en", "--raw-dir", raw, "--no-download",
                        "--out", out, "--vocab-size", 150, "--subset", subset, "--workers", 2,
                        "--test-sets", "newstest2012,newstest2014"))  # fmt: skip
    nt12 = exp["newstest2012"]
    info = check_layout(out, "fr", "en", subset, len(exp["valid"]["en"]),
                        {"test": len(nt12["en"]), "test1": len(exp["test"]["en"])})  # fmt: skip
    assert info["subset"] == subset and info["corpus"] == "wmt14"
    assert info["test_sets"] == {"test": "newstest2012", "test1": "newstest2014"}
    assert list(zip(lines(out / "raw/train.en"), lines(out / "raw/train.fr"), strict=True)) == exp["train"][:subset]
    # newstest2012 from dev.tgz's plain text: whitespace normalised, nothing dropped
    assert lines(out / "raw/test.fr") == nt12["fr"] and lines(out / "raw/test.en") == nt12["en"]
    assert "" in nt12["en"] and len(set(nt12["en"])) < len(nt12["en"])
    assert lines(out / "raw/test1.fr") == exp["test"]["fr"] and lines(out / "raw/test1.en") == exp["test"]["en"]
    assert lines(out / "raw/valid.fr") == exp["valid"]["fr"]
    assert "giga-fren.release2.fixed.fr" in log and "subset reached" in log


@pytest.mark.slow
@pytest.mark.parametrize("tgt", ["de", "fr"])
def test_multi30k_subset(tgt, tmp_path):
    if not (MULTI30K_DIR / f"train.{tgt}.gz").is_file():
        pytest.skip(f"Multi30k not found at {MULTI30K_DIR} (../shared/data/multi30k beside the checkout)")
    out = tmp_path / f"multi30k.en-{tgt}"
    log = ok(run_recipe(M30K, "--tgt", tgt, "--raw-dir", MULTI30K_DIR, "--no-download", "--out", out,
                        "--subset", 500, "--vocab-size", 400, "--workers", 2))  # fmt: skip
    info = check_layout(out, "en", tgt, 500, 1014, {"test": 1000})
    assert info["corpus"] == "multi30k" and info["subset"] == 500
    assert info["test_sets"] == {"test": "test_2016_flickr"}
    assert "WARNING: skipping test set test_2017_mscoco" in log and "--no-download" in log

    def original(name):
        with gzip.open(MULTI30K_DIR / name, "rt", encoding="utf-8") as f:
            return [" ".join(line.split()) for line in f.read().split("\n")[:-1]]

    # the first 500 training pairs are clean; test is the reference, unchanged
    assert lines(out / "raw/train.en") == original("train.en.gz")[:500]
    assert lines(out / f"raw/train.{tgt}") == original(f"train.{tgt}.gz")[:500]
    assert lines(out / f"raw/test.{tgt}") == original(f"test_2016_flickr.{tgt}.gz")
    assert lines(out / "raw/valid.en") == original("val.en.gz")


def write_gz(path: Path, lines_: list[str]):
    path.write_bytes(gzip.compress(("\n".join(lines_) + "\n").encode(), mtime=0))


def multi30k_test_set(rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    """A test set as a reference is: odd spaces, an empty line, a 300-word and a repeated caption."""
    en = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]
    en[1], en[2], en[4] = "", " ".join(["long"] * 300), en[3]
    de = [" ".join(translate(s.split(), "de")) for s in en]
    de[0] = " \t" + de[0].replace(" ", "  ") + " "
    return en, de


@pytest.mark.slow
def test_multi30k_recipe_on_synthetic_files(tmp_path):
    """Multi30k's layout (and the cleaning) without the real data: always runs. Three of the four
    test sets are there; the fourth cannot be downloaded and is skipped. A second run that names the
    test sets re-binarises without retraining sentencepiece."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = random.Random(7)
    corpus = Corpus(rng, set(), "de")
    for split, en, de in (("train", corpus.en, corpus.xx), ("val", corpus.en[:20], corpus.xx[:20]),
                          ("test_2016_flickr", corpus.en[:15], corpus.xx[:15])):  # fmt: skip
        for lang, text in (("en", en), ("de", de)):
            write_gz(raw / f"{split}.{lang}.gz", text)
    tests = {"test_2017_flickr": multi30k_test_set(rng, 9), "test_2017_mscoco": multi30k_test_set(rng, 7)}
    for name, (en, de) in tests.items():
        write_gz(raw / f"{name}.en.gz", en)
        write_gz(raw / f"{name}.de.gz", de)
    out = tmp_path / "out"
    env = prep_env(MULTI30K_URL=f"file://{tmp_path}/nowhere")  # offline: the download fails at once
    log = ok(run_recipe(M30K, "--tgt", "de", "--raw-dir", raw, "--out", out, "--vocab-size", 100,
                        "--ratio", 1.5, "--workers", 1, env=env))  # fmt: skip
    assert list(zip(lines(out / "raw/train.en"), lines(out / "raw/train.de"), strict=True)) == corpus.good
    assert len(lines(out / "raw/test.en")) == 15  # test: nothing dropped
    assert len(lines(out / "raw/valid.en")) == 20 - 4  # valid: empty x2, whitespace-only, too long dropped
    info = json.loads((out / "prep.json").read_text())
    assert info["train_pairs"] == N_GOOD and (out / "data-bin/test.en-de.de.bin").is_file()
    assert info["test_sets"] == {"test": "test_2016_flickr", "test1": "test_2017_flickr", "test2": "test_2017_mscoco"}
    assert "WARNING: skipping test set test_2018_flickr: download failed" in log
    for split, name in (("test1", "test_2017_flickr"), ("test2", "test_2017_mscoco")):
        en, de = tests[name]
        assert lines(out / f"raw/{split}.en") == en  # the empty, long and repeated captions stay
        assert lines(out / f"raw/{split}.de") == [" ".join(s.split()) for s in de]  # whitespace normalised
        assert info["test_set_pairs"][name] == len(en)
    check_layout(out, "en", "de", N_GOOD, 16, {"test": 15, "test1": 9, "test2": 7})

    spm_stamp = (out / "spm/spm.model").stat().st_mtime_ns
    log = ok(run_recipe(M30K, "--tgt", "de", "--raw-dir", raw, "--out", out, "--vocab-size", 100, "--ratio", 1.5,
                        "--workers", 1, "--no-download", "--test-sets", "test_2017_mscoco,test_2016_flickr"))  # fmt: skip
    assert "WARNING" not in log and "training a joint sentencepiece" not in log
    assert (out / "spm/spm.model").stat().st_mtime_ns == spm_stamp
    info = check_layout(out, "en", "de", N_GOOD, 16, {"test": 7, "test1": 15})
    assert info["test_sets"] == {"test": "test_2017_mscoco", "test1": "test_2016_flickr"}
    assert lines(out / "raw/test.en") == tests["test_2017_mscoco"][0]
    assert not list(out.glob("*/test2.*"))  # the earlier third split is gone from raw, spm-encoded, data-bin


# ---------------------------------------------------------------- bad input: clear message, non-zero exit


def copy_raw(raw: Path, dest: Path) -> Path:
    shutil.copytree(raw, dest)
    return dest


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def wmt_args(raw, out, pair="en-de"):
    return ["--pair", pair, "--raw-dir", raw, "--no-download", "--out", out, "--vocab-size", 100, "--workers", 1]


def test_wmt14_missing_archive(wmt_raw, tmp_path):
    raw = copy_raw(wmt_raw[0], tmp_path / "raw")
    (raw / "training-parallel-commoncrawl.tgz").unlink()
    err = failed(run_recipe(WMT, *wmt_args(raw, tmp_path / "out")))
    assert "missing archive" in err and "training-parallel-commoncrawl.tgz" in err


def test_wmt14_truncated_tgz(wmt_raw, tmp_path):
    raw = copy_raw(wmt_raw[0], tmp_path / "raw")
    truncate(raw / "training-parallel-europarl-v7.tgz")
    err = failed(run_recipe(WMT, *wmt_args(raw, tmp_path / "out")))
    assert "corrupt or truncated" in err and "training-parallel-europarl-v7.tgz" in err
    assert not (tmp_path / "out/raw/train.en").exists()


def test_wmt14_truncated_tar(wmt_raw, tmp_path):
    raw = copy_raw(wmt_raw[0], tmp_path / "raw")
    tar_path = raw / "training-giga-fren.tar"
    with tarfile.open(tar_path) as tar:  # cut inside the last member (not just the zero padding)
        last = tar.getmembers()[-1]
    tar_path.write_bytes(tar_path.read_bytes()[: last.offset_data + last.size // 2])
    err = failed(run_recipe(WMT, *wmt_args(raw, tmp_path / "out", pair="en-fr")))
    assert "corrupt or truncated" in err and "training-giga-fren.tar" in err


def test_wmt14_missing_member(wmt_raw, tmp_path):
    raw = copy_raw(wmt_raw[0], tmp_path / "raw")
    _tar(raw / "training-parallel-nc-v9.tgz", {"training/news-commentary-v8.de-en.de": "x\n"})  # wrong version
    err = failed(run_recipe(WMT, *wmt_args(raw, tmp_path / "out")))
    assert "training/news-commentary-v9.de-en.de" in err and "not found in archive" in err


def test_wmt14_bad_options(tmp_path):
    err = failed(run_recipe(WMT, "--pair", "en-ru", "--out", tmp_path / "out"))
    assert "en-ru" in err
    err = failed(run_recipe(WMT, "--pair", "en-de", "--src", "en", "--tgt", "fr", "--out", tmp_path / "out"))
    assert "does not match" in err
    err = failed(run_recipe(WMT, "--pair", "en-de", "--out", tmp_path / "out", "--subset", "many"))
    assert "--subset" in err
    err = failed(run_recipe(WMT, "--pair", "en-de", "--out", tmp_path / "out", "--test-sets", "newstest2014,newstest2015"))
    assert "unknown test set 'newstest2015'" in err and "newstest2009" in err


def test_missing_fairseq_preprocess(wmt_raw, tmp_path):
    """PATH without fairseq-preprocess (python given by $PYTHON): fails before any work."""
    env = dict(os.environ, PATH="/usr/bin:/bin", PYTHON=str(BIN / "python"))
    env.pop("FAIRSEQ_PREPROCESS", None)
    assert shutil.which("fairseq-preprocess", path=env["PATH"]) is None
    err = failed(run_recipe(WMT, *wmt_args(wmt_raw[0], tmp_path / "out"), env=env))
    assert "fairseq-preprocess" in err and "not found" in err
    err = failed(run_recipe(M30K, "--tgt", "de", "--out", tmp_path / "out2", env=env))
    assert "fairseq-preprocess" in err
    assert not (tmp_path / "out/orig").exists()


def test_missing_python(tmp_path):
    err = failed(run_recipe(M30K, "--tgt", "de", "--out", tmp_path / "out",
                            env=prep_env(PYTHON=str(tmp_path / "no-such-python"))))  # fmt: skip
    assert "PYTHON=" in err and "no-such-python" in err


def test_multi30k_truncated_gz(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for split in ("train", "val", "test_2016_flickr"):
        for lang in ("en", "fr"):
            (raw / f"{split}.{lang}.gz").write_bytes(gzip.compress(b"a small caption\n" * 200, mtime=0))
    truncate(raw / "val.fr.gz")
    err = failed(run_recipe(M30K, "--tgt", "fr", "--raw-dir", raw, "--no-download", "--out", tmp_path / "out"))
    assert "corrupt or truncated" in err and "val.fr.gz" in err


def test_multi30k_missing_file_and_failed_download(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    err = failed(run_recipe(M30K, "--tgt", "de", "--raw-dir", raw, "--no-download", "--out", tmp_path / "out"))
    assert "missing archive" in err and "train.en.gz" in err
    env = prep_env(MULTI30K_URL=f"file://{tmp_path}/nowhere")
    err = failed(run_recipe(M30K, "--tgt", "de", "--raw-dir", raw, "--out", tmp_path / "out", env=env))
    assert "download failed" in err and "train.en.gz" in err
    assert not list(raw.iterdir())  # no partial file left behind


def test_multi30k_test_sets_bad_input(tmp_path):
    """Unknown, repeated or empty names; a named set missing under --no-download; a set whose two
    sides differ in length. Each fails with a message that names the problem."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("train", "val", "test_2016_flickr"):
        for lang in ("en", "de"):
            write_gz(raw / f"{name}.{lang}.gz", ["a small caption"] * 5)
    write_gz(raw / "test_2017_mscoco.en.gz", ["a caption"] * 4)
    write_gz(raw / "test_2017_mscoco.de.gz", ["eine Beschriftung"] * 3)

    def fails(sets: str, match: str):
        err = failed(run_recipe(M30K, "--tgt", "de", "--raw-dir", raw, "--no-download", "--out", tmp_path / "out",
                                "--workers", 1, "--test-sets", sets))  # fmt: skip
        assert match in err, err

    fails("test_2016_flickr,test_2019_flickr", "unknown test set 'test_2019_flickr' in --test-sets (known: test_2016_flickr,")
    fails("test_2016_flickr,test_2016_flickr", "test set 'test_2016_flickr' given twice")
    fails("", "--test-sets needs comma-separated set names")
    fails("test_2016_flickr,", "--test-sets needs comma-separated set names")
    fails("test_2016_flickr,test_2018_flickr", f"missing archive: {raw}/test_2018_flickr.en.gz (not found and --no-download")
    fails("test_2017_mscoco", "test set test_2017_mscoco: the en side has 4 lines but the de side has 3")
