#!/usr/bin/env bash
# Fine-tunes an MLE checkpoint through the differentiable beam search (criterion soft_beam).
#
#   scripts/finetune_soft_beam.sh DATA_DIR INIT_CHECKPOINT SAVE_DIR [extra fairseq-train args...]
#
# Starts from INIT_CHECKPOINT with --finetune-from-model (weights only: fresh optimizer, lr schedule
# and update counter; on a re-run with SAVE_DIR/checkpoint_last.pt present, fairseq resumes that
# instead). The model flags must match the checkpoint's (ARCH_ARGS, same default as train_mle.sh).
# Extra arguments are passed to fairseq-train last, so they override the defaults below.
#
# Environment variables (defaults):
#   BEAM_LOSS=hamming (hamming: relaxed token errors of the top beam; risk: expected 1 - sentence BLEU
#     over the finished beams; bleu: the same expectation of 1 - soft BLEU, from expected n-gram matches)
#   MLE_WEIGHT=0.5 (loss = w*MLE + (1-w)*beam loss)
#   RISK_SHARPNESS=1 (MRT's alpha, risk and bleu)  BEAM_SIZE=4  BEAM_EPSILON=0.01 (0: hard search; with risk or bleu, MRT)  BEAM_CANDIDATES= (unset: 2k^2)  SEARCH_MAX_LEN_A=1.2  SEARCH_MAX_LEN_B=10
#   BEAM_EPSILON_FINAL= BEAM_EPSILON_ANNEAL_UPDATES= (unset: epsilon fixed; both set: epsilon goes geometrically
#     from BEAM_EPSILON to BEAM_EPSILON_FINAL over that many updates, then stays there)
#   SEARCH_FRACTION=1 (the share of each batch's sentences that the search runs on)
#   LR=1e-4 (adam, fixed schedule)  WARMUP=0  MAX_TOKENS=4096  MAX_UPDATE=500  SEED=1  CLIP_NORM=1.0
#   (clipping matters: the soft top-k normalises each step's candidate scores by their range, so
#   on nearly flat distributions its gradient is large)
#   LABEL_SMOOTHING=0.1  WEIGHT_DECAY=0.0001  LOG_INTERVAL=10  LOG_FORMAT=json
#   ARCH_ARGS, DEVICE_ARGS, FAIRSEQ_TRAIN: as in train_mle.sh
# With several GPUs add --ddp-backend legacy_ddp (the criterion needs it under distributed training).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
if (($# < 3)); then usage >&2; exit 2; fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA_DIR=$1 INIT=$2 SAVE_DIR=$3
shift 3
[[ -d $DATA_DIR/data-bin ]] || { echo "finetune_soft_beam.sh: $DATA_DIR/data-bin not found (run data_prep/prepare-*.sh)" >&2; exit 1; }
[[ -f $INIT ]] || { echo "finetune_soft_beam.sh: initial checkpoint $INIT not found" >&2; exit 1; }

source "$REPO/scripts/train_common.sh"  # FAIRSEQ_TRAIN, DEVICE_ARGS -> DEV, ARCH_ARGS -> ARCH

CANDIDATES=()
[[ -n ${BEAM_CANDIDATES:-} ]] && CANDIDATES=(--soft-beam-candidates "$BEAM_CANDIDATES")
SCHEDULE=()  # either alone is passed on, and the criterion refuses it by name
[[ -n ${BEAM_EPSILON_FINAL:-} ]] && SCHEDULE+=(--soft-beam-epsilon-final "$BEAM_EPSILON_FINAL")
[[ -n ${BEAM_EPSILON_ANNEAL_UPDATES:-} ]] && SCHEDULE+=(--soft-beam-epsilon-anneal-updates "$BEAM_EPSILON_ANNEAL_UPDATES")

mkdir -p "$SAVE_DIR"
set -x
exec "$FAIRSEQ_TRAIN" "$DATA_DIR/data-bin" --user-dir "$REPO/fairseq_plugins" \
    --task translation_soft_beam --criterion soft_beam --label-smoothing "${LABEL_SMOOTHING:-0.1}" \
    --beam-loss "${BEAM_LOSS:-hamming}" --mle-weight "${MLE_WEIGHT:-0.5}" --risk-sharpness "${RISK_SHARPNESS:-1}" \
    --soft-beam-size "${BEAM_SIZE:-4}" --soft-beam-epsilon "${BEAM_EPSILON:-0.01}" "${SCHEDULE[@]}" \
    "${CANDIDATES[@]}" --search-fraction "${SEARCH_FRACTION:-1}" \
    --max-len-a "${SEARCH_MAX_LEN_A:-1.2}" --max-len-b "${SEARCH_MAX_LEN_B:-10}" \
    "${ARCH[@]}" --finetune-from-model "$INIT" \
    --optimizer adam --adam-betas '(0.9, 0.98)' --lr "${LR:-1e-4}" --lr-scheduler fixed \
    --warmup-updates "${WARMUP:-0}" --weight-decay "${WEIGHT_DECAY:-0.0001}" --clip-norm "${CLIP_NORM:-1.0}" \
    --max-tokens "${MAX_TOKENS:-4096}" --max-update "${MAX_UPDATE:-500}" --seed "${SEED:-1}" \
    --save-dir "$SAVE_DIR" --no-epoch-checkpoints --num-workers 0 \
    --no-progress-bar --log-format "${LOG_FORMAT:-json}" --log-interval "${LOG_INTERVAL:-10}" \
    "${DEV[@]}" "$@"
