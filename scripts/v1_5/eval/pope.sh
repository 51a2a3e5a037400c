#!/bin/bash
# POPE (COCO adversarial, popular, random): answers and the local scores; the reported number
# is the mean F1 of the three categories.
source "$(dirname "$0")/common.sh"
POPEDIR=$EVAL_DIR/pope
require "$POPEDIR/llava_pope_test.jsonl" "the question file comes with LLaVA's eval.zip (docs/Evaluation.md): extract it to $EVAL_DIR"
require "$POPEDIR/val2014" "COCO val2014 images (http://images.cocodataset.org/zips/val2014.zip) -> $POPEDIR/val2014/"
require "$POPEDIR/coco" "POPE's coco_pope_{adversarial,popular,random}.json at commit e3e39262 (https://github.com/AoiDragon/POPE, output/coco) -> $POPEDIR/coco/"

run_runner "$POPEDIR/answers/$NAME.jsonl" "$POPEDIR/answers/$NAME" llava.eval.model_vqa_loader \
    --question-file "$POPEDIR/llava_pope_test.jsonl" --image-folder "$POPEDIR/val2014"
score pope "$PYTHON" -m llava.eval.eval_pope --annotation-dir "$POPEDIR/coco" \
    --question-file "$POPEDIR/llava_pope_test.jsonl" --result-file "$POPEDIR/answers/$NAME.jsonl"
