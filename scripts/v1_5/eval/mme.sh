#!/bin/bash
# MME: answers and the official perception / cognition scores (computed locally).
source "$(dirname "$0")/common.sh"
MMEDIR=$EVAL_DIR/MME
require "$MMEDIR/llava_mme.jsonl" "the question file comes with LLaVA's eval.zip (docs/Evaluation.md): extract it to $EVAL_DIR"
require "$MMEDIR/MME_Benchmark_release_version" "the MME benchmark data (https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation) -> $MMEDIR/MME_Benchmark_release_version/"

run_runner "$MMEDIR/answers/$NAME.jsonl" "$MMEDIR/answers/$NAME" llava.eval.model_vqa_loader \
    --question-file "$MMEDIR/llava_mme.jsonl" --image-folder "$MMEDIR/MME_Benchmark_release_version"
score mme "$PYTHON" -m llava.eval.eval_mme --gt-dir "$MMEDIR/MME_Benchmark_release_version" \
    --question-file "$MMEDIR/llava_mme.jsonl" --result-file "$MMEDIR/answers/$NAME.jsonl" \
    --out-dir "$MMEDIR/eval_tool/answers/$NAME"
