#!/bin/bash
# ScienceQA-IMG: answers and the local accuracy (the IMG accuracy is the reported number).
source "$(dirname "$0")/common.sh"
SQADIR=$EVAL_DIR/scienceqa
require "$SQADIR/llava_test_CQM-A.json" "the question file comes with LLaVA's eval.zip (docs/Evaluation.md): extract it to $EVAL_DIR"
require "$SQADIR/images/test" "ScienceQA test images (https://github.com/lupantech/ScienceQA, data/scienceqa: test.zip) -> $SQADIR/images/test/"
require "$SQADIR/problems.json" "problems.json from ScienceQA's data/scienceqa -> $SQADIR/"
require "$SQADIR/pid_splits.json" "pid_splits.json from ScienceQA's data/scienceqa -> $SQADIR/"

run_runner "$SQADIR/answers/$NAME.jsonl" "$SQADIR/answers/$NAME" llava.eval.model_vqa_science \
    --question-file "$SQADIR/llava_test_CQM-A.json" --image-folder "$SQADIR/images/test" --single-pred-prompt
score sqa "$PYTHON" -m llava.eval.eval_science_qa --base-dir "$SQADIR" --result-file "$SQADIR/answers/$NAME.jsonl" \
    --output-file "$SQADIR/answers/${NAME}_output.jsonl" --output-result "$SQADIR/answers/${NAME}_result.json"
