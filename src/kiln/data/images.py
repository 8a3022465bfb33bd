"""Image inputs: image folders, path columns, decoding with Pillow, augmentation (kornia).

Images are decoded once into a uint8 array, resized to one size, and normalised with
per-channel mean and std fitted on the training split. Augmentation runs per training
batch on tensors (kornia), never on validation, test or prediction inputs.

An image value is a file path or the encoded image's bytes (what a server receives).
On a server a table's paths are confined: given the dataset's ``root``,
:func:`resolve_paths` accepts only relative paths to files inside it, so no job can
read an image elsewhere on the host. Decoding refuses images of more than
:data:`MAX_PIXELS` pixels before their pixels are read.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from kiln.errors import DataError
from kiln.spec.data import Augment

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FOLDER_IMAGE_COLUMN = "image"
MAX_PIXELS = 40_000_000
"""The most pixels (width x height) one image may have; checked before decoding."""


def folder_table(
    root: str | Path, target: str = "label", *, within: str | Path | None = None
) -> pd.DataFrame:
    """A table (image path, label) from ``root/<class>/<image>``; sorted, so deterministic.

    ``within`` (a server's dataset folder): the folder must lie inside it and hold no
    symlinks.
    """
    base = Path(root)
    if within is not None:
        _check_within(base, within)
    classes = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {base} has no class sub-folders", field="data.source")
    if within is not None:
        for entry in [*base.iterdir(), *(f for cls in classes for f in cls.iterdir())]:
            if entry.is_symlink():
                where = entry.relative_to(base).as_posix()
                raise DataError(f"image folder: {where} is a symlink", field="data.source")
    rows = [
        (str(img.resolve()), cls.name)
        for cls in classes
        for img in sorted(cls.iterdir())
        if img.is_file() and img.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not rows:
        raise DataError(f"image folder {base} holds no images", field="data.source")
    return pd.DataFrame(rows, columns=[FOLDER_IMAGE_COLUMN, target])


def list_images(root: str | Path, *, within: str | Path | None = None) -> pd.DataFrame:
    """Every image directly or below ``root``, as a one-column table (for prediction).

    ``within`` (a server's dataset folder): ``root`` must lie inside it; links are skipped.
    """
    if within is not None:
        _check_within(Path(root), within)
    paths = sorted(
        str(p.resolve())
        for p in Path(root).rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and (within is None or not p.is_symlink())
    )
    if not paths:
        raise DataError(f"{root} holds no images", field="input")
    return pd.DataFrame({FOLDER_IMAGE_COLUMN: paths})


def resolve_paths(
    frame: pd.DataFrame, column: str, base: str | Path, *, root: str | Path | None = None
) -> pd.DataFrame:
    """Make relative paths in ``column`` relative to ``base`` (the table's folder).

    With ``root`` (a server's dataset folder) every path must be relative, free of
    ``..``, and name a file inside ``root`` (after following links); anything else is
    a DataError naming the row and the column, and the same whatever lies outside.
    Without it (the local CLI, whose user owns the machine) absolute paths are kept.
    """
    if column not in frame.columns:
        raise DataError(f"input is missing image column {column!r}", field=column)
    folder = Path(base)
    out = frame.copy()
    if root is None:
        out[column] = [
            str(v) if pd.isna(v) or Path(str(v)).is_absolute() else str(folder / str(v))
            for v in frame[column]
        ]
        return out
    top = Path(root).resolve()
    _check_within(folder, top)
    out[column] = [_confined(v, folder, top, row, column) for row, v in frame[column].items()]
    return out


def check_path_columns(frame: pd.DataFrame, root: str | Path) -> list[str]:
    """Check every column of ``frame`` that names images (a value ends in an image
    suffix) as a server's job will: each path inside ``root``. The columns checked."""
    checked = []
    for column in frame.columns:
        values = frame[column]
        if not (values.dtype == object or pd.api.types.is_string_dtype(values)):
            continue
        named = values.map(lambda v: isinstance(v, str) and v.lower().endswith(IMAGE_SUFFIXES))
        if named.any():
            resolve_paths(frame, str(column), root, root=root)
            checked.append(str(column))
    return checked


def _check_within(source: Path, root: str | Path) -> None:
    """A server's data source must be its dataset's copy (same message whatever it is)."""
    if not source.resolve().is_relative_to(Path(root).resolve()):
        raise DataError("the data is not the job's dataset", field="data.source")


def _confined(value: object, folder: Path, top: Path, row: object, column: str) -> str:
    """The checked absolute path of one image of a server's dataset."""
    where = f"image column {column!r}, row {row}"
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: no path", field=column)
    pure = PurePosixPath(value)
    if (
        "\x00" in value
        or "\\" in value
        or pure.is_absolute()
        or value.startswith("~")
        or (len(value) > 1 and value[1] == ":")
        or ".." in pure.parts
        or "://" in value
    ):
        raise DataError(
            f"{where}: {value[:200]!r} is not a path inside the dataset "
            "(use a relative path without '..')",
            field=column,
        )
    candidate = folder.joinpath(*pure.parts)
    resolved = candidate.resolve()
    if candidate.is_symlink() or not resolved.is_relative_to(top):
        raise DataError(f"{where}: {value[:200]!r} is a link; links are refused", field=column)
    if not resolved.is_file():
        raise DataError(f"{where}: {value[:200]!r} is not a file of the dataset", field=column)
    return str(resolved)


def image_bytes(value: object, where: str) -> bytes:
    """An image sent to a server: raw bytes, or base64 text (a ``data:`` URL too)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a base64-encoded image", field=where)
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{where}: not valid base64", field=where) from None
    if not data:
        raise DataError(f"{where}: empty image", field=where)
    return data


def check_image(data: bytes, where: str) -> None:
    """Decode ``data`` fully once (bounded by MAX_PIXELS); DataError naming ``where``."""
    _open(data, None, where, field=where)


def probe(path: str, column: str, row: object = 0) -> tuple[tuple[int, int], int]:
    """((height, width), channels) of one image, for defaults."""
    img = _open(path, row, column)
    channels = 1 if img.mode in ("L", "1", "I", "I;16", "F") else 3
    return (img.height, img.width), channels


def decode(paths: pd.Series, size: tuple[int, int], channels: int) -> np.ndarray:
    """Decode and resize every image (a path, or encoded bytes) to uint8 (N, C, H, W);
    errors name the file and row."""
    from PIL import Image

    h, w = size
    out = np.empty((len(paths), channels, h, w), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    name = str(paths.name)
    for pos, (row, path) in enumerate(paths.items()):  # row: the table's row label
        if isinstance(path, bytes):
            img = _open(path, row, name).convert(mode)
        elif pd.isna(path) or str(path).strip() == "":
            raise DataError(f"image column {name!r}, row {row}: no path", field=name)
        else:
            img = _open(str(path), row, name).convert(mode)
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        out[pos] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return out


def _open(source: str | bytes, row: object, column: str, *, field: str | None = None) -> Any:
    """Open and decode one image; ``row`` None: ``column`` is the whole location."""
    from PIL import Image, UnidentifiedImageError

    field = field or column
    where = column if row is None else f"image column {column!r}, row {row}"
    shown = "the image" if isinstance(source, bytes) else source
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        # the header gives the size: refuse a decompression bomb before decoding it
        if img.width * img.height > MAX_PIXELS:
            raise DataError(
                f"{where}: {img.width}x{img.height} pixels is more than {MAX_PIXELS}",
                field=field,
            )
        img.load()
    except FileNotFoundError:
        raise DataError(f"{where}: file not found: {shown}", field=field) from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: {shown} is not a readable image ({exc})", field=field) from None
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
