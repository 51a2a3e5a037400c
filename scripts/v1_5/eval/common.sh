# Shared settings and helpers of the benchmark scripts; sourced by each, run from the repo root.
#
# Environment (all optional):
#   MODEL_PATH       checkpoint (default ./liuhaotian/llava-next-7b; SAMPLE=1: the tiny checkpoint)
#   CKPT             model name in answer files (default: the checkpoint directory's name)
#   RETENTION_RATIO  GlobalCom2's R in (0, 1], 1 = vanilla (default: llava_arch.retention_ratio)
#   TOKEN_LAYOUT     official | spatial (default: llava_arch.token_layout)
#   CONV_MODE        chat template (default vicuna_v1)
#   CUDA_VISIBLE_DEVICES  one runner process per listed GPU, each on its chunk (default 0)
#   EVAL_DIR         data root (default ./playground/data/eval; SAMPLE=1: ./playground/sample/eval)
#   SAMPLE=1         run on the built-in synthetic sample suite (built if missing)
#   RUNNER_ARGS      more runner arguments (SAMPLE=1 default: --max_new_tokens 8)
set -euo pipefail

if [ "${SAMPLE:-0}" = "1" ]; then
    EVAL_DIR=${EVAL_DIR:-./playground/sample/eval}
    MODEL_PATH=${MODEL_PATH:-./checkpoints/llava-next-tiny}
    RUNNER_ARGS=${RUNNER_ARGS:---max_new_tokens 8}
    python -m llava.eval.sample_suite --out "$EVAL_DIR" --if-missing
    [ -f "$MODEL_PATH/config.json" ] || python -m llava.tiny --out "$MODEL_PATH"
else
    EVAL_DIR=${EVAL_DIR:-./playground/data/eval}
    MODEL_PATH=${MODEL_PATH:-./liuhaotian/llava-next-7b}
    RUNNER_ARGS=${RUNNER_ARGS:-}
fi
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
CONV_MODE=${CONV_MODE:-vicuna_v1}
if [ -z "${RETENTION_RATIO:-}" ] || [ -z "${TOKEN_LAYOUT:-}" ]; then
    read -r DEFAULT_RATIO DEFAULT_LAYOUT < <(python -c \
        "from llava.model import llava_arch as a; print(a.retention_ratio, a.token_layout)")
    RETENTION_RATIO=${RETENTION_RATIO:-$DEFAULT_RATIO}
    TOKEN_LAYOUT=${TOKEN_LAYOUT:-$DEFAULT_LAYOUT}
fi
# Runs at different ratios or layouts never overwrite each other.
NAME="$CKPT-R$RETENTION_RATIO"
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
run_runner() {
    local output=$1 chunk_dir=$2 module=$3
    shift 3
    local common=(--model-path "$MODEL_PATH" --temperature 0 --conv-mode "$CONV_MODE"
                  --retention-ratio "$RETENTION_RATIO" --token-layout "$TOKEN_LAYOUT")
    mkdir -p "$(dirname "$output")"
    if [ "$CHUNKS" -eq 1 ]; then
        # shellcheck disable=SC2086  # RUNNER_ARGS is a list of words
        python -m "$module" "$@" "${common[@]}" --answers-file "$output" $RUNNER_ARGS
        return
    fi
    mkdir -p "$chunk_dir"
    local pids=() idx
    for idx in $(seq 0 $((CHUNKS - 1))); do
        # shellcheck disable=SC2086
        CUDA_VISIBLE_DEVICES=${GPULIST[$idx]} python -m "$module" "$@" "${common[@]}" \
            --answers-file "$chunk_dir/${CHUNKS}_${idx}.jsonl" --num-chunks "$CHUNKS" --chunk-idx "$idx" $RUNNER_ARGS &
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
    # Merged beside the target, then renamed over it: the old file stays whole until the new one is.
    local parts=() merging="$output.merging"
    for idx in $(seq 0 $((CHUNKS - 1))); do
        parts+=("$chunk_dir/${CHUNKS}_${idx}.jsonl")
    done
    cat "${parts[@]}" > "$merging"
    sync "$merging"
    mv -f "$merging" "$output"
}

# score BENCHMARK COMMAND...: run a scorer, show its output and keep it (with the run's settings)
# under $EVAL_DIR/results/BENCHMARK/$NAME.{txt,json} for `python -m llava.eval.summarize`.
score() {
    local benchmark=$1
    shift
    local dir="$EVAL_DIR/results/$benchmark"
    mkdir -p "$dir"
    "$@" | tee "$dir/.$NAME.txt.partial"
    mv -f "$dir/.$NAME.txt.partial" "$dir/$NAME.txt"  # a failed or killed scorer leaves the last score whole
    python -m llava.eval.summarize record --benchmark "$benchmark" --log "$dir/$NAME.txt" --model "$CKPT" \
        --retention-ratio "$RETENTION_RATIO" --token-layout "$TOKEN_LAYOUT" --out "$dir/$NAME.json"
}
