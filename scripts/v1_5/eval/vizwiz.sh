#!/bin/bash
# VizWiz test: answers and the EvalAI upload file (scored by the server).
source "$(dirname "$0")/common.sh"
VIZDIR=$EVAL_DIR/vizwiz
require "$VIZDIR/llava_test.jsonl" "the question file comes with LLaVA's eval.zip (docs/Evaluation.md): extract it to $EVAL_DIR"
require "$VIZDIR/test" "VizWiz test images (https://vizwiz.org/tasks-and-datasets/vqa/, test.zip) -> $VIZDIR/test/"

run_runner "$VIZDIR/answers/$NAME.jsonl" "$VIZDIR/answers/$NAME" llava.eval.model_vqa_loader \
    --question-file "$VIZDIR/llava_test.jsonl" --image-folder "$VIZDIR/test"
mkdir -p "$VIZDIR/answers_upload"
"$PYTHON" scripts/convert_vizwiz_for_submission.py --annotation-file "$VIZDIR/llava_test.jsonl" \
    --result-file "$VIZDIR/answers/$NAME.jsonl" --result-upload-file "$VIZDIR/answers_upload/$NAME.json"
echo "upload $VIZDIR/answers_upload/$NAME.json to EvalAI (VizWiz VQA), then record its score:"
echo "  $PYTHON -m llava.eval.summarize record --benchmark vizwiz --model $CKPT --method $METHOD${METHOD_ARGS:+ --method-args \"$METHOD_ARGS\"} $([ -n "$VISUAL_TOKENS" ] && echo "--visual-tokens $VISUAL_TOKENS" || echo "--retention-ratio $RETENTION_RATIO") --token-layout $TOKEN_LAYOUT --score <overall> --out $EVAL_DIR/results/vizwiz/$NAME.json"
