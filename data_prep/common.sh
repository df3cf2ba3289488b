# shellcheck shell=bash
# Shared functions of the data recipes (prepare-wmt14.sh, prepare-multi30k.sh). Source it; do not run it.
#
# Every step logs what it does. A step records a stamp OUT/.stamps/<step> holding the options it ran
# with; it is skipped on a re-run when its stamp matches and its outputs exist. Running a step removes
# the stamps of the steps after it, so changing an option redoes exactly what depends on it.
#
# The test sets (step "test") are off that chain: they feed encode and binarize but not sentencepiece,
# so adding or dropping a test set re-encodes and re-binarises, and keeps the sentencepiece model (and
# with it the dictionary that trained checkpoints depend on).

PREP_NAME=${PREP_NAME:-prepare}
DATA_PREP_DIR=${DATA_PREP_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
STEPS=(download extract raw spm encode binarize)

log() { printf '[%s] %s\n' "$PREP_NAME" "$*"; }
warn() { printf '[%s] WARNING: %s\n' "$PREP_NAME" "$*" >&2; }
die() {
    printf '[%s] ERROR: %s\n' "$PREP_NAME" "$*" >&2
    exit 1
}

# need_tool NAME [HINT]: dies unless NAME is an executable on PATH.
need_tool() {
    command -v "$1" >/dev/null 2>&1 || die "required tool '$1' not found on PATH${2:+ ($2)}"
}

# is_positive_int VALUE
is_positive_int() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
is_number() { [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]; }

# find_python: sets PY to $PYTHON, else `python`, else `python3` on PATH; it must import sentencepiece.
find_python() {
    if [[ -n ${PYTHON:-} ]]; then
        PY=$(command -v "$PYTHON" 2>/dev/null) || die "PYTHON=$PYTHON is not an executable"
    elif command -v python >/dev/null 2>&1; then
        PY=$(command -v python)
    elif command -v python3 >/dev/null 2>&1; then
        PY=$(command -v python3)
    else
        die "required tool 'python' not found on PATH (or set PYTHON=/path/to/python)"
    fi
    "$PY" -c 'import sentencepiece' >/dev/null 2>&1 ||
        die "python ($PY) cannot import sentencepiece: install it (pip install sentencepiece) or set PYTHON"
}

# find_preprocess: sets FSQ_PREPROCESS to $FAIRSEQ_PREPROCESS, else fairseq-preprocess on PATH.
find_preprocess() {
    if [[ -n ${FAIRSEQ_PREPROCESS:-} ]]; then
        FSQ_PREPROCESS=$(command -v "$FAIRSEQ_PREPROCESS" 2>/dev/null) ||
            die "FAIRSEQ_PREPROCESS=$FAIRSEQ_PREPROCESS is not an executable"
    else
        FSQ_PREPROCESS=$(command -v fairseq-preprocess 2>/dev/null) ||
            die "required tool 'fairseq-preprocess' not found on PATH (install fairseq, activate its environment, or set FAIRSEQ_PREPROCESS)"
    fi
}

# check_common_tools: everything the recipes need besides downloads.
check_common_tools() {
    local t
    for t in gzip tar awk sed sort cut wc head mv; do need_tool "$t"; done
    find_python
    find_preprocess
    log "python: $PY"
    log "fairseq-preprocess: $FSQ_PREPROCESS"
}

default_workers() {
    local n
    n=$(nproc 2>/dev/null || echo 1)
    ((n > 8)) && n=8
    echo "$n"
}

# ---------------------------------------------------------------- step stamps

step_done() { # step_done STEP KEY OUTPUT...
    local step=$1 key=$2 f
    shift 2
    [[ -f $OUT/.stamps/$step ]] || return 1
    [[ "$(cat "$OUT/.stamps/$step")" == "$key" ]] || return 1
    for f in "$@"; do [[ -e $f ]] || return 1; done
    return 0
}

step_start() { # step_start STEP: forget this step and every step that depends on it
    local s later=0
    mkdir -p "$OUT/.stamps"
    if [[ $1 == test ]]; then
        rm -f "$OUT/.stamps/test" "$OUT/.stamps/encode" "$OUT/.stamps/binarize"
        return 0
    fi
    for s in "${STEPS[@]}"; do
        [[ $s == "$1" ]] && later=1
        ((later)) && rm -f "$OUT/.stamps/$s"
    done
    return 0
}

step_mark() { printf '%s' "$2" >"$OUT/.stamps/$1"; }

# ---------------------------------------------------------------- archives

# fetch URL DEST: downloads URL to DEST unless DEST exists. NO_DOWNLOAD=1 turns a missing DEST into an error.
fetch() {
    local url=$1 dest=$2
    if [[ -s $dest ]]; then
        log "found $dest, skipping download"
        return 0
    fi
    if [[ ${NO_DOWNLOAD:-0} == 1 ]]; then
        die "missing archive: $dest (not found and --no-download given; download it from $url)"
    fi
    download "$url" "$dest" || die "$FETCH_ERROR"
}

# fetch_optional URL DEST: as fetch, but a file that is missing (--no-download) or cannot be downloaded
# returns 1 with the reason in FETCH_ERROR instead of stopping the recipe.
fetch_optional() {
    local url=$1 dest=$2
    if [[ -s $dest ]]; then
        log "found $dest, skipping download"
        return 0
    fi
    if [[ ${NO_DOWNLOAD:-0} == 1 ]]; then
        FETCH_ERROR="$dest not found (--no-download given)"
        return 1
    fi
    download "$url" "$dest"
}

# download URL DEST: returns 1 with the reason in FETCH_ERROR on failure, leaving no partial file.
download() {
    local url=$1 dest=$2 ok=1
    FETCH_ERROR=""
    mkdir -p "$(dirname "$dest")" 2>/dev/null || {
        FETCH_ERROR="cannot create $(dirname "$dest") to download $url into"
        return 1
    }
    log "downloading $url -> $dest"
    rm -f "$dest.part"
    if command -v curl >/dev/null 2>&1; then
        curl -fL --retry 3 --connect-timeout 30 -sS -o "$dest.part" "$url" || ok=0
    elif command -v wget >/dev/null 2>&1; then
        wget -q --tries=3 --timeout=30 -O "$dest.part" "$url" || ok=0
    else
        FETCH_ERROR="required tool 'curl' or 'wget' not found on PATH, needed to download $url (or put the file at $dest)"
        return 1
    fi
    if ((!ok)) || [[ ! -s $dest.part ]]; then
        rm -f "$dest.part"
        FETCH_ERROR="download failed: $url$( ((ok)) && echo ' gave an empty file' || echo " (put the file at $dest yourself and run again)")"
        return 1
    fi
    mv "$dest.part" "$dest" || {
        FETCH_ERROR="cannot write $dest"
        return 1
    }
}

# check_gzip FILE: gzip integrity test.
check_gzip() {
    [[ -f $1 ]] || die "missing file: $1"
    gzip -t "$1" 2>/dev/null ||
        die "corrupt or truncated archive: $1 (gzip integrity test failed; delete it and download it again)"
}

# list_archive ARCHIVE LISTING: tests the archive's integrity and writes its member list to LISTING.
list_archive() {
    local archive=$1 listing=$2
    [[ -f $archive ]] || die "missing archive: $archive"
    log "checking $archive"
    case $archive in
    *.tgz | *.tar.gz)
        check_gzip "$archive"
        tar -tzf "$archive" >"$listing" 2>/dev/null ||
            die "corrupt or truncated archive: $archive (tar cannot read it; delete it and download it again)"
        ;;
    *.tar)
        tar -tf "$archive" >"$listing" 2>/dev/null ||
            die "corrupt or truncated archive: $archive (tar cannot read it; delete it and download it again)"
        ;;
    *) die "unknown archive type: $archive" ;;
    esac
}

# extract_members ARCHIVE DESTDIR MEMBER...: checks the archive, checks that every MEMBER is in it
# (with or without a leading ./), extracts those members under DESTDIR.
extract_members() {
    local archive=$1 dest=$2
    shift 2
    local listing names=() m
    mkdir -p "$dest"
    listing=$(mktemp)
    list_archive "$archive" "$listing"
    for m in "$@"; do
        if grep -Fqx -- "$m" "$listing"; then
            names+=("$m")
        elif grep -Fqx -- "./$m" "$listing"; then
            names+=("./$m")
        else
            rm -f "$listing"
            die "member '$m' not found in archive $archive (is it the right file?)"
        fi
    done
    rm -f "$listing"
    log "extracting ${names[*]} from $(basename "$archive")"
    case $archive in
    *.tgz | *.tar.gz) tar -xzf "$archive" -C "$dest" -- "${names[@]}" ;;
    *) tar -xf "$archive" -C "$dest" -- "${names[@]}" ;;
    esac || die "could not extract from $archive (corrupt archive or disk full?)"
    for m in "$@"; do
        [[ -f $dest/$m ]] || die "member '$m' of $archive was not extracted"
    done
}

# gunzip_to GZ DEST: checks and decompresses GZ into DEST.
gunzip_to() {
    check_gzip "$1"
    gzip -dc "$1" >"$2.tmp" || die "could not decompress $1"
    mv "$2.tmp" "$2"
}

# ---------------------------------------------------------------- text

# count_lines FILE: number of lines, counting a last line without a newline.
count_lines() { awk 'END { print NR }' "$1"; }

# normalise_text IN OUT: CR removed, whitespace runs collapsed to one space, ends trimmed.
normalise_text() {
    awk '{ gsub(/[ \t\r\f\v]+/, " "); sub(/^ /, ""); sub(/ $/, ""); print }' "$1" >"$2.tmp" ||
        die "could not read $1"
    mv "$2.tmp" "$2"
}

# sgm_to_text SGM OUT: the <seg> contents of a WMT (fake) SGML file, one per line, whitespace
# normalised as sacreBLEU does; no other change (it is the reference).
sgm_to_text() {
    [[ -f $1 ]] || die "missing file: $1"
    awk '/^[ \t]*<seg[ >]/ {
            sub(/^[ \t]*<seg[^>]*>/, ""); sub(/<\/seg>[ \t\r]*$/, "")
            gsub(/[ \t\r\f\v]+/, " "); sub(/^ /, ""); sub(/ $/, ""); print; n++
         }
         END { if (n == 0) exit 3 }' "$1" >"$2.tmp" || die "no <seg> lines in $1 (is it a WMT .sgm file?)"
    mv "$2.tmp" "$2"
}

# The cleaning filter. Reads source lines from its input file and target lines from tgtfile, in
# parallel. Normalises whitespace and drops pairs with an empty side, a side longer than maxlen or
# shorter than minlen words, or a length ratio above ratio (as Moses' clean-corpus-n). dedupe=1 drops
# repeated pairs (remembering those already in seenfile). limit>0 stops after that many kept pairs.
# Writes "number<TAB>source<TAB>target" lines (number = offset + line number) and a summary on stderr.
CLEAN_AWK='
BEGIN {
    kept = 0
    if (seenfile != "") {  # pairs kept from earlier corpora: they count towards limit
        while ((getline line < seenfile) > 0) {
            kept++
            if (dedupe) { sub(/^[0-9]+\t/, "", line); seen[line] = 1 }
        }
        close(seenfile)
    }
    start = kept; bad = 0; stopped = 0
}
{
    s = $0
    if ((getline t < tgtfile) <= 0) { bad = 1; exit }
    read++
    gsub(/[ \t\r\f\v]+/, " ", s); sub(/^ /, "", s); sub(/ $/, "", s)
    gsub(/[ \t\r\f\v]+/, " ", t); sub(/^ /, "", t); sub(/ $/, "", t)
    if (s == "" || t == "") { empty++; next }
    ns = split(s, w1, " "); nt = split(t, w2, " ")
    if (ns > maxlen || nt > maxlen || ns < minlen || nt < minlen) { length_bad++; next }
    if (ns > ratio * nt || nt > ratio * ns) { ratio_bad++; next }
    if (dedupe) {
        key = s "\t" t
        if (key in seen) { dup++; next }
        seen[key] = 1
    }
    print (offset + NR) "\t" s "\t" t
    kept++
    if (limit > 0 && kept >= limit) { stopped = 1; exit }
}
END {
    if (bad) { print "line count mismatch: " tgtfile " has fewer lines than the source file" > "/dev/stderr"; exit 3 }
    if (!stopped && (getline t < tgtfile) > 0) {
        print "line count mismatch: " tgtfile " has more lines than the source file" > "/dev/stderr"; exit 3
    }
    printf "read %d pairs, kept %d; dropped: %d empty, %d too long/short, %d bad length ratio%s%s\n", \
        read, kept - start, empty + 0, length_bad + 0, ratio_bad + 0, (dedupe ? ", " (dup + 0) " duplicate" : ""), \
        (stopped ? " (subset reached)" : "") > "/dev/stderr"
}'

# clean_pairs OUT_SRC OUT_TGT DEDUPE LIMIT SRC1 TGT1 [SRC2 TGT2 ...]
# Cleans the corpora in order into OUT_SRC/OUT_TGT (uses MAX_LEN, MIN_LEN, RATIO). DEDUPE=1 removes
# duplicate pairs, keeping the first. LIMIT>0 keeps only the first LIMIT clean pairs (and reads no more
# corpora once reached).
clean_pairs() {
    local out_src=$1 out_tgt=$2 dedupe=$3 limit=$4
    shift 4
    local numbered="$out_src.numbered" offset=0 kept=0 s t n summary
    : >"$numbered"
    while (($# >= 2)); do
        s=$1 t=$2
        shift 2
        [[ -f $s ]] || die "missing file: $s"
        [[ -f $t ]] || die "missing file: $t"
        if ((limit > 0)); then
            # in-memory de-duplication: bounded by the subset size
            summary=$(awk -v tgtfile="$t" -v maxlen="$MAX_LEN" -v minlen="$MIN_LEN" -v ratio="$RATIO" \
                -v dedupe="$dedupe" -v seenfile="$numbered" -v limit="$limit" -v offset="$offset" \
                "$CLEAN_AWK" "$s" 2>&1 >>"$numbered") || die "cleaning $s / $t failed: $summary"
        else
            summary=$(awk -v tgtfile="$t" -v maxlen="$MAX_LEN" -v minlen="$MIN_LEN" -v ratio="$RATIO" \
                -v dedupe=0 -v seenfile="" -v limit=0 -v offset="$offset" \
                "$CLEAN_AWK" "$s" 2>&1 >>"$numbered") || die "cleaning $s / $t failed: $summary"
        fi
        log "  $(basename "$s") / $(basename "$t"): $summary"
        n=$(count_lines "$s")
        offset=$((offset + n))
        kept=$(count_lines "$numbered")
        if ((limit > 0 && kept >= limit)); then
            (($# > 0)) && log "  subset of $limit pairs reached; the remaining corpora are not read"
            break
        fi
    done
    if ((dedupe && limit == 0)); then
        # external de-duplication (any corpus size): keep the first of equal pairs, then restore the order
        local before after
        before=$(count_lines "$numbered")
        LC_ALL=C sort -t $'\t' -k2 -s -u -S 20% --parallel="${WORKERS:-1}" -T "$(dirname "$numbered")" "$numbered" |
            LC_ALL=C sort -t $'\t' -k1,1n -S 20% --parallel="${WORKERS:-1}" -T "$(dirname "$numbered")" \
                >"$numbered.dedup" || die "sort failed while removing duplicates (disk full?)"
        mv "$numbered.dedup" "$numbered"
        after=$(count_lines "$numbered")
        log "  removed $((before - after)) duplicate pairs"
    fi
    cut -f2 "$numbered" >"$out_src.tmp" && cut -f3 "$numbered" >"$out_tgt.tmp" || die "cut failed"
    rm -f "$numbered"
    mv "$out_src.tmp" "$out_src"
    mv "$out_tgt.tmp" "$out_tgt"
}

# ---------------------------------------------------------------- test sets

# parse_test_sets LIST KNOWN...: checks a --test-sets value (comma-separated names, each one of KNOWN,
# none twice) and sets TEST_NAMES to it.
parse_test_sets() {
    local list=$1 name seen="," names=()
    shift
    TEST_NAMES=()
    [[ -n $list && $list != *,,* && $list != ,* && $list != *, ]] ||
        die "--test-sets needs comma-separated set names (got '$list'; known: $(IFS=,; echo "$*"))"
    IFS=, read -r -a names <<<"$list"
    for name in "${names[@]}"; do
        [[ " $* " == *" $name "* ]] || die "unknown test set '$name' in --test-sets (known: $(IFS=,; echo "$*"))"
        [[ $seen != *",$name,"* ]] || die "test set '$name' given twice in --test-sets"
        seen+="$name,"
        TEST_NAMES+=("$name")
    done
}

# set_test_splits: the fairseq split of each of TEST_NAMES, as fairseq-preprocess --testpref a,b,...
# names them: test, test1, test2, ...
set_test_splits() {
    local i
    TEST_SPLITS=()
    for i in "${!TEST_NAMES[@]}"; do
        if ((i == 0)); then TEST_SPLITS+=(test); else TEST_SPLITS+=("test$i"); fi
    done
    TEST_KEY="$(IFS=,; echo "${TEST_NAMES[*]}")"
}

# test_step TEXT_FN: the step "test". For each set, TEXT_FN NAME LANG OUT writes that side of the set,
# as text, to OUT = OUT/raw/SPLIT.LANG. Test sets are references: whitespace is normalised, nothing
# is cleaned or dropped.
test_step() {
    local text_fn=$1 raw="$OUT/raw" key="tests=$TEST_KEY|$SRC-$TGT" outs=() i sp name ns nt
    for sp in "${TEST_SPLITS[@]}"; do outs+=("$raw/$sp.$SRC" "$raw/$sp.$TGT"); done
    if step_done test "$key" "${outs[@]}"; then
        log "step test: test sets ${TEST_KEY//,/, } exist in $raw, skipping"
        return 0
    fi
    step_start test
    mkdir -p "$raw"
    rm -f "$raw"/test[0-9]*."$SRC" "$raw"/test[0-9]*."$TGT" # splits of an earlier, longer list
    for i in "${!TEST_NAMES[@]}"; do
        name=${TEST_NAMES[$i]} sp=${TEST_SPLITS[$i]}
        "$text_fn" "$name" "$SRC" "$raw/$sp.$SRC"
        "$text_fn" "$name" "$TGT" "$raw/$sp.$TGT"
        ns=$(count_lines "$raw/$sp.$SRC") nt=$(count_lines "$raw/$sp.$TGT")
        ((ns == nt)) || die "test set $name: the $SRC side has $ns lines but the $TGT side has $nt"
        ((ns > 0)) || die "test set $name is empty"
        log "step test: $name -> split $sp ($ns pairs, whitespace-normalised, not cleaned)"
    done
    step_mark test "$key"
}

# ---------------------------------------------------------------- sentencepiece + fairseq

# common_tail CORPUS: the steps shared by all corpora, from OUT/raw/* on (train, valid and the
# TEST_SPLITS): sentencepiece training and encoding, fairseq-preprocess, prep.json.
common_tail() {
    local corpus=$1 raw="$OUT/raw" spm_dir="$OUT/spm" enc="$OUT/spm-encoded" bin="$OUT/data-bin"
    local key_spm="$KEY_RAW|vocab=$VOCAB_SIZE|coverage=$CHAR_COVERAGE|spm_sentences=$SPM_SENTENCES"
    local key_enc="$key_spm|tests=$TEST_KEY" sp l splits=(train valid "${TEST_SPLITS[@]}")

    # --- sentencepiece model
    if step_done spm "$key_spm" "$spm_dir/spm.model" "$spm_dir/spm.vocab"; then
        log "step spm: $spm_dir/spm.model exists, skipping"
    else
        step_start spm
        log "step spm: training a joint sentencepiece model (vocab $VOCAB_SIZE) on $raw/train.$SRC + $raw/train.$TGT"
        mkdir -p "$spm_dir"
        rm -f "$spm_dir/spm.model" "$spm_dir/spm.vocab"
        "$PY" "$DATA_PREP_DIR/spm_train.py" --input "$raw/train.$SRC" "$raw/train.$TGT" \
            --model-prefix "$spm_dir/spm" --vocab-size "$VOCAB_SIZE" --character-coverage "$CHAR_COVERAGE" \
            --input-sentence-size "$SPM_SENTENCES" --threads "$WORKERS" 2>"$spm_dir/spm_train.log" || {
            tail -n 20 "$spm_dir/spm_train.log" >&2
            die "sentencepiece training failed (log: $spm_dir/spm_train.log)"
        }
        [[ -f $spm_dir/spm.model && -f $spm_dir/spm.vocab ]] || die "sentencepiece wrote no model"
        log "step spm: wrote $spm_dir/spm.model ($(count_lines "$spm_dir/spm.vocab") pieces)"
        step_mark spm "$key_spm"
    fi

    # --- encoding
    local enc_out=() ins=() outs=()
    for sp in "${splits[@]}"; do for l in "$SRC" "$TGT"; do
        ins+=("$raw/$sp.$l")
        outs+=("$enc/$sp.$l")
    done; done
    if step_done encode "$key_enc" "${outs[@]}"; then
        log "step encode: $enc exists, skipping"
    else
        step_start encode
        log "step encode: encoding ${splits[*]} with $spm_dir/spm.model into $enc"
        mkdir -p "$enc"
        rm -f "$enc"/test[0-9]*."$SRC" "$enc"/test[0-9]*."$TGT"
        "$PY" "$DATA_PREP_DIR/spm_encode.py" --model "$spm_dir/spm.model" --inputs "${ins[@]}" \
            --outputs "${outs[@]}" --threads "$WORKERS" || die "sentencepiece encoding failed"
        step_mark encode "$key_enc"
    fi

    # --- fairseq-preprocess: the test sets become test, test1, ... (--testpref a,b,...)
    local bin_out=("$bin/dict.$SRC.txt" "$bin/dict.$TGT.txt" "$bin/train.$SRC-$TGT.$SRC.bin" "$bin/valid.$SRC-$TGT.$TGT.bin")
    local testpref=()
    for sp in "${TEST_SPLITS[@]}"; do
        bin_out+=("$bin/$sp.$SRC-$TGT.$TGT.idx")
        testpref+=("$enc/$sp")
    done
    if step_done binarize "$key_enc" "${bin_out[@]}"; then
        log "step binarize: $bin exists, skipping"
    else
        step_start binarize
        log "step binarize: $FSQ_PREPROCESS --source-lang $SRC --target-lang $TGT --joined-dictionary -> $bin"
        rm -rf "$bin"
        "$FSQ_PREPROCESS" --source-lang "$SRC" --target-lang "$TGT" \
            --trainpref "$enc/train" --validpref "$enc/valid" --testpref "$(IFS=,; echo "${testpref[*]}")" \
            --destdir "$bin" --joined-dictionary --workers "$WORKERS" >"$OUT/preprocess.log" 2>&1 || {
            tail -n 20 "$OUT/preprocess.log" >&2
            die "fairseq-preprocess failed (log: $OUT/preprocess.log)"
        }
        log "step binarize: wrote $bin (dictionary of $(count_lines "$bin/dict.$SRC.txt") entries)"
        step_mark binarize "$key_enc"
    fi

    # --- prep.json (cheap: always rewritten); the test sets as SPLIT=NAME=PAIRS arguments
    local tests=() i
    for i in "${!TEST_SPLITS[@]}"; do
        tests+=("${TEST_SPLITS[$i]}=${TEST_NAMES[$i]}=$(count_lines "$raw/${TEST_SPLITS[$i]}.$SRC")")
    done
    "$PY" - "$OUT/prep.json" "$SRC" "$TGT" "$corpus" "$VOCAB_SIZE" "${SUBSET:-0}" \
        "$(count_lines "$raw/train.$SRC")" "$(count_lines "$raw/valid.$SRC")" "$(count_lines "$raw/test.$SRC")" \
        "$MAX_LEN" "$MIN_LEN" "$RATIO" "${PAIR:-$SRC-$TGT}" "${tests[@]}" <<'PYEOF' || die "could not write prep.json"
import json, sys
path, src, tgt, corpus, vocab, subset, ntrain, nvalid, ntest, max_len, min_len, ratio, pair = sys.argv[1:14]
tests = [arg.split("=") for arg in sys.argv[14:]]
info = {
    "src": src, "tgt": tgt, "corpus": corpus, "vocab_size": int(vocab),
    "subset": int(subset) or None, "train_pairs": int(ntrain),
    "valid_pairs": int(nvalid), "test_pairs": int(ntest), "pair": pair,
    "clean": {"max_len": int(max_len), "min_len": int(min_len), "ratio": float(ratio)},
    # fairseq split -> test set, and each set's size; split "test" is the first set
    "test_sets": {split: name for split, name, _ in tests},
    "test_set_pairs": {name: int(n) for _, name, n in tests},
}
with open(path + ".tmp", "w") as f:
    json.dump(info, f, indent=2)
    f.write("\n")
import os
os.replace(path + ".tmp", path)
PYEOF
    log "wrote $OUT/prep.json"
    log "done: $OUT (train $(count_lines "$raw/train.$SRC") / valid $(count_lines "$raw/valid.$SRC") pairs; test sets: ${TEST_KEY//,/, })"
}

# validate_common_options: checks the options every recipe shares.
validate_common_options() {
    [[ -n ${OUT:-} ]] || die "--out DIR is required"
    is_positive_int "$VOCAB_SIZE" || die "--vocab-size must be a positive integer (got '$VOCAB_SIZE')"
    [[ -z ${SUBSET:-} ]] || is_positive_int "$SUBSET" || die "--subset must be a positive integer (got '$SUBSET')"
    is_positive_int "$WORKERS" || die "--workers must be a positive integer (got '$WORKERS')"
    is_positive_int "$MAX_LEN" || die "--max-len must be a positive integer (got '$MAX_LEN')"
    is_positive_int "$MIN_LEN" || die "--min-len must be a positive integer (got '$MIN_LEN')"
    is_number "$RATIO" || die "--ratio must be a number (got '$RATIO')"
    is_number "$CHAR_COVERAGE" || die "--character-coverage must be a number (got '$CHAR_COVERAGE')"
    is_positive_int "$SPM_SENTENCES" || die "--spm-sentences must be a positive integer (got '$SPM_SENTENCES')"
    mkdir -p "$OUT" || die "cannot create $OUT"
    OUT=$(cd "$OUT" && pwd)
}
