#!/usr/bin/env bash
# Multi30k task 1 (English image captions with German or French translations), en -> de|fr,
# with a joint sentencepiece vocabulary.
#
#   data_prep/prepare-multi30k.sh --tgt de --out data/multi30k.en-de [--raw-dir DIR] [options]
#
# Input: the raw gz files of the dataset's public repository (github.com/multi30k/dataset,
# data/task1/raw/): {train,val,test_2016_flickr}.{en,de,fr}.gz; downloaded when not in --raw-dir.
# Splits: train -> train, val -> valid, test_2016_flickr -> test (not cleaned: it is the reference).
#
# Options:
#   --tgt de|fr            target language (source is always en)
#   --src en               accepted for symmetry with prepare-wmt14.sh; only en
#   --out DIR              output folder (required)
#   --raw-dir DIR          where the .gz files are, or are downloaded to (default OUT/archives)
#   --no-download          fail instead of downloading a missing file
#   --vocab-size N         joint sentencepiece vocabulary (default 8000)
#   --subset N             keep only the first N clean training pairs
#   --workers N            threads for sentencepiece, sort and fairseq-preprocess (default nproc, max 8)
#   --max-len N            drop training/valid pairs with a side longer than N words (default 250)
#   --min-len N            ... or shorter than N words (default 1)
#   --ratio R              ... or with a word-length ratio above R (default 3; captions are short, and
#                          1.5 would drop 3% of the training pairs)
#   --character-coverage C sentencepiece character coverage (default 1.0)
#   --spm-sentences N      sentences sampled to train sentencepiece (default 5000000)
# Env: PYTHON (a python with sentencepiece), FAIRSEQ_PREPROCESS, MULTI30K_URL (base URL of the raw files,
# default https://github.com/multi30k/dataset/raw/master/data/task1/raw).
#
# Output (OUT): raw/{train,valid,test}.{en,TGT}, spm/spm.{model,vocab}, spm-encoded/{train,valid,test}.{en,TGT},
# data-bin/ (fairseq-preprocess --joined-dictionary), prep.json. Files are decompressed under OUT/orig.
# Re-running skips the steps whose outputs exist and whose options are unchanged.
set -euo pipefail

PREP_NAME=prepare-multi30k
DATA_PREP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=data_prep/common.sh
source "$DATA_PREP_DIR/common.sh"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

SRC=en TGT="" OUT="" RAW_DIR="" NO_DOWNLOAD=0 VOCAB_SIZE=8000 SUBSET="" WORKERS=$(default_workers)
MAX_LEN=250 MIN_LEN=1 RATIO=3 CHAR_COVERAGE=1.0 SPM_SENTENCES=5000000
while (($#)); do
    case $1 in
    --src) SRC=${2:?--src needs a value}; shift 2 ;;
    --tgt) TGT=${2:?--tgt needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --raw-dir) RAW_DIR=${2:?--raw-dir needs a value}; shift 2 ;;
    --no-download) NO_DOWNLOAD=1; shift ;;
    --vocab-size) VOCAB_SIZE=${2:?--vocab-size needs a value}; shift 2 ;;
    --subset) SUBSET=${2:?--subset needs a value}; shift 2 ;;
    --workers) WORKERS=${2:?--workers needs a value}; shift 2 ;;
    --max-len) MAX_LEN=${2:?--max-len needs a value}; shift 2 ;;
    --min-len) MIN_LEN=${2:?--min-len needs a value}; shift 2 ;;
    --ratio) RATIO=${2:?--ratio needs a value}; shift 2 ;;
    --character-coverage) CHAR_COVERAGE=${2:?--character-coverage needs a value}; shift 2 ;;
    --spm-sentences) SPM_SENTENCES=${2:?--spm-sentences needs a value}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
    esac
done

[[ $SRC == en ]] || die "Multi30k recipes translate from English: --src must be en (got '$SRC')"
case $TGT in
de | fr) ;;
"") die "--tgt de|fr is required" ;;
*) die "unsupported --tgt '$TGT' (use de or fr)" ;;
esac
PAIR="$SRC-$TGT"
validate_common_options
RAW_DIR=${RAW_DIR:-$OUT/archives}
[[ -d $RAW_DIR ]] || [[ $NO_DOWNLOAD == 0 ]] || die "--raw-dir $RAW_DIR does not exist"
mkdir -p "$RAW_DIR" || die "cannot create $RAW_DIR"

check_common_tools
URL_BASE=${MULTI30K_URL:-https://github.com/multi30k/dataset/raw/master/data/task1/raw}
log "Multi30k task 1, $SRC -> $TGT; raw files in $RAW_DIR; output in $OUT"

ORIG="$OUT/orig"
SPLITS=("train:train" "val:valid" "test_2016_flickr:test")

# --- step download
for s in "${SPLITS[@]}"; do
    for l in "$SRC" "$TGT"; do
        f="${s%%:*}.$l.gz"
        fetch "${URL_BASE%/}/$f" "$RAW_DIR/$f"
    done
done

# --- step extract: gzip integrity test, decompress into OUT/orig
for s in "${SPLITS[@]}"; do
    for l in "$SRC" "$TGT"; do
        f="${s%%:*}.$l.gz"
        key="extract|$(cd "$RAW_DIR" && pwd)/$f|$(wc -c <"$RAW_DIR/$f")"
        if step_done "extract.$f" "$key" "$ORIG/${f%.gz}"; then
            log "step extract: $f already checked and decompressed, skipping"
            continue
        fi
        rm -f "$OUT/.stamps/extract.$f" "$OUT/.stamps/raw"
        mkdir -p "$ORIG" "$OUT/.stamps"
        log "step extract: checking and decompressing $RAW_DIR/$f"
        gunzip_to "$RAW_DIR/$f" "$ORIG/${f%.gz}"
        step_mark "extract.$f" "$key"
    done
done

# --- step raw: clean train + valid, copy test
RAW="$OUT/raw"
KEY_RAW="multi30k|$PAIR|subset=${SUBSET:-all}|max_len=$MAX_LEN|min_len=$MIN_LEN|ratio=$RATIO"
raw_out=()
for sp in train valid test; do for l in "$SRC" "$TGT"; do raw_out+=("$RAW/$sp.$l"); done; done
if step_done raw "$KEY_RAW" "${raw_out[@]}"; then
    log "step raw: $RAW exists, skipping"
else
    step_start raw
    mkdir -p "$RAW"
    log "step raw: cleaning train (max $MAX_LEN words, min $MIN_LEN, ratio $RATIO, no empty or duplicate pairs${SUBSET:+, first $SUBSET clean pairs})"
    clean_pairs "$RAW/train.$SRC" "$RAW/train.$TGT" 1 "${SUBSET:-0}" "$ORIG/train.$SRC" "$ORIG/train.$TGT"
    log "step raw: cleaning valid (val)"
    clean_pairs "$RAW/valid.$SRC" "$RAW/valid.$TGT" 0 0 "$ORIG/val.$SRC" "$ORIG/val.$TGT"
    log "step raw: test = test_2016_flickr, whitespace-normalised, not cleaned"
    normalise_text "$ORIG/test_2016_flickr.$SRC" "$RAW/test.$SRC"
    normalise_text "$ORIG/test_2016_flickr.$TGT" "$RAW/test.$TGT"
    ns=$(count_lines "$RAW/test.$SRC") nt=$(count_lines "$RAW/test.$TGT")
    ((ns == nt)) || die "test_2016_flickr.$SRC has $ns lines but test_2016_flickr.$TGT has $nt"
    n=$(count_lines "$RAW/train.$SRC")
    ((n > 0)) || die "no training pairs left after cleaning"
    log "step raw: train $n, valid $(count_lines "$RAW/valid.$SRC"), test $ns pairs"
    step_mark raw "$KEY_RAW"
fi

common_tail multi30k
