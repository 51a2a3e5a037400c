#!/bin/bash
# VQAv2 test-dev: answers (chunked over the GPUs) and the EvalAI upload file (scored by the server).
source "$(dirname "$0")/common.sh"
SPLIT=llava_vqav2_mscoco_test-dev2015
VQADIR=$EVAL_DIR/vqav2
require "$VQADIR/$SPLIT.jsonl" "the question files come with LLaVA's eval.zip (docs/Evaluation.md): extract it to $EVAL_DIR"
require "$VQADIR/llava_vqav2_mscoco_test2015.jsonl" "the full test list comes with LLaVA's eval.zip too"
require "$VQADIR/test2015" "COCO test2015 images (http://images.cocodataset.org/zips/test2015.zip) -> $VQADIR/test2015/"

ANSWERS=$VQADIR/answers/$SPLIT/$NAME
run_runner "$ANSWERS/merge.jsonl" "$ANSWERS" llava.eval.model_vqa_loader \
    --question-file "$VQADIR/$SPLIT.jsonl" --image-folder "$VQADIR/test2015"
"$PYTHON" scripts/convert_vqav2_for_submission.py --dir "$VQADIR" --ckpt "$NAME" --split "$SPLIT"
echo "upload $VQADIR/answers_upload/$SPLIT/$NAME.json to EvalAI (VQA Challenge, test-dev), then record its score:"
echo "  $PYTHON -m llava.eval.summarize record --benchmark vqav2 --model $CKPT --method $METHOD${METHOD_ARGS:+ --method-args \"$METHOD_ARGS\"} $([ -n "$VISUAL_TOKENS" ] && echo "--visual-tokens $VISUAL_TOKENS" || echo "--retention-ratio $RETENTION_RATIO") --token-layout $TOKEN_LAYOUT --score <overall> --out $EVAL_DIR/results/vqav2/$NAME.json"
