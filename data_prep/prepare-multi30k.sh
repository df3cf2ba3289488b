#!/usr/bin/env bash
# Multi30k task 1 (English image captions with German or French translations), en -> de|fr,
# with a joint sentencepiece vocabulary.
#
#   data_prep/prepare-multi30k.sh --tgt de --out data/multi30k.en-de [--raw-dir DIR] [options]
#
# Input: the raw gz files of the dataset's public repository (github.com/multi30k/dataset,
# data/task1/raw/): {train,val,TEST_SET}.{en,de,fr}.gz; downloaded when not in --raw-dir.
# Splits: train -> train, val -> valid, the test sets -> test, test1, test2, ... in order (fairseq's
# --testpref a,b,... names; OUT/prep.json maps them to the set names). Test sets are references:
# whitespace-normalised only, never cleaned. The four standard test sets, in their default order:
# test_2016_flickr, test_2017_flickr, test_2018_flickr, test_2017_mscoco.
#
# Options:
#   --tgt de|fr            target language (source is always en)
#   --src en               accepted for symmetry with prepare-wmt14.sh; only en
#   --out DIR              output folder (required)
#   --raw-dir DIR          where the .gz files are, or are downloaded to (default OUT/archives)
#   --no-download          fail instead of downloading a missing file
#   --test-sets A,B,...    the test sets, in this order (each must exist or download). Default: every
#                          standard set found in --raw-dir or downloadable, each other one skipped
#                          with a warning; test_2016_flickr (split test) is always required
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
# Output (OUT): raw/{train,valid,test,test1,...}.{en,TGT}, spm/spm.{model,vocab}, spm-encoded/ (the same
# splits), data-bin/ (fairseq-preprocess --joined-dictionary), prep.json. Files are decompressed under OUT/orig.
# Re-running skips the steps whose outputs exist and whose options are unchanged.
set -euo pipefail

PREP_NAME=prepare-multi30k
DATA_PREP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=data_prep/common.sh
source "$DATA_PREP_DIR/common.sh"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

SRC=en TGT="" OUT="" RAW_DIR="" NO_DOWNLOAD=0 VOCAB_SIZE=8000 SUBSET="" WORKERS=$(default_workers)
MAX_LEN=250 MIN_LEN=1 RATIO=3 CHAR_COVERAGE=1.0 SPM_SENTENCES=5000000 TEST_SETS="" TEST_SETS_GIVEN=0
STANDARD_TEST_SETS=(test_2016_flickr test_2017_flickr test_2018_flickr test_2017_mscoco)
while (($#)); do
    case $1 in
    --src) SRC=${2:?--src needs a value}; shift 2 ;;
    --tgt) TGT=${2:?--tgt needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --raw-dir) RAW_DIR=${2:?--raw-dir needs a value}; shift 2 ;;
    --no-download) NO_DOWNLOAD=1; shift ;;
    --test-sets) TEST_SETS=${2?--test-sets needs a value} TEST_SETS_GIVEN=1; shift 2 ;;
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
((!TEST_SETS_GIVEN)) || parse_test_sets "$TEST_SETS" "${STANDARD_TEST_SETS[@]}"
validate_common_options
RAW_DIR=${RAW_DIR:-$OUT/archives}
[[ -d $RAW_DIR ]] || [[ $NO_DOWNLOAD == 0 ]] || die "--raw-dir $RAW_DIR does not exist"
mkdir -p "$RAW_DIR" || die "cannot create $RAW_DIR"

check_common_tools
URL_BASE=${MULTI30K_URL:-https://github.com/multi30k/dataset/raw/master/data/task1/raw}
log "Multi30k task 1, $SRC -> $TGT; raw files in $RAW_DIR; output in $OUT"

ORIG="$OUT/orig"

# --- step download: train and val, then the test sets
for f in train val; do for l in "$SRC" "$TGT"; do fetch "${URL_BASE%/}/$f.$l.gz" "$RAW_DIR/$f.$l.gz"; done; done
if ((TEST_SETS_GIVEN)); then
    for name in "${TEST_NAMES[@]}"; do for l in "$SRC" "$TGT"; do
        fetch "${URL_BASE%/}/$name.$l.gz" "$RAW_DIR/$name.$l.gz"
    done; done
else
    # split test keeps meaning test_2016_flickr, the set the literature and our benchmarks report
    for l in "$SRC" "$TGT"; do fetch "${URL_BASE%/}/test_2016_flickr.$l.gz" "$RAW_DIR/test_2016_flickr.$l.gz"; done
    TEST_NAMES=(test_2016_flickr)
    for name in "${STANDARD_TEST_SETS[@]:1}"; do
        if fetch_optional "${URL_BASE%/}/$name.$SRC.gz" "$RAW_DIR/$name.$SRC.gz" &&
            fetch_optional "${URL_BASE%/}/$name.$TGT.gz" "$RAW_DIR/$name.$TGT.gz"; then
            TEST_NAMES+=("$name")
        else
            warn "skipping test set $name: $FETCH_ERROR"
        fi
    done
fi
set_test_splits
log "test sets: ${TEST_KEY//,/, }"

# --- step extract: gzip integrity test, decompress into OUT/orig. A changed file invalidates the
# step that reads it: train/val the cleaning (step raw), a test set only step test.
extract_gz() { # extract_gz FILE STEP
    local f=$1 step=$2 key
    key="extract|$(cd "$RAW_DIR" && pwd)/$f|$(wc -c <"$RAW_DIR/$f")"
    if step_done "extract.$f" "$key" "$ORIG/${f%.gz}"; then
        log "step extract: $f already checked and decompressed, skipping"
        return 0
    fi
    rm -f "$OUT/.stamps/extract.$f" "$OUT/.stamps/$step"
    mkdir -p "$ORIG" "$OUT/.stamps"
    log "step extract: checking and decompressing $RAW_DIR/$f"
    gunzip_to "$RAW_DIR/$f" "$ORIG/${f%.gz}"
    step_mark "extract.$f" "$key"
}
for f in train val; do for l in "$SRC" "$TGT"; do extract_gz "$f.$l.gz" raw; done; done
for name in "${TEST_NAMES[@]}"; do for l in "$SRC" "$TGT"; do extract_gz "$name.$l.gz" test; done; done

# --- step raw: clean train + valid
RAW="$OUT/raw"
KEY_RAW="multi30k|$PAIR|subset=${SUBSET:-all}|max_len=$MAX_LEN|min_len=$MIN_LEN|ratio=$RATIO"
raw_out=()
for sp in train valid; do for l in "$SRC" "$TGT"; do raw_out+=("$RAW/$sp.$l"); done; done
if step_done raw "$KEY_RAW" "${raw_out[@]}"; then
    log "step raw: $RAW exists, skipping"
else
    step_start raw
    mkdir -p "$RAW"
    log "step raw: cleaning train (max $MAX_LEN words, min $MIN_LEN, ratio $RATIO, no empty or duplicate pairs${SUBSET:+, first $SUBSET clean pairs})"
    clean_pairs "$RAW/train.$SRC" "$RAW/train.$TGT" 1 "${SUBSET:-0}" "$ORIG/train.$SRC" "$ORIG/train.$TGT"
    log "step raw: cleaning valid (val)"
    clean_pairs "$RAW/valid.$SRC" "$RAW/valid.$TGT" 0 0 "$ORIG/val.$SRC" "$ORIG/val.$TGT"
    n=$(count_lines "$RAW/train.$SRC")
    ((n > 0)) || die "no training pairs left after cleaning"
    log "step raw: train $n, valid $(count_lines "$RAW/valid.$SRC") pairs"
    step_mark raw "$KEY_RAW"
fi

# --- step test: each test set whitespace-normalised into its split
test_text() { normalise_text "$ORIG/$1.$2" "$3"; } # NAME LANG OUT
test_step test_text

common_tail multi30k
