"""A tiny captioned image set: scikit-learn's 8x8 handwritten digits, upscaled to RGB.

Written in the layout both script families read: ``<out>/<repeats>_digit/NNN.png`` with
a ``NNN.txt`` caption beside each image (kohya's DreamBooth folder style, caption
extension ``.txt``); diffusers' ``--instance_data_dir`` takes the same folder and ignores
the captions.

    python integrations/recipes/tiny_data.py /tmp/digits --count 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from tiny_models import IMAGE_SIZE  # same folder (run as a script or with it on sys.path)


def write_digit_images(
    out_dir: str | Path, count: int = 8, repeats: int = 1, size: int = IMAGE_SIZE
) -> Path:
    """Write ``count`` digit images with captions; return the image folder."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = Path(out_dir) / f"{repeats}_digit"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = (digits.images[index] / 16.0 * 255.0).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((size, size), Image.NEAREST)
        image.convert("RGB").save(folder / f"{index:03d}.png")
        label = int(digits.target[index])
        (folder / f"{index:03d}.txt").write_text(f"a photo of handwritten digit {label}\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="kohya's folder-name repeat count")
    args = parser.parse_args(argv)
    print(write_digit_images(args.out_dir, count=args.count, repeats=args.repeats))


if __name__ == "__main__":
    main()
