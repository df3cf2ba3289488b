#!/usr/bin/env bash
# WMT'14 English-German or English-French, either direction, with a joint sentencepiece vocabulary.
#
#   data_prep/prepare-wmt14.sh --pair en-de --src en --tgt de --out data/wmt14.en-de [options]
#
# Training data: the WMT'14 corpora of fairseq's recipes (examples/translation/prepare-wmt14en2{de,fr}.sh):
#   en-de: Europarl v7, Common Crawl, News Commentary v9
#   en-fr: Europarl v7, Common Crawl, UN, News Commentary v9, Giga-fren
# Validation: newstest2013 (dev.tgz). Test: newstest2014, the full set (test-full.tgz, same as
# sacreBLEU's wmt14/full), SGML stripped. --test-sets adds or replaces test sets from the newstest
# years the archives hold: newstest2009 to newstest2013 (dev.tgz, plain text) and newstest2014. They
# become splits test, test1, ... in the order given (fairseq's --testpref a,b,... names; OUT/prep.json
# maps them to the set names). Test sets are references: whitespace-normalised only, never cleaned.
#
# Options:
#   --pair en-de|en-fr     language pair (default: from --src/--tgt)
#   --src L --tgt L        direction (default en -> the other language of the pair)
#   --out DIR              output folder (required)
#   --raw-dir DIR          where the archives are, or are downloaded to (default OUT/archives)
#   --no-download          fail instead of downloading a missing archive
#   --test-sets A,B,...    test sets in this order, from newstest2009 ... newstest2014 (default newstest2014)
#   --vocab-size N         joint sentencepiece vocabulary (default 32000)
#   --subset N             keep only the first N clean training pairs
#   --workers N            threads for sentencepiece, sort and fairseq-preprocess (default nproc, max 8)
#   --max-len N            drop training/valid pairs with a side longer than N words (default 250)
#   --min-len N            ... or shorter than N words (default 1)
#   --ratio R              ... or with a word-length ratio above R (default 1.5)
#   --character-coverage C sentencepiece character coverage (default 1.0)
#   --spm-sentences N      sentences sampled to train sentencepiece (default 5000000)
# Env: PYTHON (a python with sentencepiece), FAIRSEQ_PREPROCESS, WMT14_MIRROR (a base URL holding all
# archives by file name, instead of statmt.org).
#
# Output (OUT): raw/{train,valid,test,test1,...}.{SRC,TGT}, spm/spm.{model,vocab}, spm-encoded/ (the same
# splits), data-bin/ (fairseq-preprocess --joined-dictionary), prep.json. Archives are extracted under OUT/orig.
# Re-running skips the steps whose outputs exist and whose options are unchanged.
set -euo pipefail

PREP_NAME=prepare-wmt14
DATA_PREP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=data_prep/common.sh
source "$DATA_PREP_DIR/common.sh"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

PAIR="" SRC="" TGT="" OUT="" RAW_DIR="" NO_DOWNLOAD=0 VOCAB_SIZE=32000 SUBSET="" WORKERS=$(default_workers)
MAX_LEN=250 MIN_LEN=1 RATIO=1.5 CHAR_COVERAGE=1.0 SPM_SENTENCES=5000000 TEST_SETS=newstest2014
KNOWN_TEST_SETS=(newstest2009 newstest2010 newstest2011 newstest2012 newstest2013 newstest2014)
while (($#)); do
    case $1 in
    --pair) PAIR=${2:?--pair needs a value}; shift 2 ;;
    --src) SRC=${2:?--src needs a value}; shift 2 ;;
    --tgt) TGT=${2:?--tgt needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --raw-dir) RAW_DIR=${2:?--raw-dir needs a value}; shift 2 ;;
    --no-download) NO_DOWNLOAD=1; shift ;;
    --test-sets) TEST_SETS=${2?--test-sets needs a value}; shift 2 ;;
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

# --- pair and direction
if [[ -z $PAIR ]]; then
    case "$SRC-$TGT" in
    en-de | de-en) PAIR=en-de ;;
    en-fr | fr-en) PAIR=en-fr ;;
    *) die "give --pair en-de or --pair en-fr (with --src/--tgt for the direction)" ;;
    esac
fi
case $PAIR in
en-de | de-en) PAIR=en-de XX=de ;;
en-fr | fr-en) PAIR=en-fr XX=fr ;;
*) die "unsupported --pair '$PAIR' (use en-de or en-fr)" ;;
esac
[[ -n $SRC ]] || { [[ $TGT == en ]] && SRC=$XX || SRC=en; }
[[ -n $TGT ]] || { [[ $SRC == en ]] && TGT=$XX || TGT=en; }
if ! [[ ($SRC == en && $TGT == "$XX") || ($SRC == "$XX" && $TGT == en) ]]; then
    die "--src $SRC --tgt $TGT does not match --pair $PAIR"
fi
parse_test_sets "$TEST_SETS" "${KNOWN_TEST_SETS[@]}"
set_test_splits
validate_common_options
RAW_DIR=${RAW_DIR:-$OUT/archives}
mkdir -p "$RAW_DIR" || die "cannot create $RAW_DIR"

check_common_tools
if [[ $NO_DOWNLOAD == 0 ]] && ! command -v curl >/dev/null 2>&1 && ! command -v wget >/dev/null 2>&1; then
    log "note: neither curl nor wget found; only archives already in $RAW_DIR can be used"
fi
log "WMT'14 $PAIR, $SRC -> $TGT; archives in $RAW_DIR; output in $OUT"

# --- what to fetch: archive | URL | members (relative to the extraction folder)
BASE=https://statmt.org
TAG="${XX}en" # newstest2014-deen-*, newstest2014-fren-*
ARCHIVES=(
    "training-parallel-europarl-v7.tgz|$BASE/wmt13/training-parallel-europarl-v7.tgz|training/europarl-v7.$XX-en.$XX training/europarl-v7.$XX-en.en"
    "training-parallel-commoncrawl.tgz|$BASE/wmt13/training-parallel-commoncrawl.tgz|commoncrawl.$XX-en.$XX commoncrawl.$XX-en.en"
)
CORPORA=(training/europarl-v7.$XX-en commoncrawl.$XX-en)
if [[ $XX == fr ]]; then
    ARCHIVES+=("training-parallel-un.tgz|$BASE/wmt13/training-parallel-un.tgz|un/undoc.2000.fr-en.fr un/undoc.2000.fr-en.en")
    CORPORA+=(un/undoc.2000.fr-en)
fi
ARCHIVES+=("training-parallel-nc-v9.tgz|$BASE/wmt14/training-parallel-nc-v9.tgz|training/news-commentary-v9.$XX-en.$XX training/news-commentary-v9.$XX-en.en")
CORPORA+=(training/news-commentary-v9.$XX-en)
if [[ $XX == fr ]]; then
    ARCHIVES+=("training-giga-fren.tar|$BASE/wmt10/training-giga-fren.tar|giga-fren.release2.fixed.fr.gz giga-fren.release2.fixed.en.gz")
    CORPORA+=(giga-fren.release2.fixed)
fi
ARCHIVES+=("dev.tgz|$BASE/wmt14/dev.tgz|dev/newstest2013.$SRC dev/newstest2013.$TGT")
# the test sets' members, extracted apart: a new test set must not redo the cleaning (step raw)
TEST_ARCHIVES=()
dev_members=""
for name in "${TEST_NAMES[@]}"; do
    [[ $name == newstest2014 ]] || dev_members+="${dev_members:+ }dev/$name.$SRC dev/$name.$TGT"
done
[[ -z $dev_members ]] || TEST_ARCHIVES+=("dev.tgz|$BASE/wmt14/dev.tgz|$dev_members")
if [[ " ${TEST_NAMES[*]} " == *" newstest2014 "* ]]; then
    TEST_ARCHIVES+=("test-full.tgz|$BASE/wmt14/test-full.tgz|test-full/newstest2014-$TAG-src.$SRC.sgm test-full/newstest2014-$TAG-ref.$TGT.sgm")
fi
[[ " ${TEST_NAMES[*]} " != *" newstest2013 "* ]] || log "note: newstest2013 is also the validation set"
log "test sets: ${TEST_KEY//,/, }"

ORIG="$OUT/orig"

# --- step download
fetched=" "
for entry in "${ARCHIVES[@]}" "${TEST_ARCHIVES[@]}"; do
    IFS='|' read -r file url _ <<<"$entry"
    [[ $fetched != *" $file "* ]] || continue
    fetched+="$file "
    [[ -n ${WMT14_MIRROR:-} ]] && url="${WMT14_MIRROR%/}/$file"
    fetch "$url" "$RAW_DIR/$file"
done

# --- step extract: check each archive's integrity and members, extract the members we use.
# extract_entry ENTRY STAMP STEP: STEP is the step whose stamp a (re-)extraction invalidates.
extract_entry() {
    local file members archive key m outs=() member_list
    IFS='|' read -r file _ members <<<"$1"
    read -r -a member_list <<<"$members"
    archive="$RAW_DIR/$file"
    key="extract|$(cd "$(dirname "$archive")" && pwd)/$file|$(wc -c <"$archive")|$members"
    for m in "${member_list[@]}"; do outs+=("$ORIG/${m%.gz}"); done
    if step_done "$2" "$key" "${outs[@]}"; then
        log "step extract: $file already checked and extracted, skipping"
        return 0
    fi
    rm -f "$OUT/.stamps/$2" "$OUT/.stamps/$3"
    extract_members "$archive" "$ORIG" "${member_list[@]}"
    for m in "${member_list[@]}"; do
        if [[ $m == *.gz ]]; then
            log "decompressing $m"
            gunzip_to "$ORIG/$m" "$ORIG/${m%.gz}"
            rm -f "$ORIG/$m"
        fi
    done
    mkdir -p "$OUT/.stamps"
    step_mark "$2" "$key"
}
for entry in "${ARCHIVES[@]}"; do extract_entry "$entry" "extract.${entry%%|*}" raw; done
for entry in "${TEST_ARCHIVES[@]}"; do extract_entry "$entry" "extract-test.${entry%%|*}" test; done

# --- step raw: clean train + valid
RAW="$OUT/raw"
KEY_RAW="wmt14|$PAIR|$SRC-$TGT|subset=${SUBSET:-all}|max_len=$MAX_LEN|min_len=$MIN_LEN|ratio=$RATIO"
raw_out=()
for sp in train valid; do for l in "$SRC" "$TGT"; do raw_out+=("$RAW/$sp.$l"); done; done
if step_done raw "$KEY_RAW" "${raw_out[@]}"; then
    log "step raw: $RAW exists, skipping"
else
    step_start raw
    mkdir -p "$RAW"
    pairs=()
    for c in "${CORPORA[@]}"; do pairs+=("$ORIG/$c.$SRC" "$ORIG/$c.$TGT"); done
    log "step raw: cleaning the training corpora (max $MAX_LEN words, min $MIN_LEN, ratio $RATIO, no empty or duplicate pairs${SUBSET:+, first $SUBSET clean pairs})"
    clean_pairs "$RAW/train.$SRC" "$RAW/train.$TGT" 1 "${SUBSET:-0}" "${pairs[@]}"
    log "step raw: cleaning valid (newstest2013)"
    clean_pairs "$RAW/valid.$SRC" "$RAW/valid.$TGT" 0 0 "$ORIG/dev/newstest2013.$SRC" "$ORIG/dev/newstest2013.$TGT"
    n=$(count_lines "$RAW/train.$SRC")
    ((n > 0)) || die "no training pairs left after cleaning"
    log "step raw: train $n, valid $(count_lines "$RAW/valid.$SRC") pairs"
    step_mark raw "$KEY_RAW"
fi

# --- step test: newstest2014 from its SGML (full set), the older years from dev.tgz's plain text
test_text() { # NAME LANG OUT
    if [[ $1 != newstest2014 ]]; then
        normalise_text "$ORIG/dev/$1.$2" "$3"
    elif [[ $2 == "$SRC" ]]; then
        sgm_to_text "$ORIG/test-full/newstest2014-$TAG-src.$SRC.sgm" "$3"
    else
        sgm_to_text "$ORIG/test-full/newstest2014-$TAG-ref.$TGT.sgm" "$3"
    fi
}
test_step test_text

common_tail wmt14
