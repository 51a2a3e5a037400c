"""What GlobalCom2 keeps, over the image: the thumbnail's and the crops' kept patches (dropped ones
dimmed, padding striped), the per-crop ratio chart and a one-page summary, from a real run.

    python tools/mask_visualization.py --image-file images/shapes-800x500.png [--retention-ratio 0.1]
        [--model-path ./liuhaotian/llava-next-7b] [--out-dir visualizations]

Writes `<out-dir>/<image>_{thumbnail_mask,crops_mask,ratios,summary}.png` (`<folder>_<image>_...`
for images of the same name, see `llava.visualize.figure_stems`). The drawing lives in
`llava.visualize`, usable from a notebook too.
"""

import sys

from llava.visualize import main

if __name__ == "__main__":
    sys.exit(main(None, ("masks", "ratios", "summary"), __doc__.split("\n\n")[0]))
