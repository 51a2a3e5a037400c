#!/bin/bash
# LLaVA-Bench (in the wild): answers; with OPENAI_API_KEY and RULE_FILE (LLaVA's
# llava/eval/table/rule.json) also the GPT-4 review and its summary.
source "$(dirname "$0")/common.sh"
BENCHDIR=$EVAL_DIR/llava-bench-in-the-wild
require "$BENCHDIR/questions.jsonl" "the benchmark (https://huggingface.co/datasets/liuhaotian/llava-bench-in-the-wild) -> $BENCHDIR/"
require "$BENCHDIR/images" "its images/ folder (same dataset) -> $BENCHDIR/images/"

run_runner "$BENCHDIR/answers/$NAME.jsonl" "$BENCHDIR/answers/$NAME" llava.eval.model_vqa \
    --question-file "$BENCHDIR/questions.jsonl" --image-folder "$BENCHDIR/images"
if [ -z "${OPENAI_API_KEY:-}" ] || [ -z "${RULE_FILE:-}" ]; then
    echo "answers in $BENCHDIR/answers/$NAME.jsonl; set OPENAI_API_KEY and RULE_FILE to have GPT-4 review them"
    exit 0
fi
mkdir -p "$BENCHDIR/reviews"
"$PYTHON" -m llava.eval.eval_gpt_review_bench --question "$BENCHDIR/questions.jsonl" --context "$BENCHDIR/context.jsonl" \
    --rule "$RULE_FILE" --answer-list "$BENCHDIR/answers_gpt4.jsonl" "$BENCHDIR/answers/$NAME.jsonl" \
    --output "$BENCHDIR/reviews/$NAME.jsonl"
score llavabench "$PYTHON" -m llava.eval.summarize_gpt_review -f "$BENCHDIR/reviews/$NAME.jsonl"
