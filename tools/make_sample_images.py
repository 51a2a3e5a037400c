"""Draw the sample images in `images/` (our own, generated; CC0). Deterministic: same files every run.

    python tools/make_sample_images.py [--out images]
"""

from __future__ import annotations

import argparse
import os
import sys

from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a file: make the repository's `llava` importable

from llava.files import atomic_write  # noqa: E402

OUT = os.path.join(REPO, "images")
SAMPLES = [("shapes-800x500.png", (800, 500)), ("shapes-500x900.png", (500, 900))]


def shapes(size: tuple[int, int]) -> Image.Image:
    """Sky, grass, a sun, a house and a tree: simple shapes with clear regions of interest."""
    width, height = size
    image = Image.new("RGB", size, (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, int(height * 0.65), width, height], fill=(70, 160, 70))
    draw.ellipse([int(width * 0.78), int(height * 0.08), int(width * 0.92), int(height * 0.08) + int(width * 0.14)], fill=(250, 215, 60))
    house = [int(width * 0.18), int(height * 0.42), int(width * 0.42), int(height * 0.75)]
    draw.rectangle(house, fill=(200, 60, 50))
    draw.polygon([(house[0] - 15, house[1]), ((house[0] + house[2]) // 2, int(height * 0.25)), (house[2] + 15, house[1])], fill=(110, 60, 40))
    draw.rectangle([int(width * 0.27), int(height * 0.58), int(width * 0.33), int(height * 0.75)], fill=(90, 50, 30))
    draw.rectangle([int(width * 0.63), int(height * 0.45), int(width * 0.66), int(height * 0.72)], fill=(100, 70, 40))
    draw.ellipse([int(width * 0.56), int(height * 0.28), int(width * 0.73), int(height * 0.52)], fill=(40, 120, 40))
    draw.text((int(width * 0.05), int(height * 0.05)), "GlobalCom2", fill=(20, 20, 20))
    return image


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=OUT, help="folder to write the images to (default: the repository's images/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, size in SAMPLES:
        path = os.path.join(args.out, name)
        with atomic_write(path, "wb") as out:
            shapes(size).save(out, format="PNG", optimize=True)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
