#!/bin/bash
# TextVQA val: answers and the local accuracy. TEXTVQA_OCR=1 (default, as upstream LLaVA) shows
# the reference OCR tokens to the model; TEXTVQA_OCR=0 hides them, as GlobalCom2's released
# loader does (answer files then end in -noocr).
source "$(dirname "$0")/common.sh"
TEXTDIR=$EVAL_DIR/textvqa
require "$TEXTDIR/llava_textvqa_val_v051_ocr.jsonl" "the question file comes with LLaVA's eval.zip (docs/Evaluation.md): extract it to $EVAL_DIR"
require "$TEXTDIR/TextVQA_0.5.1_val.json" "TextVQA 0.5.1 val annotations (https://textvqa.org/dataset) -> $TEXTDIR/"
require "$TEXTDIR/train_images" "TextVQA train_val_images.zip (same page) -> $TEXTDIR/train_images/"

OCR_ARGS=()
if [ "${TEXTVQA_OCR:-1}" = "0" ]; then
    OCR_ARGS=(--drop-ocr-tokens)
    NAME=$NAME-noocr
fi
run_runner "$TEXTDIR/answers/$NAME.jsonl" "$TEXTDIR/answers/$NAME" llava.eval.model_vqa_loader \
    --question-file "$TEXTDIR/llava_textvqa_val_v051_ocr.jsonl" --image-folder "$TEXTDIR/train_images" "${OCR_ARGS[@]}"
score textvqa "$PYTHON" -m llava.eval.eval_textvqa --annotation-file "$TEXTDIR/TextVQA_0.5.1_val.json" \
    --result-file "$TEXTDIR/answers/$NAME.jsonl"
