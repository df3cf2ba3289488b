#!/usr/bin/env bash
# Label-smoothed MLE training of a small transformer with the soft-beam plugin's task.
#
#   scripts/train_mle.sh DATA_DIR SAVE_DIR [extra fairseq-train args...]
#
# DATA_DIR is a folder made by data_prep/prepare-*.sh (uses DATA_DIR/data-bin). The task is
# translation_soft_beam (fairseq's translation + the plugin's generator, so --eval-bleu validation
# decodes with it); the criterion is stock label_smoothed_cross_entropy. Extra arguments are passed
# to fairseq-train last, so they override the defaults below (argparse keeps the last value).
#
# Defaults (sized for Multi30k on a CPU) and the environment variables that override them:
#   ARCH_ARGS     model flags (default: transformer, shared embeddings, 3+3 layers, dim 256,
#                 ffn 512, 4 heads, dropout 0.3)
#   LR=7e-4 WARMUP=1000 (adam, inverse_sqrt)  MAX_TOKENS=4096  MAX_UPDATE=3000  SEED=1
#   LABEL_SMOOTHING=0.1  WEIGHT_DECAY=0.0001  CLIP_NORM=0.0  LOG_INTERVAL=10  LOG_FORMAT=json
#   DEVICE_ARGS   default "--cpu" unless torch sees a CUDA GPU (then "")
#   FAIRSEQ_TRAIN default <repo>/.venv/bin/fairseq-train if present, else PATH
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
if (($# < 2)); then usage >&2; exit 2; fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA_DIR=$1 SAVE_DIR=$2
shift 2
[[ -d $DATA_DIR/data-bin ]] || { echo "train_mle.sh: $DATA_DIR/data-bin not found (run data_prep/prepare-*.sh)" >&2; exit 1; }

source "$REPO/scripts/train_common.sh"  # FAIRSEQ_TRAIN, DEVICE_ARGS -> DEV, ARCH_ARGS -> ARCH

mkdir -p "$SAVE_DIR"
set -x
exec "$FAIRSEQ_TRAIN" "$DATA_DIR/data-bin" --user-dir "$REPO/fairseq_plugins" \
    --task translation_soft_beam --criterion label_smoothed_cross_entropy \
    --label-smoothing "${LABEL_SMOOTHING:-0.1}" "${ARCH[@]}" \
    --optimizer adam --adam-betas '(0.9, 0.98)' --lr "${LR:-7e-4}" --lr-scheduler inverse_sqrt \
    --warmup-updates "${WARMUP:-1000}" --weight-decay "${WEIGHT_DECAY:-0.0001}" \
    --clip-norm "${CLIP_NORM:-0.0}" --max-tokens "${MAX_TOKENS:-4096}" --max-update "${MAX_UPDATE:-3000}" \
    --seed "${SEED:-1}" --save-dir "$SAVE_DIR" --no-epoch-checkpoints --num-workers 0 \
    --no-progress-bar --log-format "${LOG_FORMAT:-json}" --log-interval "${LOG_INTERVAL:-10}" \
    "${DEV[@]}" "$@"
