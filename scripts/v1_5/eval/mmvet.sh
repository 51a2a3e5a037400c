#!/bin/bash
# MM-Vet: answers and the results file for the official GPT-4 grader (scored outside).
source "$(dirname "$0")/common.sh"
VETDIR=$EVAL_DIR/mm-vet
require "$VETDIR/llava-mm-vet.jsonl" "the question file comes with LLaVA's eval.zip (docs/Evaluation.md): extract it to $EVAL_DIR"
require "$VETDIR/images" "MM-Vet images (https://github.com/yuweihao/MM-Vet/releases, mm-vet.zip) -> $VETDIR/images/"

run_runner "$VETDIR/answers/$NAME.jsonl" "$VETDIR/answers/$NAME" llava.eval.model_vqa \
    --question-file "$VETDIR/llava-mm-vet.jsonl" --image-folder "$VETDIR/images"
mkdir -p "$VETDIR/results"
"$PYTHON" scripts/convert_mmvet_for_eval.py --src "$VETDIR/answers/$NAME.jsonl" --dst "$VETDIR/results/$NAME.json"
echo "grade $VETDIR/results/$NAME.json with MM-Vet's GPT-4 grader (https://github.com/yuweihao/MM-Vet), then record its score:"
echo "  $PYTHON -m llava.eval.summarize record --benchmark mmvet --model $CKPT --method $METHOD${METHOD_ARGS:+ --method-args \"$METHOD_ARGS\"} $([ -n "$VISUAL_TOKENS" ] && echo "--visual-tokens $VISUAL_TOKENS" || echo "--retention-ratio $RETENTION_RATIO") --token-layout $TOKEN_LAYOUT --score <total> --out $EVAL_DIR/results/mmvet/$NAME.json"
