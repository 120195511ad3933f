"""Pictures for humans: colourised label maps, overlays, error maps, grids and legends.

Used by evaluate, predict, the demo and the reports. Everything takes and returns uint8 numpy
arrays (H, W, 3) so that pictures can be composed freely and written with ``save_png``.
Label maps are train ids with ``classes.ignore_index`` (255) as ignore, drawn in black.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from carbseg.data.classes import IGNORE_INDEX, ClassSet
from carbseg.io import write_png_atomic

# error_map colours: correct pixels stay dark so that the red mistakes stand out.
CORRECT_COLOR = (40, 100, 40)
WRONG_COLOR = (255, 0, 0)
IGNORE_COLOR = (0, 0, 0)
GRID_BACKGROUND = 255  # white padding between grid cells
TITLE_COLOR = (0, 0, 0)


def _check_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a (H, W) label map, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"{name} values must fit in 0..255 (train ids, 255 = ignore)")
        mask = mask.astype(np.uint8)
    return mask


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) from a gray (H, W), RGB or RGBA picture."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"pictures must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[..., :3]
    raise ValueError(f"expected a (H, W) or (H, W, 3) picture, got shape {image.shape}")


def colorize(mask: np.ndarray, classes: ClassSet) -> np.ndarray:
    """Label map (H, W) -> palette colours (H, W, 3); ignore and unknown ids are black."""
    mask = _check_mask(mask)
    return classes.palette_array()[mask]


def overlay(image: np.ndarray, mask: np.ndarray, classes: ClassSet, alpha: float = 0.5) -> np.ndarray:
    """Blend the class colours over the picture: ``round((1 - alpha) * image + alpha * colour)``.

    Ignore pixels keep the picture unchanged, so unlabelled regions remain readable.
    """
    image = _as_rgb(image)
    mask = _check_mask(mask)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    colours = classes.palette_array()[mask].astype(np.float64)
    blended = np.rint((1.0 - alpha) * image.astype(np.float64) + alpha * colours)
    out = np.clip(blended, 0, 255).astype(np.uint8)
    ignore = mask == classes.ignore_index
    out[ignore] = image[ignore]
    return out


def error_map(pred: np.ndarray, gt: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Correct pixels dark green, wrong pixels red, pixels without ground truth black."""
    pred = _check_mask(pred, "pred")
    gt = _check_mask(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ in size")
    out = np.empty(gt.shape + (3,), dtype=np.uint8)
    out[...] = WRONG_COLOR
    out[pred == gt] = CORRECT_COLOR
    out[gt == ignore_index] = IGNORE_COLOR
    return out


def _resize_to_height(image: np.ndarray, height: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h == height:
        return image
    width = max(1, round(w * height / h))
    # Enlarging keeps pixels crisp (label maps stay readable); shrinking averages (no aliasing).
    resample = Image.Resampling.NEAREST if height > h else Image.Resampling.BOX
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    """Extent of ``text`` drawn at the origin (fonts may start below y=0, so this is right/bottom)."""
    _, _, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right, bottom


def make_grid(rows: list[list[np.ndarray]], titles: list[str] | None = None, pad: int = 4) -> np.ndarray:
    """Compose pictures into a table: one list per row, white padding of ``pad`` pixels.

    Every picture is resized (aspect kept) to the height of the tallest picture, so a row of an
    image, its prediction and its ground truth lines up even when their sizes differ. Columns are
    as wide as their widest cell; narrower pictures are centred. ``titles`` (one per column) are
    drawn above the first row with PIL's default font.
    """
    if not rows or not any(rows):
        raise ValueError("make_grid needs at least one picture")
    pictures = [[_as_rgb(p) for p in row] for row in rows]
    height = max(p.shape[0] for row in pictures for p in row)
    pictures = [[_resize_to_height(p, height) for p in row] for row in pictures]
    num_cols = max(len(row) for row in pictures)
    col_widths = [max((row[c].shape[1] for row in pictures if c < len(row)), default=0) for c in range(num_cols)]

    font = ImageFont.load_default()
    title_band = 0
    if titles:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        title_band = max(_text_size(probe, t, font)[1] for t in titles) + pad

    grid_h = title_band + len(pictures) * height + (len(pictures) + 1) * pad
    grid_w = sum(col_widths) + (num_cols + 1) * pad
    grid = np.full((grid_h, grid_w, 3), GRID_BACKGROUND, dtype=np.uint8)
    col_x = [pad + sum(col_widths[:c]) + c * pad for c in range(num_cols)]
    for r, row in enumerate(pictures):
        y = pad + title_band + r * (height + pad)
        for c, picture in enumerate(row):
            x = col_x[c] + (col_widths[c] - picture.shape[1]) // 2
            grid[y : y + height, x : x + picture.shape[1]] = picture

    if titles:
        canvas = Image.fromarray(grid)
        draw = ImageDraw.Draw(canvas)
        for c, title in enumerate(titles[:num_cols]):
            text_w, _ = _text_size(draw, title, font)
            x = col_x[c] + max(0, (col_widths[c] - text_w) // 2)
            draw.text((x, pad), title, fill=TITLE_COLOR, font=font)
        grid = np.asarray(canvas).copy()
    return grid


def _font(size: int):
    """PIL's default font at ``size`` pixels (scalable with FreeType, Pillow >= 10.1); the fixed
    bitmap font where it cannot scale (then only the swatches grow)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


# A legend at scale 1 (14 px swatches, 10 px text) suits pictures up to this height; a taller one
# gets a proportionally larger legend, so the legend keeps its share of the picture at any size.
LEGEND_REFERENCE_HEIGHT = 512


def legend_scale(picture_height: int) -> float:
    """How much larger than the base size a legend beside a picture this tall is drawn (at least 1)."""
    return max(1.0, picture_height / LEGEND_REFERENCE_HEIGHT)


def key_panel(entries: list[tuple[tuple[int, int, int], str]], max_height: int | None = None, swatch: int = 14,
              pad: int = 4, scale: float = 1.0) -> np.ndarray:
    """A white panel of colour swatches with their names, one per row; when ``max_height`` is given,
    in as many columns as needed to stay within it (a legend beside a short picture stays short).
    ``scale`` enlarges swatches, padding and text together (a legend beside a large picture)."""
    swatch, pad = max(1, round(swatch * scale)), max(1, round(pad * scale))
    font = _font(round(10 * scale))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_h = swatch + pad
    per_column = max(1, len(entries))
    if max_height is not None:
        per_column = max(1, min(per_column, (max_height - pad) // row_h))
    columns = [entries[i : i + per_column] for i in range(0, len(entries), per_column)] or [[]]
    widths = [pad + swatch + pad + max((_text_size(probe, name, font)[0] for _, name in column), default=0)
              for column in columns]
    width = sum(widths) + pad
    height = pad + max(1, min(per_column, len(entries))) * row_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    outline = max(1, round(scale))
    for c, column in enumerate(columns):
        x = pad + sum(widths[:c])
        for row, (colour, name) in enumerate(column):
            y = pad + row * row_h
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(colour), outline=(0, 0, 0),
                           width=outline)
            _, text_h = _text_size(draw, name, font)
            draw.text((x + pad + swatch, y + (swatch - text_h) // 2 - 1), name, fill=TITLE_COLOR, font=font)
    return np.asarray(canvas).copy()


def legend(classes: ClassSet, present: list[int] | None = None, swatch: int = 14, pad: int = 4,
           max_height: int | None = None, scale: float = 1.0) -> np.ndarray:
    """A white panel listing class colours and names (all classes, or only ``present`` ones)."""
    indices = list(range(classes.num_classes)) if present is None else sorted(set(int(i) for i in present))
    indices = [i for i in indices if 0 <= i < classes.num_classes]
    return key_panel([(tuple(classes.palette[i]), classes.names[i]) for i in indices], max_height=max_height,
                     swatch=swatch, pad=pad, scale=scale)


# What the colours of error_map mean, for a key beside or below the maps.
ERROR_KEY = ((CORRECT_COLOR, "correct"), (WRONG_COLOR, "wrong"), (IGNORE_COLOR, "no ground truth (not scored)"))


def error_key(max_height: int | None = None) -> np.ndarray:
    """The key of error_map's colours."""
    return key_panel(list(ERROR_KEY), max_height=max_height)


def present_classes(*masks: np.ndarray, classes: ClassSet) -> list[int]:
    """Class ids that occur in any of ``masks`` (ignore excluded), ascending."""
    found = set()
    for mask in masks:
        found.update(int(v) for v in np.unique(mask))
    return sorted(i for i in found if 0 <= i < classes.num_classes)


def beside(picture: np.ndarray, panel: np.ndarray, pad: int = 4, even: bool = False) -> np.ndarray:
    """``panel`` to the right of ``picture`` on white, both top-aligned; ``even`` pads the result to
    even width and height (video encoders in yuv420p need both)."""
    picture, panel = _as_rgb(picture), _as_rgb(panel)
    height = max(picture.shape[0], panel.shape[0])
    width = picture.shape[1] + pad + panel.shape[1]
    if even:
        height, width = height + height % 2, width + width % 2
    out = np.full((height, width, 3), GRID_BACKGROUND, dtype=np.uint8)
    out[: picture.shape[0], : picture.shape[1]] = picture
    out[: panel.shape[0], picture.shape[1] + pad : picture.shape[1] + pad + panel.shape[1]] = panel
    return out


def below(picture: np.ndarray, panels: list[np.ndarray], pad: int = 4) -> np.ndarray:
    """``panels`` side by side in a band under ``picture``, on white, left-aligned."""
    picture = _as_rgb(picture)
    panels = [_as_rgb(p) for p in panels]
    band_h = max(p.shape[0] for p in panels)
    band_w = sum(p.shape[1] for p in panels) + pad * (len(panels) - 1)
    out = np.full((picture.shape[0] + band_h, max(picture.shape[1], band_w + pad), 3), GRID_BACKGROUND,
                  dtype=np.uint8)
    out[: picture.shape[0], : picture.shape[1]] = picture
    x = pad
    for p in panels:
        out[picture.shape[0] : picture.shape[0] + p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + pad
    return out


def overlay_with_legend(image: np.ndarray, mask: np.ndarray, classes: ClassSet, alpha: float = 0.5,
                        all_classes: bool = False, even: bool = False) -> np.ndarray:
    """The overlay with a legend of its classes on the right (every class with ``all_classes``, so
    that all frames of a video have one size), never taller than the picture and scaled with it
    (``legend_scale``: a 4000x3000 photo gets a legend as readable as a 480x360 frame's)."""
    picture = overlay(image, mask, classes, alpha=alpha)
    present = None if all_classes else present_classes(mask, classes=classes)
    scale = legend_scale(picture.shape[0])
    key = legend(classes, present, max_height=picture.shape[0], scale=scale)
    return beside(picture, key, pad=round(4 * scale), even=even)


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 picture (H, W, 3) or label map (H, W) as PNG, atomically."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8, got {array.dtype}")
    write_png_atomic(path, array)
