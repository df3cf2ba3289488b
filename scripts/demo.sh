#!/usr/bin/env bash
# The demo behind `make demo`: Multi30k en->de, a short MLE training of a small transformer, a
# short fine-tuning with the soft_beam criterion, and sacreBLEU + chrF of both on test_2016_flickr.
#
# Environment (all optional):
#   MULTI30K_RAW   folder with the raw .gz files (default ../shared/data/multi30k beside the
#                  checkout; if absent, prepare-multi30k.sh downloads them)
#   DEMO_DIR       where everything is written (default runs/demo, git-ignored)
#   DEMO_MLE_UPDATES (default 600), DEMO_SOFT_UPDATES (default 10)
# The model is deliberately tiny (2+2 layers, dimension 128) so that the demo runs in minutes on
# a 2-core CPU; scripts/train_mle.sh's defaults and scripts/bench_bleu.py are the real recipes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$ROOT/.venv/bin:$PATH"
RAW="${MULTI30K_RAW:-$ROOT/../shared/data/multi30k}"
WORK="${DEMO_DIR:-$ROOT/runs/demo}"
MLE_UPDATES="${DEMO_MLE_UPDATES:-600}"
SOFT_UPDATES="${DEMO_SOFT_UPDATES:-10}"
export ARCH_ARGS="--arch transformer --share-all-embeddings --encoder-layers 2 --decoder-layers 2
 --encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 256 --decoder-ffn-embed-dim 256
 --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1"
start=$SECONDS
say() { echo "[demo $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s] $*"; }

raw_args=()
# a local copy is used as it is (--no-download: a read-only folder gets nothing added)
[[ -d "$RAW" ]] && raw_args=(--raw-dir "$RAW" --no-download)
say "1/4 preparing Multi30k en-de into $WORK/data"
bash "$ROOT/data_prep/prepare-multi30k.sh" --tgt de --out "$WORK/data" --vocab-size 8000 --workers 2 \
  --test-sets test_2016_flickr "${raw_args[@]}"

say "2/4 MLE training, $MLE_UPDATES updates"
if [[ ! -f "$WORK/mle/checkpoint_last.pt" ]]; then
  MAX_UPDATE="$MLE_UPDATES" MAX_TOKENS=1024 LR=2e-3 WARMUP=200 LOG_INTERVAL=50 bash "$ROOT/scripts/train_mle.sh" "$WORK/data" "$WORK/mle" \
    --no-epoch-checkpoints --disable-validation > "$WORK/mle.log" 2>&1 || { tail -30 "$WORK/mle.log"; exit 1; }
fi

say "3/4 fine-tuning with the soft_beam criterion (hamming loss, beam 4), $SOFT_UPDATES updates"
if [[ ! -f "$WORK/soft_beam/checkpoint_last.pt" ]]; then
  MAX_UPDATE="$SOFT_UPDATES" MAX_TOKENS=512 LOG_INTERVAL=5 bash "$ROOT/scripts/finetune_soft_beam.sh" \
    "$WORK/data" "$WORK/mle/checkpoint_last.pt" "$WORK/soft_beam" --no-epoch-checkpoints --disable-validation \
    > "$WORK/soft_beam.log" 2>&1 || { tail -30 "$WORK/soft_beam.log"; exit 1; }
fi
grep -h '"train_inner"\|train_inner' "$WORK/soft_beam.log" | tail -2 || true

say "4/4 BLEU on test_2016_flickr (beam 5)"
for arm in mle soft_beam; do
  echo "== $arm"
  python "$ROOT/scripts/evaluate.py" --data "$WORK/data" --checkpoint "$WORK/$arm/checkpoint_last.pt" \
    --beam 5 --cpu --output "$WORK/$arm.test.json" --overwrite
done
say "done; scores in $WORK/{mle,soft_beam}.test.json"
