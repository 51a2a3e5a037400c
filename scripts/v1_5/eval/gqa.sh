#!/bin/bash
# GQA testdev-balanced: answers (chunked over the GPUs), conversion, local accuracy.
source "$(dirname "$0")/common.sh"
SPLIT=llava_gqa_testdev_balanced
GQADIR=$EVAL_DIR/gqa
require "$GQADIR/$SPLIT.jsonl" "the question file comes with LLaVA's eval.zip (docs/Evaluation.md): extract it to $EVAL_DIR"
require "$GQADIR/data/images" "GQA images (https://cs.stanford.edu/people/dorarad/gqa/download.html, images.zip) -> $GQADIR/data/images/"
require "$GQADIR/data/testdev_balanced_questions.json" "GQA balanced questions v1.2 (same page, questions1.2.zip) -> $GQADIR/data/"

ANSWERS=$GQADIR/answers/$SPLIT/$NAME
run_runner "$ANSWERS/merge.jsonl" "$ANSWERS" llava.eval.model_vqa_loader \
    --question-file "$GQADIR/$SPLIT.jsonl" --image-folder "$GQADIR/data/images"
"$PYTHON" scripts/convert_gqa_for_eval.py --src "$ANSWERS/merge.jsonl" --dst "$ANSWERS/testdev_balanced_predictions.json"
score gqa "$PYTHON" -m llava.eval.eval_gqa --tier testdev_balanced \
    --questions "$GQADIR/data/testdev_balanced_questions.json" --predictions "$ANSWERS/testdev_balanced_predictions.json"
