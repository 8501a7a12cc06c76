"""A tiny captioned image set: scikit-learn's 8x8 handwritten digits, upscaled to RGB.

Written as ``<out>/<repeats>_digit/NNN.png`` with a ``NNN.txt`` caption beside each image:
kohya's DreamBooth folder style (``--train_data_dir <out> --caption_extension .txt``).
The diffusers DreamBooth scripts open every file of ``--instance_data_dir`` as an image
and take one ``--instance_prompt``, so write their folder with ``--no-captions``.

    python integrations/recipes/tiny_data.py /tmp/digits --count 8
    python integrations/recipes/tiny_data.py /tmp/digits-images --count 8 --no-captions
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from tiny_models import IMAGE_SIZE  # same folder (run as a script or with it on sys.path)


def write_digit_images(
    out_dir: str | Path,
    count: int = 8,
    repeats: int = 1,
    size: int = IMAGE_SIZE,
    captions: bool = True,
) -> Path:
    """Write ``count`` digit images (and their captions); return the image folder."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = Path(out_dir) / f"{repeats}_digit"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = (digits.images[index] / 16.0 * 255.0).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((size, size), Image.NEAREST)
        image.convert("RGB").save(folder / f"{index:03d}.png")
        if not captions:
            continue
        label = int(digits.target[index])
        (folder / f"{index:03d}.txt").write_text(f"a photo of handwritten digit {label}\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="kohya's folder-name repeat count")
    parser.add_argument("--no-captions", dest="captions", action="store_false")
    args = parser.parse_args(argv)
    folder = write_digit_images(
        args.out_dir, count=args.count, repeats=args.repeats, captions=args.captions
    )
    print(folder)


if __name__ == "__main__":
    main()
