"""Translates prepared test sets (or valid) with fairseq-generate and scores them with sacreBLEU.

    python scripts/evaluate.py --data data/multi30k.en-de --checkpoint checkpoints/checkpoint_best.pt
    python scripts/evaluate.py --data data/multi30k.en-de --checkpoint ... --test-set all --beams 1,5,10

``--data`` is a folder made by data_prep/prepare-*.sh (data-bin/, spm/spm.model, raw/, prep.json).
The hypotheses (sentencepiece pieces in fairseq-generate's ``H-`` lines) are put back in corpus order,
decoded with the data's sentencepiece model and scored, detokenised, against the raw references
``raw/<split>.<tgt>``: sacreBLEU's BLEU (cased, its default) and chrF, lowercased BLEU, and the
length ratio. ``--test-set`` picks test sets by name (prep.json maps them to splits test, test1, ...);
``--beams`` adds a beam-size sweep. Writes one JSON summary, with an entry per set under ``sets``,
and each set's decoded hypotheses (one per line) next to it; it never replaces an earlier result
unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "fairseq_plugins"
HYPO_RE = re.compile(r"^H-(\d+)\t([^\t]*)(?:\t(.*))?$")
SPLIT_RE = re.compile(r"^(valid|test[0-9]*)$")
# the test set of split "test" in folders prepared before prep.json named its test sets
LEGACY_TEST_SET = {"multi30k": "test_2016_flickr", "wmt14": "newstest2014"}
LOWERCASE_NOTE = (
    "bleu_lowercase: sacreBLEU BLEU on lowercased text (sacrebleu -lc), because much of the Multi30k "
    "literature reports it; not comparable with the cased bleu, which is sacreBLEU's default"
)


class EvalError(Exception):
    """A problem with the user's input: reported as one message, without a traceback."""


class Setup(NamedTuple):
    """What every fairseq-generate run of one evaluation shares."""

    args: argparse.Namespace
    data: Path
    src: str
    tgt: str


# ---------------------------------------------------------------- pure pieces (unit-tested)


def parse_generate_output(output: str | list[str], expected: int | None = None) -> list[str]:
    """The hypotheses of fairseq-generate's output (``H-<id>\\t<score>\\t<text>`` lines), in id order.

    fairseq-generate prints sentences in batch order, not corpus order; ids are the corpus line
    numbers. With ``--nbest`` > 1 the first (best) hypothesis of each id is kept. Raises EvalError
    unless the ids are exactly 0..n-1 (n = ``expected`` when given, e.g. the number of references).
    """
    lines = output.splitlines() if isinstance(output, str) else output
    hyps: dict[int, str] = {}
    for line in lines:
        if not line.startswith("H-"):
            continue
        m = HYPO_RE.match(line.rstrip("\r\n"))
        if m is None:
            raise EvalError(f"unexpected fairseq-generate line: {line[:200]!r}")
        idx = int(m.group(1))
        hyps.setdefault(idx, m.group(3) or "")
    if not hyps:
        raise EvalError("fairseq-generate printed no hypotheses (no H- lines)")
    n = max(hyps) + 1 if expected is None else expected
    if max(hyps) >= n:
        raise EvalError(f"fairseq-generate gave hypotheses for ids up to {max(hyps)} but there are {n} references")
    missing = sorted(set(range(n)) - set(hyps))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise EvalError(
            f"fairseq-generate gave {len(hyps)} hypotheses but {n} are needed (one per reference); "
            f"none for {len(missing)} sentence(s): ids {shown}"
        )
    return [hyps[i] for i in range(n)]


def load_spm(model):
    import sentencepiece as spm

    if isinstance(model, spm.SentencePieceProcessor):
        return model
    if not Path(model).is_file():
        raise EvalError(f"sentencepiece model not found: {model}")
    return spm.SentencePieceProcessor(model_file=str(model))


def decode_pieces(lines: list[str], model) -> list[str]:
    """Sentencepiece pieces (space-separated, one sentence per item) -> detokenised text."""
    sp = load_spm(model)
    return [sp.decode(line.split()) for line in lines]


def encode_pieces(lines: list[str], model) -> list[str]:
    """Text -> space-separated sentencepiece pieces, as the data recipes encode it."""
    sp = load_spm(model)
    return [" ".join(p) for p in sp.encode(list(lines), out_type=str)]


def read_lines(path) -> list[str]:
    """The lines of a text file; only "\\n" ends a line (so does fairseq's line count)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        text = f.read()
    if text == "":
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def score_lines(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU (cased and lowercased) and chrF, sacreBLEU defaults otherwise, of detokenised
    hypotheses against one reference each; with BLEU's length ratio (hypothesis / reference tokens)."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise EvalError(f"{len(hypotheses)} hypotheses but {len(references)} references: counts must match")
    if not references:
        raise EvalError("nothing to score: no references")
    bleu, chrf, bleu_lc = BLEU(), CHRF(), BLEU(lowercase=True)
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    lc = bleu_lc.corpus_score(hypotheses, [references])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_lowercase": lc.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_lowercase_signature": str(bleu_lc.get_signature()),
        "bleu_verbose": str(b),
        "chrf_verbose": str(c),
        "bleu_lowercase_verbose": str(lc),
        "length_ratio": b.sys_len / b.ref_len if b.ref_len else None,
        "hyp_len": b.sys_len,
        "ref_len": b.ref_len,
        "n_sentences": len(references),
    }


def score_files(hyp_file, ref_file) -> dict:
    for f in (hyp_file, ref_file):
        if not Path(f).is_file():
            raise EvalError(f"file not found: {f}")
    return score_lines(read_lines(hyp_file), read_lines(ref_file))


# ---------------------------------------------------------------- fairseq-generate


def find_generate() -> str:
    """$FAIRSEQ_GENERATE if set, else fairseq-generate next to this python, else on PATH."""
    override = os.environ.get("FAIRSEQ_GENERATE")
    if override:
        found = shutil.which(override)
        if found is None:
            raise EvalError(f"FAIRSEQ_GENERATE={override} is not an executable")
        return found
    local = Path(sys.executable).parent / "fairseq-generate"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("fairseq-generate")
    if found is None:
        raise EvalError("fairseq-generate not found next to this python nor on PATH (install fairseq)")
    return found


def read_prep(data: Path, args) -> tuple[str, str, dict]:
    """Source and target language (the options, else prep.json) and prep.json's contents ({} if none)."""
    src, tgt, info = args.source_lang, args.target_lang, {}
    prep = data / "prep.json"
    if prep.is_file():
        try:
            info = json.loads(prep.read_text())
        except (OSError, ValueError) as e:
            raise EvalError(f"cannot read {prep}: {e}") from None
        src, tgt = src or info.get("src"), tgt or info.get("tgt")
    if not src or not tgt:
        raise EvalError(f"{prep} not found: give --source-lang and --target-lang")
    return src, tgt, info


def prepared_test_sets(info: dict) -> dict[str, str]:
    """Split -> test set name, as prep.json records it."""
    if info.get("test_sets"):
        return dict(info["test_sets"])
    return {"test": LEGACY_TEST_SET.get(info.get("corpus"), "test")}


def select_sets(args, info: dict, data: Path) -> list[tuple[str, str]]:
    """The (set name, split) pairs to score, in order: --test-set's, else the one --split."""
    prepared = prepared_test_sets(info)
    if not args.test_set:
        split = args.split or "test"
        return [(prepared.get(split, split), split)]
    if args.split is not None:
        raise EvalError("give --test-set or --split, not both")
    names = [n.strip() for value in args.test_set for n in value.split(",")]
    if "all" in names:
        if names != ["all"]:
            raise EvalError(f"--test-set all cannot be combined with other names (got {','.join(names)})")
        return [(name, split) for split, name in prepared.items()]
    by_name = {name: split for split, name in prepared.items()}
    known = ", ".join(by_name)
    chosen = []
    for name in names:
        if name not in by_name:
            raise EvalError(
                f"test set {name!r} is not prepared in {data} (prep.json has: {known}); prepare it with data_prep/prepare-*.sh --test-sets"
            )
        if any(name == n for n, _ in chosen):
            raise EvalError(f"test set {name!r} given twice in --test-set")
        chosen.append((name, by_name[name]))
    return chosen


def generate_command(args, data_bin: Path, src: str, tgt: str, split: str, beam: int) -> list[str]:
    cmd = [
        find_generate(), str(data_bin), "--user-dir", str(PLUGIN_DIR), "--task", args.task,
        "--path", str(args.checkpoint), "--gen-subset", split,
        "--source-lang", src, "--target-lang", tgt,
        "--beam", str(beam), "--nbest", "1", "--lenpen", str(args.lenpen),
        "--max-len-a", str(args.max_len_a), "--max-len-b", str(args.max_len_b),
        # batches of any size: with the default multiple of 8, fairseq-fixed 0.12.3.1 here drops the
        # remainder batch (up to 7 sentences) of the split; generation gains nothing from the multiple
        "--required-batch-size-multiple", "1",
    ]  # fmt: skip
    if args.max_tokens is not None:
        cmd += ["--max-tokens", str(args.max_tokens)]
    if args.batch_size is not None or args.max_tokens is None:
        cmd += ["--batch-size", str(args.batch_size or 64)]
    if args.cpu:
        cmd.append("--cpu")
    for extra in args.extra or []:
        cmd += shlex.split(extra)
    return cmd


def run_generate(cmd: list[str]) -> str:
    print("running: " + shlex.join(cmd), flush=True)
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    except OSError as e:
        raise EvalError(f"cannot run {cmd[0]}: {e}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-30:])
        raise EvalError(f"fairseq-generate failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


# ---------------------------------------------------------------- CLI


def positive_int(text: str) -> int:
    if not re.fullmatch(r"[1-9][0-9]*", text.strip()):
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text!r})")
    return int(text)


def beam_list(text: str) -> list[int]:
    beams = [positive_int(b) for b in text.split(",")]
    if len(set(beams)) != len(beams):
        raise argparse.ArgumentTypeError(f"a beam size is given twice in {text!r}")
    return beams


def split_name(text: str) -> str:
    if not SPLIT_RE.match(text):
        raise argparse.ArgumentTypeError(f"a fairseq split is valid, test, test1, test2, ... (got {text!r})")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="a folder made by data_prep/prepare-*.sh")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--split", default=None, type=split_name, help="the fairseq split to score (default test)")
    p.add_argument("--test-set", action="append", default=[], metavar="NAME[,NAME...]|all",
                   help="test sets by name (prep.json maps names to splits), or all of them; repeatable")  # fmt: skip
    p.add_argument("--beam", type=positive_int, default=5, help="the beam of the main scores (default 5)")
    p.add_argument("--beams", type=beam_list, default=None, metavar="B1,B2,...",
                   help="also decode each set at these beam sizes (BLEU, chrF, length ratio at each)")  # fmt: skip
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--max-len-a", type=float, default=1.2)
    p.add_argument("--max-len-b", type=int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=None, help="sentences per batch (default 64)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="tokens per batch, instead of --batch-size")
    p.add_argument("--task", default="translation_soft_beam", help="fairseq task (e.g. translation)")
    p.add_argument("--cpu", action="store_true", help="generate on the CPU")
    p.add_argument("--source-lang", default=None, help="default: from DATA/prep.json")
    p.add_argument("--target-lang", default=None, help="default: from DATA/prep.json")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON summary (default: CHECKPOINT_STEM.SPLIT.eval.json next to the checkpoint, with "
                        "--test-set CHECKPOINT_STEM.NAMES.eval.json); hypotheses go to the same name with "
                        "[.SET][.beamB].hyp.txt (.SET with more than one set, .beamB for --beams other than --beam)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an earlier result at the same paths")
    p.add_argument("--extra", action="append", default=[], metavar="ARGS",
                   help="more fairseq-generate arguments in one string (repeatable): --extra='--fp16'")  # fmt: skip
    return p.parse_args(argv)


def output_paths(args, sets: list[tuple[str, str]]) -> tuple[Path, dict]:
    """The JSON summary and, per (set, beam), its hypotheses and fairseq-generate output files."""
    if args.test_set:
        label = "all" if args.test_set == ["all"] else "+".join(name for name, _ in sets)
    else:
        label = sets[0][1]
    out = args.output or args.checkpoint.with_name(f"{args.checkpoint.stem}.{label}.eval.json")
    stem = out.with_suffix("") if out.suffix == ".json" else out
    files = {}
    for name, _ in sets:
        for beam in beams_to_decode(args):
            tag = (f".{name}" if len(sets) > 1 else "") + (f".beam{beam}" if beam != args.beam else "")
            files[(name, beam)] = Path(f"{stem}{tag}.hyp.txt"), Path(f"{stem}{tag}.generate.txt")
    return out, files


def beams_to_decode(args) -> list[int]:
    return [args.beam] + [b for b in args.beams or [] if b != args.beam]


def refuse_overwrite(out_json: Path, files: dict, overwrite: bool) -> None:
    """An earlier result (its JSON or hypotheses) is never replaced silently."""
    if overwrite:
        return
    existing = [p for p in (out_json, *(hyp for hyp, _ in files.values())) if p.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more of its files)" if len(existing) > 1 else ""
        raise EvalError(
            f"{existing[0]} already exists{more}: an earlier result; pass --overwrite to replace it, or --output to write elsewhere"
        )


def check_data(data: Path, tgt: str, sets: list[tuple[str, str]]) -> dict[str, Path]:
    """Fails before any decoding unless the folder has what every set needs; returns the references."""
    hint = f"(is {data} a folder made by data_prep/prepare-*.sh?)"
    for path, what in ((data / "data-bin" / f"dict.{tgt}.txt", "fairseq data (data-bin)"),
                       (data / "spm" / "spm.model", "sentencepiece model")):  # fmt: skip
        if not path.is_file():
            raise EvalError(f"{what} not found: {path} {hint}")
    refs = {}
    for name, split in sets:
        refs[name] = data / "raw" / f"{split}.{tgt}"
        if not refs[name].is_file():
            raise EvalError(f"reference of {name} (split {split}) not found: {refs[name]} {hint}")
    return refs


def decode(setup: Setup, split: str, beam: int, ref_file: Path, n_refs: int, paths) -> list[str]:
    """Runs fairseq-generate on one split at one beam; writes and returns the detokenised hypotheses."""
    hyp_file, gen_file = paths
    stdout = run_generate(generate_command(setup.args, setup.data / "data-bin", setup.src, setup.tgt, split, beam))
    gen_file.parent.mkdir(parents=True, exist_ok=True)
    gen_file.write_text(stdout, encoding="utf-8")
    try:
        pieces = parse_generate_output(stdout, expected=n_refs)
    except EvalError as e:
        raise EvalError(f"{e} ({ref_file}; fairseq-generate output: {gen_file})") from None
    hypotheses = decode_pieces(pieces, setup.data / "spm" / "spm.model")
    with open(hyp_file, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(h + "\n" for h in hypotheses)
    return hypotheses


def evaluate_set(setup: Setup, name: str, split: str, ref_file: Path, files: dict) -> dict:
    """One set's entry: the scores at --beam, and with --beams a sweep of BLEU, chrF and length ratio."""
    args, references = setup.args, read_lines(ref_file)
    by_beam = {}
    for beam in beams_to_decode(args):
        hyps = decode(setup, split, beam, ref_file, len(references), files[(name, beam)])
        by_beam[beam] = score_lines(hyps, references)
    hyp_file, gen_file = files[(name, args.beam)]
    entry = {
        "test_set": name,
        "split": split,
        "beam": args.beam,
        **by_beam[args.beam],
        "bleu_lowercase_note": LOWERCASE_NOTE,
        "hypotheses_file": str(hyp_file.resolve()),
        "references_file": str(ref_file.resolve()),
        "generate_output": str(gen_file.resolve()),
    }
    if args.beams:
        entry["beam_sweep"] = [
            {"beam": b, **{k: by_beam[b][k] for k in ("bleu", "chrf", "length_ratio", "hyp_len", "ref_len")},
             "hypotheses_file": str(files[(name, b)][0].resolve())}
            for b in args.beams
        ]  # fmt: skip
    report_set(entry)
    return entry


def report_set(entry: dict) -> None:
    print(f"== {entry['test_set']} (split {entry['split']}, {entry['n_sentences']} sentences, beam {entry['beam']})")
    print(f"{entry['bleu_verbose']} (signature: {entry['bleu_signature']})")
    print(f"{entry['chrf_verbose']} (signature: {entry['chrf_signature']})")
    print(f"lowercased {entry['bleu_lowercase_verbose']} (signature: {entry['bleu_lowercase_signature']})")
    for point in entry.get("beam_sweep", []):
        ratio = "n/a" if point["length_ratio"] is None else f"{point['length_ratio']:.3f}"
        print(f"  beam {point['beam']:>3}: BLEU {point['bleu']:6.2f}  chrF {point['chrf']:6.2f}  length ratio {ratio}")
    print(f"hypotheses: {entry['hypotheses_file']}")


def evaluate(args) -> dict:
    data = args.data
    if not data.is_dir():
        raise EvalError(f"data folder not found: {data}")
    if not args.checkpoint.is_file():
        raise EvalError(f"checkpoint not found: {args.checkpoint}")
    src, tgt, info = read_prep(data, args)
    sets = select_sets(args, info, data)
    refs = check_data(data, tgt, sets)
    out_json, files = output_paths(args, sets)
    refuse_overwrite(out_json, files, args.overwrite)

    setup = Setup(args, data, src, tgt)
    entries = {name: evaluate_set(setup, name, split, refs[name], files) for name, split in sets}
    first = entries[sets[0][0]]
    result = {
        # the first set's scores at the top level: the layout of a one-set result, which scripts read
        **{k: v for k, v in first.items() if k != "beam_sweep"},
        "checkpoint": str(args.checkpoint.resolve()),
        "data": str(data.resolve()),
        "src": src,
        "tgt": tgt,
        "beam": args.beam,
        "beams": args.beams,
        "lenpen": args.lenpen,
        "max_len_a": args.max_len_a,
        "max_len_b": args.max_len_b,
        "task": args.task,
        "sets": entries,
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_name(out_json.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_json)
    print(f"summary: {out_json} ({len(entries)} set(s): {', '.join(entries)})")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        evaluate(args)
    except (EvalError, OSError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
