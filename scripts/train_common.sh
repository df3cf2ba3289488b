# Sourced by train_mle.sh and finetune_soft_beam.sh (needs REPO): which fairseq-train to run, on
# which device, and the model flags. Each can be overridden by the environment variable of its name.
if [[ -z ${FAIRSEQ_TRAIN:-} ]]; then
    if [[ -x $REPO/.venv/bin/fairseq-train ]]; then FAIRSEQ_TRAIN=$REPO/.venv/bin/fairseq-train; else FAIRSEQ_TRAIN=fairseq-train; fi
fi
if [[ -z ${DEVICE_ARGS+x} ]]; then
    PY=$(dirname "$FAIRSEQ_TRAIN")/python
    [[ -x $PY ]] || PY=python
    if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then DEVICE_ARGS=""; else DEVICE_ARGS="--cpu"; fi
fi

DEFAULT_ARCH="--arch transformer --share-all-embeddings --encoder-layers 3 --decoder-layers 3
 --encoder-embed-dim 256 --decoder-embed-dim 256 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512
 --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.3"
read -r -a ARCH <<<"$(echo ${ARCH_ARGS:-$DEFAULT_ARCH})"
read -r -a DEV <<<"$DEVICE_ARGS"
