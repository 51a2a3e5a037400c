"""The scores GlobalCom2 decides with (its `score` argument: the [CLS] logits by default, a [CLS]-free
score on OneVision's SigLIP), as heatmaps side by side: the thumbnail's, each crop's own (placed on
the crop canvas), and the thumbnail's resized onto the image area as each crop received them; from
a real GlobalCom2 run.

    python tools/attn_visualization.py --image-file images/shapes-800x500.png [--model-path ...]

Writes `<out-dir>/<image>_heatmaps.png` (`<folder>_<image>_heatmaps.png` for images of the same
name, see `llava.visualize.figure_stems`). Other methods, and selection files (`--selection-file`),
hold no such scores: the figure is then left out with a note. The drawing lives in `llava.visualize`.
"""

import sys

from llava.visualize import main

if __name__ == "__main__":
    sys.exit(main(None, ("heatmaps",), __doc__.split("\n\n")[0]))
