"""Translates a prepared test (or valid) set with fairseq-generate and scores it with sacreBLEU.

    python scripts/evaluate.py --data data/multi30k.en-de --checkpoint checkpoints/checkpoint_best.pt

``--data`` is a folder made by data_prep/prepare-*.sh (data-bin/, spm/spm.model, raw/, prep.json).
The hypotheses (sentencepiece pieces in fairseq-generate's ``H-`` lines) are put back in corpus order,
decoded with the data's sentencepiece model and scored, detokenised, against the raw references
``raw/<split>.<tgt>`` with sacreBLEU's BLEU and chrF (default settings). Writes a JSON summary and the
decoded hypotheses (one per line) next to it.
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

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "fairseq_plugins"
HYPO_RE = re.compile(r"^H-(\d+)\t([^\t]*)(?:\t(.*))?$")


class EvalError(Exception):
    """A problem with the user's input: reported as one message, without a traceback."""


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
    """Corpus BLEU and chrF (sacreBLEU defaults) of detokenised hypotheses against one reference each."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise EvalError(f"{len(hypotheses)} hypotheses but {len(references)} references: counts must match")
    if not references:
        raise EvalError("nothing to score: no references")
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_verbose": str(b),
        "chrf_verbose": str(c),
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


def read_prep(data: Path, args) -> tuple[str, str]:
    src, tgt = args.source_lang, args.target_lang
    prep = data / "prep.json"
    if (src is None or tgt is None) and prep.is_file():
        try:
            info = json.loads(prep.read_text())
        except (OSError, ValueError) as e:
            raise EvalError(f"cannot read {prep}: {e}") from None
        src, tgt = src or info.get("src"), tgt or info.get("tgt")
    if not src or not tgt:
        raise EvalError(f"{prep} not found: give --source-lang and --target-lang")
    return src, tgt


def generate_command(args, data_bin: Path, src: str, tgt: str) -> list[str]:
    cmd = [
        find_generate(), str(data_bin), "--user-dir", str(PLUGIN_DIR), "--task", args.task,
        "--path", str(args.checkpoint), "--gen-subset", args.split,
        "--source-lang", src, "--target-lang", tgt,
        "--beam", str(args.beam), "--nbest", "1", "--lenpen", str(args.lenpen),
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="a folder made by data_prep/prepare-*.sh")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--max-len-a", type=float, default=1.2)
    p.add_argument("--max-len-b", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=None, help="sentences per batch (default 64)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per batch, instead of --batch-size")
    p.add_argument("--task", default="translation_soft_beam", help="fairseq task (e.g. translation)")
    p.add_argument("--cpu", action="store_true", help="generate on the CPU")
    p.add_argument("--source-lang", default=None, help="default: from DATA/prep.json")
    p.add_argument("--target-lang", default=None, help="default: from DATA/prep.json")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON summary (default: CHECKPOINT_STEM.SPLIT.eval.json next to the checkpoint); "
                        "the hypotheses go to the same name with .hyp.txt")  # fmt: skip
    p.add_argument("--extra", action="append", default=[], metavar="ARGS",
                   help="more fairseq-generate arguments in one string (repeatable): --extra='--fp16'")  # fmt: skip
    return p.parse_args(argv)


def output_paths(args) -> tuple[Path, Path, Path]:
    out = args.output or args.checkpoint.with_name(f"{args.checkpoint.stem}.{args.split}.eval.json")
    stem = out.with_suffix("") if out.suffix == ".json" else out
    return out, Path(f"{stem}.hyp.txt"), Path(f"{stem}.generate.txt")


def evaluate(args) -> dict:
    data = args.data
    if not data.is_dir():
        raise EvalError(f"data folder not found: {data}")
    if not args.checkpoint.is_file():
        raise EvalError(f"checkpoint not found: {args.checkpoint}")
    src, tgt = read_prep(data, args)
    data_bin, spm_model, ref_file = data / "data-bin", data / "spm" / "spm.model", data / "raw" / f"{args.split}.{tgt}"
    for path, what in ((data_bin / f"dict.{tgt}.txt", "fairseq data (data-bin)"),
                       (spm_model, "sentencepiece model"), (ref_file, "reference")):  # fmt: skip
        if not path.is_file():
            raise EvalError(f"{what} not found: {path} (is {data} a folder made by data_prep/prepare-*.sh?)")
    references = read_lines(ref_file)
    out_json, hyp_file, gen_file = output_paths(args)

    stdout = run_generate(generate_command(args, data_bin, src, tgt))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    gen_file.write_text(stdout, encoding="utf-8")
    try:
        pieces = parse_generate_output(stdout, expected=len(references))
    except EvalError as e:
        raise EvalError(f"{e} ({ref_file}; fairseq-generate output: {gen_file})") from None
    hypotheses = decode_pieces(pieces, spm_model)
    with open(hyp_file, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(h + "\n" for h in hypotheses)
    scores = score_lines(hypotheses, references)
    result = {
        **scores,
        "checkpoint": str(args.checkpoint.resolve()),
        "data": str(data.resolve()),
        "split": args.split,
        "src": src,
        "tgt": tgt,
        "beam": args.beam,
        "lenpen": args.lenpen,
        "max_len_a": args.max_len_a,
        "max_len_b": args.max_len_b,
        "task": args.task,
        "hypotheses_file": str(hyp_file.resolve()),
        "references_file": str(ref_file.resolve()),
        "generate_output": str(gen_file.resolve()),
    }
    out_json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{scores['bleu_verbose']} (signature: {scores['bleu_signature']})")
    print(f"{scores['chrf_verbose']} (signature: {scores['chrf_signature']})")
    print(f"{len(hypotheses)} sentences; hypotheses: {hyp_file}; summary: {out_json}")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        evaluate(args)
    except EvalError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
