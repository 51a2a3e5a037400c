#!/bin/bash
# SEED-Bench: answers (chunked over the GPUs), the local accuracy (image accuracy = SEED-IMG) and
# the upload file.
source "$(dirname "$0")/common.sh"
SEEDDIR=$EVAL_DIR/seed_bench
require "$SEEDDIR/llava-seed-bench.jsonl" "the question file comes with LLaVA's eval.zip (docs/Evaluation.md): extract it to $EVAL_DIR"
require "$SEEDDIR/SEED-Bench.json" "SEED-Bench.json (https://huggingface.co/datasets/AILab-CVC/SEED-Bench) -> $SEEDDIR/"
require "$SEEDDIR/SEED-Bench-image" "SEED-Bench-image.zip (same page) -> $SEEDDIR/SEED-Bench-image/"
require "$SEEDDIR/SEED-Bench-video-image" "middle video frames: run eval.zip's seed_bench/extract_video_frames.py -> $SEEDDIR/SEED-Bench-video-image/"

ANSWERS=$SEEDDIR/answers/$NAME
run_runner "$ANSWERS/merge.jsonl" "$ANSWERS" llava.eval.model_vqa_loader \
    --question-file "$SEEDDIR/llava-seed-bench.jsonl" --image-folder "$SEEDDIR"
mkdir -p "$SEEDDIR/answers_upload"
score seed "$PYTHON" scripts/convert_seed_for_submission.py --annotation-file "$SEEDDIR/SEED-Bench.json" \
    --result-file "$ANSWERS/merge.jsonl" --result-upload-file "$SEEDDIR/answers_upload/$NAME.jsonl"
