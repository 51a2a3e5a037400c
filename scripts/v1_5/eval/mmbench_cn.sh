#!/bin/bash
# MMBench-CN dev: answers (Chinese prompt) and the .xlsx to upload to OpenCompass.
source "$(dirname "$0")/common.sh"
SPLIT=mmbench_dev_cn_20231003
MMBDIR=$EVAL_DIR/mmbench_cn
require "$MMBDIR/$SPLIT.tsv" "MMBench-CN dev (https://download.openmmlab.com/mmclassification/datasets/mmbench/$SPLIT.tsv) -> $MMBDIR/"

run_runner "$MMBDIR/answers/$SPLIT/$NAME.jsonl" "$MMBDIR/answers/$SPLIT/$NAME" llava.eval.model_vqa_mmbench \
    --question-file "$MMBDIR/$SPLIT.tsv" --single-pred-prompt --lang cn
mkdir -p "$MMBDIR/answers_upload/$SPLIT"
"$PYTHON" scripts/convert_mmbench_for_submission.py --annotation-file "$MMBDIR/$SPLIT.tsv" \
    --result-dir "$MMBDIR/answers/$SPLIT" --upload-dir "$MMBDIR/answers_upload/$SPLIT" --experiment "$NAME"
echo "upload $MMBDIR/answers_upload/$SPLIT/$NAME.xlsx to OpenCompass (MMBench-CN), then record its score:"
echo "  $PYTHON -m llava.eval.summarize record --benchmark mmbench_cn --model $CKPT --method $METHOD${METHOD_ARGS:+ --method-args \"$METHOD_ARGS\"} $([ -n "$VISUAL_TOKENS" ] && echo "--visual-tokens $VISUAL_TOKENS" || echo "--retention-ratio $RETENTION_RATIO") --token-layout $TOKEN_LAYOUT --score <overall> --out $EVAL_DIR/results/mmbench_cn/$NAME.json"
