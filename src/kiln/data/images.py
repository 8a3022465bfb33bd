"""Image inputs: image folders, path columns, decoding with Pillow, augmentation (kornia).

Images are decoded once into a uint8 array, resized to one size, and normalised with
per-channel mean and std fitted on the training split. Augmentation runs per training
batch on tensors (kornia), never on validation, test or prediction inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from kiln.errors import DataError
from kiln.spec.data import Augment

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FOLDER_IMAGE_COLUMN = "image"


def folder_table(root: str | Path, target: str = "label") -> pd.DataFrame:
    """A table (image path, label) from ``root/<class>/<image>``; sorted, so deterministic."""
    base = Path(root)
    classes = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {base} has no class sub-folders", field="data.source")
    rows = [
        (str(img.resolve()), cls.name)
        for cls in classes
        for img in sorted(cls.iterdir())
        if img.is_file() and img.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not rows:
        raise DataError(f"image folder {base} holds no images", field="data.source")
    return pd.DataFrame(rows, columns=[FOLDER_IMAGE_COLUMN, target])


def list_images(root: str | Path) -> pd.DataFrame:
    """Every image directly or below ``root``, as a one-column table (for prediction)."""
    paths = sorted(
        str(p.resolve())
        for p in Path(root).rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise DataError(f"{root} holds no images", field="input")
    return pd.DataFrame({FOLDER_IMAGE_COLUMN: paths})


def resolve_paths(frame: pd.DataFrame, column: str, base: str | Path) -> pd.DataFrame:
    """Make relative paths in ``column`` relative to ``base`` (the table's folder)."""
    if column not in frame.columns:
        raise DataError(f"input is missing image column {column!r}", field=column)
    root = Path(base)
    out = frame.copy()
    out[column] = [
        str(v) if pd.isna(v) or Path(str(v)).is_absolute() else str(root / str(v))
        for v in frame[column]
    ]
    return out


def probe(path: str, column: str, row: object = 0) -> tuple[tuple[int, int], int]:
    """((height, width), channels) of one image, for defaults."""
    img = _open(path, row, column)
    channels = 1 if img.mode in ("L", "1", "I", "I;16", "F") else 3
    return (img.height, img.width), channels


def decode(paths: pd.Series, size: tuple[int, int], channels: int) -> np.ndarray:
    """Decode and resize every image to uint8 (N, C, H, W); errors name the file and row."""
    from PIL import Image

    h, w = size
    out = np.empty((len(paths), channels, h, w), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    name = str(paths.name)
    for pos, (row, path) in enumerate(paths.items()):  # row: the table's row label
        if pd.isna(path) or str(path).strip() == "":
            raise DataError(f"image column {name!r}, row {row}: no path", field=name)
        img = _open(str(path), row, name).convert(mode)
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        out[pos] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return out


def _open(path: str, row: object, column: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise DataError(
            f"image column {column!r}, row {row}: file not found: {path}", field=column
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(
            f"image column {column!r}, row {row}: {path} is not a readable image ({exc})",
            field=column,
        ) from None
    return img


class PixelSpace(nn.Module):
    """Run ``inner`` on pixels in [0, 1]: kornia's colour ops assume that range, while
    batches arrive normalised with the training split's mean and std."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, inner: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = (x * self.std + self.mean).clamp(0.0, 1.0)
        return (self.inner(pixels) - self.mean) / self.std  # type: ignore[no-any-return]


def augmentation(
    spec: Augment, size: tuple[int, int], channels: int, mean: list[float], std: list[float]
) -> nn.Module:
    """The kornia pipeline for ``spec`` on normalised batches (B, C, H, W)."""
    import kornia.augmentation as aug

    steps: list[Any] = []
    if spec.hflip:
        steps.append(aug.RandomHorizontalFlip())
    if spec.vflip:
        steps.append(aug.RandomVerticalFlip())
    if spec.crop:
        steps.append(aug.RandomResizedCrop(size, scale=(1.0 - spec.crop, 1.0)))
    if spec.rotation:
        steps.append(aug.RandomRotation(degrees=spec.rotation))
    if spec.color_jitter:
        j = spec.color_jitter
        steps.append(
            aug.ColorJitter(brightness=j, contrast=j, saturation=j if channels == 3 else 0)
        )
    if not steps:
        return nn.Identity()
    return PixelSpace(aug.AugmentationSequential(*steps), mean, std)
