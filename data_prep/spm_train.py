"""Trains a joint sentencepiece model on one or more text files (used by the prepare-*.sh recipes).

    python spm_train.py --input train.en train.de --model-prefix OUT/spm/spm --vocab-size 32000

Writes PREFIX.model and PREFIX.vocab. The vocabulary size is a soft limit (``hard_vocab_limit=false``),
so a small corpus gives a smaller vocabulary instead of an error.
"""

from __future__ import annotations

import argparse
import os
import sys

import sentencepiece as spm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="text files, one sentence per line")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--input-sentence-size", type=int, default=5_000_000,
                   help="sample at most this many sentences for training")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    for f in args.input:
        if not os.path.isfile(f):
            print(f"spm_train.py: error: missing input {f}", file=sys.stderr)
            return 1
    spm.set_random_generator_seed(args.seed)
    spm.SentencePieceTrainer.train(
        input=",".join(args.input),
        model_prefix=args.model_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,
        num_threads=args.threads,
        minloglevel=1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
