"""Paired significance tests of systems against a baseline on one test set, by sacreBLEU's own tests.

    python scripts/compare.py --ref DATA/raw/test.de --baseline mle.hyp.txt --system soft.hyp.txt [--json OUT]

Runs paired bootstrap resampling (Koehn 2004) and paired approximate randomisation (Riezler and
Maxwell 2005) from ``sacrebleu.significance`` on BLEU and chrF (sacreBLEU's default settings), called
as ``sacrebleu REF -i BASE SYS --paired-bs`` (``--paired-ar``) calls them: the same metrics, samples
and seed (sacreBLEU reads it from SACREBLEU_SEED; ``--seed`` sets it), so the p-values are the CLI's.
Inputs are detokenised text, one sentence per line: the hypotheses files evaluate.py writes and the
raw references it scores against (DATA/raw/<split>.<tgt>).

One departure: a system whose hypotheses are identical to the baseline's gets p = 1. sacreBLEU 2.x
counts only resamples whose difference strictly exceeds the observed one, so there (every difference
is exactly 0) it returns 1/(n+1), which would call a system significantly different from itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

DEFAULT_SEED = "12345"  # sacreBLEU's, when SACREBLEU_SEED is unset
TESTS = {"paired_bs": ("bs", "paired bootstrap resampling"), "paired_ar": ("ar", "approximate randomisation")}
METRICS = ("bleu", "chrf")
CI_NOTE = (
    "bootstrap: sacreBLEU's paired bootstrap estimate of each system's true score (mean) and the half-width "
    "of its 95% confidence interval (ci95): the score lies in mean +- ci95"
)
IDENTICAL_NOTE = (
    "identical to the baseline: p = 1 by definition (sacreBLEU 2.x itself returns 1/(n+1) here, because it "
    "counts only resampled differences strictly above the observed difference, 0)"
)


class CompareError(Exception):
    """A problem with the user's input: reported as one message, without a traceback."""


def read_lines(path: Path) -> list[str]:
    """The lines of a text file as the sacrebleu CLI reads them: split at "\\n", trailing space stripped."""
    if not path.is_file():
        raise CompareError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            return [line.rstrip() for line in f]
    except UnicodeDecodeError as e:
        raise CompareError(f"{path} is not UTF-8 text: {e}") from None


def load(args) -> tuple[list[str], list[str], list[list[str]]]:
    refs = read_lines(args.ref)
    if not refs:
        raise CompareError(f"no references in {args.ref}")
    hyps = []
    for path in [args.baseline, *args.system]:
        lines = read_lines(path)
        if len(lines) != len(refs):
            raise CompareError(f"{path} has {len(lines)} lines but the references ({args.ref}) have {len(refs)}")
        hyps.append(lines)
    return refs, hyps[0], hyps[1:]


@contextmanager
def sacrebleu_seed(seed: str):
    """sacreBLEU's significance tests take their seed only from the environment."""
    before = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = seed
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SACREBLEU_SEED", None)
        else:
            os.environ["SACREBLEU_SEED"] = before


def paired_test(test_type: str, n: int, refs, baseline, systems, seed: str) -> tuple[list[str], list[dict]]:
    """One sacreBLEU paired test, set up as its CLI does. Returns the signatures (BLEU, chrF) and,
    for the baseline then each system, metric -> sacrebleu.significance.Result."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    # fresh metrics per test, caching the references, as one CLI call builds them
    metrics = {"BLEU": BLEU(references=[refs]), "CHRF": CHRF(references=[refs])}
    named = [("baseline", baseline)] + [(f"system {i + 1}", hyps) for i, hyps in enumerate(systems)]
    with sacrebleu_seed(seed):
        test = PairedTest(named, metrics, references=None, test_type=test_type, n_samples=n, n_jobs=1)
        signatures, scores = test()
    names = list(signatures)  # the metrics' sacreBLEU names (BLEU, chrF2), in METRICS order
    per_system = [{m: scores[name][i] for m, name in zip(METRICS, names)} for i in range(len(named))]
    return [str(signatures[name]) for name in names], per_system


def bootstrap(result) -> dict:
    return {"mean": float(result.mean), "ci95": float(result.ci)}


def compare(args) -> dict:
    refs, baseline, systems = load(args)
    runs = {key: paired_test(t, getattr(args, key + "_n"), refs, baseline, systems, args.seed) for key, (t, _) in TESTS.items()}
    bs = runs["paired_bs"][1]
    base_scores = {m: bs[0][m].score for m in METRICS}
    out = {
        "references": str(args.ref.resolve()),
        "n_sentences": len(refs),
        "sacrebleu_version": sacrebleu_version(),
        "seed": int(args.seed) if args.seed.isdigit() else args.seed,
        "tests": {
            key: {"name": TESTS[key][1], "n": getattr(args, key + "_n"), "signatures": dict(zip(METRICS, sigs))}
            for key, (sigs, _) in runs.items()
        },  # fmt: skip
        "baseline": {"file": str(args.baseline), "scores": base_scores, "bootstrap": {m: bootstrap(bs[0][m]) for m in METRICS}},
        "systems": [],
        "notes": {"bootstrap": CI_NOTE},
    }
    for i, path in enumerate(args.system, start=1):
        identical = systems[i - 1] == baseline
        entry = {
            "file": str(path),
            "scores": {m: bs[i][m].score for m in METRICS},
            "difference": {m: bs[i][m].score - base_scores[m] for m in METRICS},
            "bootstrap": {m: bootstrap(bs[i][m]) for m in METRICS},
            "p_value": {key: {m: 1.0 if identical else float(res[i][m].p_value) for m in METRICS} for key, (_, res) in runs.items()},
            "identical_to_baseline": identical,
        }
        if identical:
            out["notes"]["identical_to_baseline"] = IDENTICAL_NOTE
        out["systems"].append(entry)
    return out


def sacrebleu_version() -> str:
    import sacrebleu

    return sacrebleu.__version__


def report(result: dict) -> None:
    tests = result["tests"]
    print(f"references: {result['references']} ({result['n_sentences']} sentences); sacreBLEU {result['sacrebleu_version']}, "
          f"seed {result['seed']}, paired bootstrap {tests['paired_bs']['n']} resamples, "
          f"approximate randomisation {tests['paired_ar']['n']} trials")  # fmt: skip
    base = result["baseline"]
    print(f"baseline: {base['file']}")
    for m in METRICS:
        b = base["bootstrap"][m]
        print(f"  {m.upper() if m == 'bleu' else 'chrF':<5} {base['scores'][m]:6.2f}  95% CI {b['mean']:.2f} ± {b['ci95']:.2f}")
    for entry in result["systems"]:
        print(f"system: {entry['file']}" + ("  (identical to the baseline)" if entry["identical_to_baseline"] else ""))
        for m in METRICS:
            b, p = entry["bootstrap"][m], entry["p_value"]
            star = "*" if p["paired_bs"][m] < 0.05 and p["paired_ar"][m] < 0.05 else " "
            print(f"  {m.upper() if m == 'bleu' else 'chrF':<5} {entry['scores'][m]:6.2f}  difference {entry['difference'][m]:+6.2f}"
                  f"  95% CI {b['mean']:.2f} ± {b['ci95']:.2f}  p = {p['paired_bs'][m]:.4f} (bootstrap)"
                  f"  p = {p['paired_ar'][m]:.4f} (approx. randomisation){star}")  # fmt: skip
    print("(* p < 0.05 in both tests; 95% CI: sacreBLEU's bootstrap mean ± half-width of each system's score)")


# ---------------------------------------------------------------- CLI


def positive_int(text: str) -> int:
    if not re.fullmatch(r"[1-9][0-9]*", text.strip()):
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text!r})")
    return int(text)


def seed_value(text: str) -> str:
    # sacreBLEU seeds with int(seed), or not at all for "none"; 0 it treats as unseeded for the systems
    # but seeded for the baseline, so it is refused
    if text.strip().lower() == "none":
        return "none"
    return str(positive_int(text))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", required=True, type=Path, help="the references, detokenised, one per line")
    p.add_argument("--baseline", required=True, type=Path, help="the baseline's detokenised hypotheses")
    p.add_argument("--system", required=True, type=Path, action="append", help="a system's hypotheses (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="write the results here too")
    p.add_argument("--paired-bs-n", type=positive_int, default=1000, help="bootstrap resamples (sacreBLEU's default 1000)")
    p.add_argument("--paired-ar-n", type=positive_int, default=10000, help="randomisation trials (sacreBLEU's default 10000)")
    p.add_argument("--seed", type=seed_value, default=None,
                   help=f"random seed, or none (default: $SACREBLEU_SEED, else sacreBLEU's {DEFAULT_SEED})")  # fmt: skip
    args = p.parse_args(argv)
    if args.seed is None:
        try:
            args.seed = seed_value(os.environ.get("SACREBLEU_SEED", DEFAULT_SEED))
        except argparse.ArgumentTypeError as e:
            p.error(f"SACREBLEU_SEED {e}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = compare(args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except (CompareError, OSError) as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 1
    report(result)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
