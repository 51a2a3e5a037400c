# Shared settings and helpers of the benchmark scripts; sourced by each, run from the repo root.
#
# Environment (all optional):
#   MODEL_PATH       checkpoint (default ./liuhaotian/llava-next-7b; SAMPLE=1: the tiny checkpoint)
#   CKPT             model name in answer files (default: the checkpoint directory's name)
#   METHOD           compression method (default: llava_arch.compression_method, globalcom2;
#                    python -m llava.model.compression --list)
#   METHOD_ARGS      its arguments, space-separated key=value pairs (e.g. "alpha=0 allocation=uniform")
#   RETENTION_RATIO  R in (0, 1], the fraction of vanilla image tokens kept; 1 = vanilla
#                    (default: llava_arch.retention_ratio)
#   VISUAL_TOKENS    instead of a ratio: image tokens kept per image
#   TOKEN_LAYOUT     official | spatial (default: llava_arch.token_layout)
#   TOWER_NUMERICS   sdpa | released (default sdpa): 'released' runs the CLIP attention with the released
#                    GlobalCom2 code's rounding (bit for bit in fp16, slower); CKPT gets "-released" appended
#   PYTHON           the interpreter (default: .venv/bin/python when the install script made it, else python)
#   CONV_MODE        chat template (default: the checkpoint family's own where it has one -- qwen_1_5 for
#                    LLaVA-OneVision -- else vicuna_v1; the runner reads the family from config.json)
#   CUDA_VISIBLE_DEVICES  one runner process per listed GPU, each on its chunk (default 0)
#   EVAL_DIR         data root (default ./playground/data/eval; SAMPLE=1: ./playground/sample/eval)
#   SAMPLE=1         run on the built-in synthetic sample suite (built if missing)
#   RUNNER_ARGS      more runner arguments (SAMPLE=1 default: --max_new_tokens 8)
#   RETENTION_RATIOS several ratios, comma-separated (e.g. 1,0.5,0.25,0.1), and/or
#   METHODS          several methods, comma-separated: a sweep. One runner process answers every setting
#                    (model loaded, images decoded and the vision tower run once per image and method),
#                    writing each setting's answers file under the name its single run would have; then
#                    each setting is scored as a single run would be (the script runs again per setting,
#                    finding its answers written). METHOD_ARGS then apply to every method.
#   BATCH_SIZE       questions per generate call (default 1; greedy answers are the same at any size)
#   NUM_WORKERS      image-loading worker processes per runner (default: min(4, CPUs - 1) on a GPU, 0 on the CPU)
set -euo pipefail

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

if [ "${SAMPLE:-0}" = "1" ]; then
    EVAL_DIR=${EVAL_DIR:-./playground/sample/eval}
    MODEL_PATH=${MODEL_PATH:-./checkpoints/llava-next-tiny}
    RUNNER_ARGS=${RUNNER_ARGS:---max_new_tokens 8}
    "$PYTHON" -m llava.eval.sample_suite --out "$EVAL_DIR" --if-missing
    [ -f "$MODEL_PATH/config.json" ] || "$PYTHON" -m llava.tiny --out "$MODEL_PATH"
else
    EVAL_DIR=${EVAL_DIR:-./playground/data/eval}
    MODEL_PATH=${MODEL_PATH:-./liuhaotian/llava-next-7b}
    RUNNER_ARGS=${RUNNER_ARGS:-}
fi
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
TOWER_NUMERICS=${TOWER_NUMERICS:-sdpa}
CONV_MODE=${CONV_MODE:-}
if [ -n "$CONV_MODE" ]; then TEMPLATE=(--conv-mode "$CONV_MODE"); else TEMPLATE=(--fallback-conv-mode vicuna_v1); fi
# llava_arch's defaults, read from its source (no torch started)
read -r DEFAULT_RATIO DEFAULT_LAYOUT DEFAULT_METHOD < <("$PYTHON" -m llava.model.defaults)
TOKEN_LAYOUT=${TOKEN_LAYOUT:-$DEFAULT_LAYOUT}
METHOD=${METHOD:-$DEFAULT_METHOD}
METHOD_ARGS=${METHOD_ARGS:-}
VISUAL_TOKENS=${VISUAL_TOKENS:-}
RETENTION_RATIO=${RETENTION_RATIO:-$DEFAULT_RATIO}

# A sweep: the script runs once per setting (methods outer, ratios inner) with SWEEP_FIRST set on the
# first, whose runner answers every setting in one process (run_runner); the others find their answers.
if [ -n "${RETENTION_RATIOS:-}${METHODS:-}" ] && [ -z "${SWEEP_FIRST:-}" ]; then
    if [ -n "$VISUAL_TOKENS" ] && [ -n "${RETENTION_RATIOS:-}" ]; then
        echo "error: give RETENTION_RATIOS or VISUAL_TOKENS, not both" >&2
        exit 2
    fi
    SWEEP_METHODS=${METHODS:-$METHOD}
    SWEEP_RATIOS=${RETENTION_RATIOS:-$RETENTION_RATIO}
    first=1
    for sweep_method in ${SWEEP_METHODS//,/ }; do
        for sweep_ratio in ${SWEEP_RATIOS//,/ }; do
            SWEEP_FIRST=$first SWEEP_METHODS=$SWEEP_METHODS SWEEP_RATIOS=$SWEEP_RATIOS METHODS= RETENTION_RATIOS= \
                METHOD=$sweep_method RETENTION_RATIO=$sweep_ratio bash "$0" "$@"
            first=0
        done
    done
    exit 0
fi

# Released-numerics runs get their own answer files and summary rows (after the sweep, which reruns us).
[ "$TOWER_NUMERICS" = "sdpa" ] || CKPT="$CKPT-$TOWER_NUMERICS"

# The answers-file name part, and the arguments results are recorded under (a method's mode always);
# default GlobalCom2 has neither, so no Python is started for it.
METHOD_NAME="" RECORD_ARGS=""
if [ "$METHOD" != "globalcom2" ] || [ -n "$METHOD_ARGS" ]; then
    # shellcheck disable=SC2086  # METHOD_ARGS is a list of words
    { read -r METHOD_NAME; read -r RECORD_ARGS; } < <("$PYTHON" -m llava.model.compression --record-args \
        --run-name "$METHOD" $METHOD_ARGS)
fi
COMPRESSION=(--method "$METHOD" --token-layout "$TOKEN_LAYOUT" --tower-numerics "$TOWER_NUMERICS")
for pair in $METHOD_ARGS; do
    COMPRESSION+=(--method-arg "$pair")
done
# Runs with different methods, arguments, budgets or layouts never overwrite each other;
# GlobalCom2 with default arguments keeps the names of older runs.
if [ -n "$VISUAL_TOKENS" ]; then
    COMPRESSION+=(--visual-tokens "$VISUAL_TOKENS")
    BUDGET="N$VISUAL_TOKENS"
else
    COMPRESSION+=(--retention-ratio "$RETENTION_RATIO")
    BUDGET="R$RETENTION_RATIO"
fi
NAME="$CKPT${METHOD_NAME:+-$METHOD_NAME}-$BUDGET"
[ "$TOKEN_LAYOUT" = "official" ] || NAME="$NAME-$TOKEN_LAYOUT"

IFS=',' read -ra GPULIST <<< "${CUDA_VISIBLE_DEVICES:-0}"
CHUNKS=${#GPULIST[@]}

# require PATH WHAT: stop with a message saying what to download and where to put it.
require() {
    if [ ! -e "$1" ]; then
        echo "error: missing $1" >&2
        echo "  $2" >&2
        echo "  (see README, 'Evaluation'; SAMPLE=1 runs the built-in sample suite instead)" >&2
        exit 1
    fi
}

# run_runner OUTPUT CHUNK_DIR MODULE ARGS...: answer with one process per GPU, each on its chunk
# (files CHUNK_DIR/<CHUNKS>_<IDX>.jsonl), merged into OUTPUT in question order. Reruns resume.
# OUTPUT is kept in ANSWERS_FILE, whose token accounting score() records.
run_runner() {
    local output=$1 chunk_dir=$2 module=$3
    shift 3
    ANSWERS_FILE=$output
    local compression=("${COMPRESSION[@]}") answers=$output chunks=$chunk_dir
    if [ -n "${SWEEP_FIRST:-}" ]; then
        # A sweep: the first setting's runner answers them all (file names with {run} for each setting's
        # part after "$CKPT-"); the other settings only merge their chunks.
        if [ "$SWEEP_FIRST" = "1" ]; then
            compression=(--methods "$SWEEP_METHODS" --token-layout "$TOKEN_LAYOUT" --tower-numerics "$TOWER_NUMERICS")
            for pair in $METHOD_ARGS; do
                compression+=(--method-arg "$pair")
            done
            if [ -n "$VISUAL_TOKENS" ]; then
                compression+=(--visual-tokens "$VISUAL_TOKENS")
            else
                compression+=(--retention-ratios "$SWEEP_RATIOS")
            fi
            answers=${output//"$NAME"/"$CKPT-{run}"}
            chunks=${chunk_dir//"$NAME"/"$CKPT-{run}"}
        elif [ "$CHUNKS" -eq 1 ]; then
            return
        else
            merge_chunks "$output" "$chunk_dir"
            return
        fi
    fi
    local common=(--model-path "$MODEL_PATH" --temperature 0 "${TEMPLATE[@]}" "${compression[@]}"
                  --batch-size "${BATCH_SIZE:-1}" ${NUM_WORKERS:+--num-workers "$NUM_WORKERS"})
    mkdir -p "$(dirname "$output")"
    if [ "$CHUNKS" -eq 1 ]; then
        # shellcheck disable=SC2086  # RUNNER_ARGS is a list of words
        "$PYTHON" -m "$module" "$@" "${common[@]}" --answers-file "$answers" $RUNNER_ARGS
        return
    fi
    mkdir -p "$chunk_dir"
    local pids=() idx
    for idx in $(seq 0 $((CHUNKS - 1))); do
        # shellcheck disable=SC2086
        CUDA_VISIBLE_DEVICES=${GPULIST[$idx]} "$PYTHON" -m "$module" "$@" "${common[@]}" \
            --answers-file "$chunks/${CHUNKS}_${idx}.jsonl" --num-chunks "$CHUNKS" --chunk-idx "$idx" $RUNNER_ARGS &
        pids+=($!)
    done
    local failed=0 pid
    for pid in "${pids[@]}"; do
        wait "$pid" || failed=1
    done
    if [ "$failed" -ne 0 ]; then
        echo "error: a chunk failed; rerun the script to resume" >&2
        exit 1
    fi
    merge_chunks "$output" "$chunk_dir"
}

# merge_chunks OUTPUT CHUNK_DIR: the chunk files in chunk order, merged beside OUTPUT and then renamed
# over it, so the old file stays whole until the new one is.
merge_chunks() {
    local output=$1 chunk_dir=$2 parts=() merging="$1.merging" idx
    mkdir -p "$(dirname "$output")"
    for idx in $(seq 0 $((CHUNKS - 1))); do
        parts+=("$chunk_dir/${CHUNKS}_${idx}.jsonl")
    done
    cat "${parts[@]}" > "$merging"
    sync "$merging"
    mv -f "$merging" "$output"
}

# score BENCHMARK COMMAND...: run a scorer, show its output and keep it (with the run's settings)
# under $EVAL_DIR/results/BENCHMARK/$NAME.{txt,json} for `$PYTHON -m llava.eval.summarize`, with
# the mean equivalent and post-pruning tokens of the answers run_runner wrote (summarize --table paper).
score() {
    local benchmark=$1
    shift
    local dir="$EVAL_DIR/results/$benchmark"
    local budget=(--retention-ratio "$RETENTION_RATIO")
    [ -z "$VISUAL_TOKENS" ] || budget=(--visual-tokens "$VISUAL_TOKENS")
    local answers=()
    [ -z "${ANSWERS_FILE:-}" ] || answers=(--answers "$ANSWERS_FILE")
    mkdir -p "$dir"
    "$@" | tee "$dir/.$NAME.txt.partial"
    mv -f "$dir/.$NAME.txt.partial" "$dir/$NAME.txt"  # a failed or killed scorer leaves the last score whole
    "$PYTHON" -m llava.eval.summarize record --benchmark "$benchmark" --log "$dir/$NAME.txt" --model "$CKPT" \
        --method "$METHOD" --method-args "$RECORD_ARGS" "${budget[@]}" --token-layout "$TOKEN_LAYOUT" \
        "${answers[@]}" --out "$dir/$NAME.json"
}
