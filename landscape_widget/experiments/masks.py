"""Binary patterns and the ternary mask of multi-point optimisation (Skorokhodov & Burtsev 2019).

A *binary* pattern is a 2D array with 1 where the user drew (black, "good": loss minimised)
and 0 elsewhere. :func:`ternary_mask` turns it into the training mask of PAPERS.md (c)
step 1: +1 good cells, -1 bad cells (loss maximised up to tau) and 0 ignored cells.

The presets mirror the widget's pattern editor: :func:`checkerboard`, :func:`random_mask`,
:func:`random_squares` (the paper's random-mask experiment), :func:`text_mask` and
:func:`image_mask` (PNG import: alpha, or darkness when the image is opaque).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MIN_CELLS, MAX_CELLS = 2, 64


def as_binary(pattern, name: str = "pattern") -> np.ndarray:
    """Check a binary pattern and return it as a ``uint8`` array of 0 and 1.

    Args:
        pattern: A 2D array-like (lists, numpy, torch) of 0/1 or booleans.
        name: How the argument is called in error messages.

    Returns:
        The pattern as a ``(rows, cols)`` ``uint8`` array of 0 (background) and 1 (drawn).

    Raises:
        ValueError: If it is not 2D, has a side outside [2, 64], holds values other than
            0 and 1, or has no cell of either kind.
    """
    if hasattr(pattern, "detach"):
        pattern = pattern.detach().cpu().numpy()
    arr = np.asarray(pattern)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2D array of 0/1 cells, got shape {arr.shape}.")
    h, w = arr.shape
    if not (MIN_CELLS <= h <= MAX_CELLS and MIN_CELLS <= w <= MAX_CELLS):
        raise ValueError(
            f"{name} has shape {arr.shape}; each side must be in [{MIN_CELLS}, {MAX_CELLS}] "
            "cells (resize it, e.g. with image_mask(path, size=32))."
        )
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.number) or not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 (background) and 1 (drawn) cells.")
    return arr.astype(np.uint8)


def ternary_mask(binary) -> np.ndarray:
    """The training mask of MPO: +1 good, -1 bad, 0 ignored (PAPERS.md (c) step 1).

    A cell is ignored when it is background (0) with no drawn cell in its 3x3
    neighbourhood, or drawn (1) with a neighbourhood (truncated at the border) made only
    of drawn cells. Every other drawn cell is good (+1) and every other background cell is
    bad (-1): only the pattern's edges, inside and out, are trained.

    Args:
        binary: 2D 0/1 pattern (1 = drawn).

    Returns:
        ``int8`` array of the same shape with values in {-1, 0, +1}.

    Example:
        >>> int((ternary_mask(checkerboard(8)) == 1).sum())
        32
    """
    m = as_binary(binary, "binary").astype(np.int32)
    h, w = m.shape
    padded = np.pad(m, 1)
    ones = np.pad(np.ones_like(m), 1)
    # 3x3 sums of drawn cells and of real (non-padding) cells around every cell.
    drawn = sum(padded[i:i + h, j:j + w] for i in range(3) for j in range(3))
    cells = sum(ones[i:i + h, j:j + w] for i in range(3) for j in range(3))
    out = np.where(m == 1, 1, -1).astype(np.int8)
    out[(m == 0) & (drawn == 0)] = 0
    out[(m == 1) & (drawn == cells)] = 0
    return out


def checkerboard(rows: int, cols: int | None = None) -> np.ndarray:
    """A checkerboard of single cells, drawn where ``(i + j)`` is even.

    Returns:
        A ``(rows, cols)`` ``uint8`` array, 1 where ``i + j`` is even and 0 elsewhere.

    Raises:
        ValueError: If a side is outside ``[MIN_CELLS, MAX_CELLS]``.

    Example:
        >>> checkerboard(2).tolist()
        [[1, 0], [0, 1]]
    """
    cols = rows if cols is None else cols
    i, j = np.indices((int(rows), int(cols)))
    return as_binary(((i + j) % 2 == 0).astype(np.uint8))


def random_mask(rows: int, cols: int | None = None, p: float = 0.5, seed: int = 0) -> np.ndarray:
    """Every cell drawn independently with probability ``p``."""
    cols = rows if cols is None else cols
    _check_p(p)
    rng = np.random.default_rng(seed)
    return as_binary((rng.random((int(rows), int(cols))) < p).astype(np.uint8))


def random_squares(n: int = 30, p: float = 0.5, seed: int = 0) -> np.ndarray:
    """The paper's random-mask experiment: a ring of ones around a Bernoulli(p) interior.

    Rows and columns 1 and ``n - 2`` are drawn; the interior ``[2, n - 2)`` is filled with
    Bernoulli(``p``) cells; the outermost ring stays empty (PAPERS.md (c) step 1).

    Returns:
        An ``(n, n)`` ``uint8`` array: the ring of ones, the random interior, an empty border.

    Raises:
        ValueError: If ``n < 5`` or ``n > MAX_CELLS``, or ``p`` is not a number in ``[0, 1]``.

    Example:
        >>> m = random_squares(6, p=1.0)
        >>> m[1].tolist(), m[0].tolist()
        ([0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0])
    """
    n = int(n)
    if n < 5:
        raise ValueError(f"random_squares needs n >= 5 (a ring and an interior), got {n}.")
    _check_p(p)
    m = np.zeros((n, n), np.uint8)
    m[1, 1:n - 1] = m[n - 2, 1:n - 1] = m[1:n - 1, 1] = m[1:n - 1, n - 2] = 1
    rng = np.random.default_rng(seed)
    m[2:n - 2, 2:n - 2] = rng.random((n - 4, n - 4)) < p
    return as_binary(m)


def text_mask(text: str, rows: int = 16, cols: int | None = None) -> np.ndarray:
    """A short word rendered to a ``rows x cols`` grid (Pillow's bundled font, centred).

    Args:
        text: One to a few characters.
        rows: Grid height.
        cols: Grid width (default: enough for the text, at most 64).

    Returns:
        A ``(rows, cols)`` ``uint8`` array, 1 where the anti-aliased text, resized to the grid,
        is above 0.5.

    Raises:
        ValueError: If ``text`` is not a non-empty string, or a side of the grid is outside
            ``[MIN_CELLS, MAX_CELLS]``.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string, e.g. text_mask('A', 16).")
    rows = int(rows)
    font = ImageFont.load_default(size=max(8, rows * 4))
    box = font.getbbox(text)
    tw, th = max(1, box[2] - box[0]), max(1, box[3] - box[1])
    if cols is None:
        cols = int(min(MAX_CELLS, max(rows, round(rows * tw / th))))
    img = Image.new("L", (tw + 8, th + 8), 0)
    ImageDraw.Draw(img).text((4 - box[0], 4 - box[1]), text, fill=255, font=font)
    return _fit_to_grid(np.asarray(img, np.float32) / 255.0, rows, int(cols))


def image_mask(image, rows: int = 32, cols: int | None = None,
               threshold: float = 0.5) -> np.ndarray:
    """A binary pattern from an image (a path, PNG bytes, a PIL image or an array).

    Images with transparency are drawn where alpha > ``threshold`` (the paper's icons);
    opaque images where the darkness (1 - luminance) > ``threshold``. The image is resized
    with anti-aliasing to ``rows x cols`` (``cols`` defaults to ``rows``).

    Returns:
        A ``(rows, cols)`` ``uint8`` array, 1 where the resized ink is above ``threshold``.

    Raises:
        ValueError: If an array image is not 2D, or a side of the grid is outside
            ``[MIN_CELLS, MAX_CELLS]``.
    """
    import io

    from PIL import Image

    if isinstance(image, str | Path):
        image = Image.open(image)
    elif isinstance(image, bytes | bytearray):
        image = Image.open(io.BytesIO(image))
    if isinstance(image, Image.Image):
        rgba = np.asarray(image.convert("RGBA"), np.float32) / 255.0
        alpha = rgba[..., 3]
        ink = alpha if alpha.min() < 0.99 else 1.0 - rgba[..., :3].mean(-1)
    else:
        ink = np.asarray(image, np.float32)
        if ink.ndim != 2:
            raise ValueError(f"an image array must be 2D (grey levels in [0, 1]), got {ink.shape}.")
    return _fit_to_grid(ink, int(rows), int(cols if cols is not None else rows), threshold)


def _fit_to_grid(ink: np.ndarray, rows: int, cols: int, threshold: float = 0.5) -> np.ndarray:
    from PIL import Image

    if not (MIN_CELLS <= rows <= MAX_CELLS and MIN_CELLS <= cols <= MAX_CELLS):
        raise ValueError(f"grid {rows}x{cols}: each side must be in [{MIN_CELLS}, {MAX_CELLS}].")
    img = Image.fromarray(np.clip(ink * 255, 0, 255).astype(np.uint8))
    small = np.asarray(img.resize((cols, rows), Image.Resampling.LANCZOS), np.float32) / 255
    return as_binary((small > threshold).astype(np.uint8))


def _check_p(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}.")
