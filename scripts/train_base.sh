#!/usr/bin/env bash
# The campaign's MLE base on Multi30k: a "transformer-tiny" trained until validation BLEU stops improving.
#
#   scripts/train_base.sh DATA_DIR SAVE_DIR [extra fairseq-train args...]
#
# DATA_DIR is a folder made by data_prep/prepare-multi30k.sh. Re-running the same command resumes from
# SAVE_DIR/checkpoint_last.pt (fairseq's own resume), so a killed run loses at most the updates since the
# last save (every epoch, ~110 updates, and every SAVE_EVERY updates).
#
# Recipe: the Transformer-Tiny of Wu et al. 2021 ("Good for Misconceived Reasons", ACL): 4+4 layers,
# dim 128, ffn 256, 4 heads, dropout 0.3, shared embeddings; adam, lr 0.005, inverse_sqrt with 2000
# warm-up updates, 4096-token batches, label smoothing 0.1, at most 8000 updates, reported there at about
# 41 BLEU on test2016 (en-de). Here: validation BLEU (beam 5, the whole val set) every SAVE_EVERY updates,
# early stopping after PATIENCE validations without a new best, and the last KEEP interval checkpoints
# kept for averaging (scripts/average_checkpoints.py).
#
# Environment (defaults): MAX_UPDATE=8000 SAVE_EVERY=500 PATIENCE=5 KEEP=8 SEED=1, and everything
# train_mle.sh reads (LR, WARMUP, MAX_TOKENS, ARCH_ARGS, ...).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
if (($# < 2)); then usage >&2; exit 2; fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA_DIR=$1 SAVE_DIR=$2
shift 2
SAVE_EVERY=${SAVE_EVERY:-500}

export ARCH_ARGS=${ARCH_ARGS:-"--arch transformer --share-all-embeddings --encoder-layers 4 --decoder-layers 4
 --encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 256 --decoder-ffn-embed-dim 256
 --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.3"}
export LR=${LR:-0.005} WARMUP=${WARMUP:-2000} MAX_TOKENS=${MAX_TOKENS:-4096} MAX_UPDATE=${MAX_UPDATE:-8000}

exec bash "$REPO/scripts/train_mle.sh" "$DATA_DIR" "$SAVE_DIR" \
    --eval-bleu --eval-bleu-args '{"beam": 5, "max_len_a": 1.2, "max_len_b": 10}' \
    --eval-bleu-detok space --eval-bleu-remove-bpe sentencepiece \
    --best-checkpoint-metric bleu --maximize-best-checkpoint-metric --patience "${PATIENCE:-5}" \
    --save-interval-updates "$SAVE_EVERY" --keep-interval-updates "${KEEP:-8}" \
    --validate-interval-updates "$SAVE_EVERY" --validate-interval 1000000 "$@"
