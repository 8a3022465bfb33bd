"""Write scikit-learn's bundled digits as an image folder: one sub-folder per class.

    python examples/data/make_images.py [OUT_DIR]      # default: examples/data/digits-images

Each 8x8 digit (grey levels 0-16) becomes a 32x32 greyscale PNG, so the folder looks
like a small real image dataset. Everything is offline; nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(out: Path) -> None:
    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = (pixels / 16.0 * 255.0).astype(np.uint8)
        Image.fromarray(grey, mode="L").resize((32, 32), Image.Resampling.NEAREST).save(
            folder / f"{i:04d}.png"
        )
    print(f"wrote {len(digits.target)} images in {len(set(digits.target))} folders to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "digits-images")
