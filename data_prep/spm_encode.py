"""Encodes text files into sentencepiece pieces, one sentence per line, pieces separated by spaces.

    python spm_encode.py --model OUT/spm/spm.model --inputs train.en valid.en --outputs enc/train.en enc/valid.en

Keeps the line count: an empty input line gives an empty output line. Each output is written to
OUTPUT.tmp and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys

import sentencepiece as spm

CHUNK = 20_000


def encode_file(sp: spm.SentencePieceProcessor, src: str, dst: str, threads: int = 1) -> int:
    n = 0
    tmp = dst + ".tmp"
    with open(src, encoding="utf-8", newline="\n") as fin, open(tmp, "w", encoding="utf-8", newline="\n") as fout:
        while True:
            lines = [line.rstrip("\r\n") for _, line in zip(range(CHUNK), fin, strict=False)]
            if not lines:
                break
            for pieces in sp.encode(lines, out_type=str, num_threads=threads):
                fout.write(" ".join(pieces) + "\n")
            n += len(lines)
    os.replace(tmp, dst)
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--inputs", nargs="+", required=True)
    p.add_argument("--outputs", nargs="+", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if len(args.inputs) != len(args.outputs):
        print("spm_encode.py: error: --inputs and --outputs differ in number", file=sys.stderr)
        return 1
    for f in [args.model, *args.inputs]:
        if not os.path.isfile(f):
            print(f"spm_encode.py: error: missing file {f}", file=sys.stderr)
            return 1
    sp = spm.SentencePieceProcessor(model_file=args.model)
    for src, dst in zip(args.inputs, args.outputs, strict=True):
        n = encode_file(sp, src, dst, args.threads)
        print(f"  encoded {src} -> {dst} ({n} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
