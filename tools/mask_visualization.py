"""What a compression method keeps, over the image: the thumbnail's and the crops' kept patches
(dropped ones dimmed, padding striped), and for GlobalCom2 the per-crop ratio chart and a one-page
summary; from a real run of the chosen method, or from a selection file without a model.

    python tools/mask_visualization.py --image-file images/shapes-800x500.png [--retention-ratio 0.1]
        [--method random] [--model-path ./liuhaotian/llava-next-7b] [--out-dir visualizations]
    python tools/mask_visualization.py --selection-file selection.jsonl --image-file images/shapes-800x500.png

Writes `<out-dir>/<image>_{thumbnail_mask,crops_mask,ratios,summary}.png` (`<folder>_<image>_...`
for images of the same name, see `llava.visualize.figure_stems`); a figure the method or the file
has no data for is left out with a note. `--selection-file` takes the lines `--save-selection` of
`run_llava` or a benchmark runner wrote: the images are matched by the paths the lines record, or
given one per line in the file's order. The drawing lives in `llava.visualize`, usable from a
notebook too.
"""

import sys

from llava.visualize import main

if __name__ == "__main__":
    sys.exit(main(None, ("masks", "ratios", "summary"), __doc__.split("\n\n")[0]))
