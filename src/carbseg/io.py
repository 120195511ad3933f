"""File input/output shared by every stage: robust image reading and atomic writes.

Every output is written to a temporary name in the same folder and renamed into place, so a
killed job never leaves a half-written file behind (reruns skip only complete outputs).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from carbseg.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# Write failures that are the environment's, not a bug: reported as one line (exit 2), never a traceback.
_ENVIRONMENT_WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full; free some space or choose another output folder",
    errno.EDQUOT: "the disk quota is exceeded; free some space or choose another output folder",
    errno.EACCES: "permission denied; choose an output folder you can write to",
    errno.EPERM: "operation not permitted; choose an output folder you can write to",
    errno.EROFS: "the file system is read-only; choose an output folder you can write to",
}


# Paths that are the wrong kind of thing: a file where a folder is needed, or the reverse.
_WRONG_KIND_ERRORS = {
    errno.EEXIST: "a file of that name is in the way; remove it or choose another path",
    errno.ENOTDIR: "part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; give a file name",
}


def environment_error_message(err: OSError) -> str | None:
    """One line for an OSError that is the environment's or the user's (full disk, read-only file
    system, a file where a folder must go), naming the path; None for anything else (a bug)."""
    reason = _ENVIRONMENT_WRITE_ERRORS.get(err.errno) or _WRONG_KIND_ERRORS.get(err.errno)
    if reason is None:
        return None
    where = err.filename if err.filename is not None else "output"
    return f"{where}: cannot write ({reason})"


def write_error(path: str | os.PathLike, err: OSError) -> Exception:
    """What to raise for ``err`` met while writing ``path``: a UserError naming ``path`` when the
    cause is the environment's (a full disk: ``OSError(ENOSPC)`` from ``write`` names no file), else ``err``."""
    if err.filename is None:
        err = OSError(err.errno, err.strerror, str(path))
    message = environment_error_message(err)
    return UserError(message) if message is not None else err


def _file_in_the_way(folder: Path) -> Path | None:
    """The existing file at ``folder`` or at one of its parents, which keeps it from being a folder."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that is an existing file or lies below one."""
    path = Path(path)
    blocker = _file_in_the_way(path)
    if blocker is not None:
        what = "is a file" if blocker == path else f"lies below {blocker}, which is a file"
        raise UserError(f"{option} {path}: {what}, not a folder; choose another {option}")
    return path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _temporary_prefix(name: str) -> str:
    return f".{name}."


def _temporary_suffix(name: str) -> str:
    return ".tmp" + Path(name).suffix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    A full disk or a folder without write permission raises UserError naming ``path`` (the
    temporary file is removed, ``path`` is left as it was).
    """
    path = Path(path)
    tmp_path: Path | None = None
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name (e.g. {path / 'out'}{path.suffix or ''})")
    blocker = _file_in_the_way(path.parent)
    if blocker is not None:
        raise UserError(f"{path}: cannot write: {blocker} is a file, not a folder; choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path.name), suffix=_temporary_suffix(path.name),
                                   dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        # mkstemp creates the file private (0600); give it the permissions of a normally created file.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except BaseException as err:
        if tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
        if isinstance(err, OSError) and err.errno in _ENVIRONMENT_WRITE_ERRORS:
            raise UserError(f"{path}: cannot write ({_ENVIRONMENT_WRITE_ERRORS[err.errno]})") from None
        raise


def remove_stale_temporaries(folder: str | os.PathLike, names) -> int:
    """Delete temporary files that a killed writer (``kill -9``, power loss) left for ``names`` in ``folder``.

    Only the temporaries of the given output names are touched, so processes writing other files
    of the same folder (other ranks' shards) are never disturbed. Returns how many were removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    wanted = {str(n) for n in names}
    removed = 0
    for candidate in folder.glob(".*.tmp*"):
        for name in wanted & _possible_targets(candidate.name):
            if candidate.name.endswith(_temporary_suffix(name)):
                with contextlib.suppress(FileNotFoundError):
                    candidate.unlink()
                    removed += 1
                break
    return removed


def _possible_targets(temporary_name: str) -> set[str]:
    """Output names a temporary ``.<name>.<random>.tmp<suffix>`` may belong to (names may contain dots)."""
    body = temporary_name[1:]
    return {body[:i] for i in range(len(body)) if body[i] == "."}


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_png_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 label map (H, W) or an RGB picture (H, W, 3) as PNG, atomically.

    zlib level 1, not Pillow's 6: on the demo's 256 x 128 scenes it encodes an RGB picture 3x faster
    (2.4 against 7.5 ms) into a file no larger (61 against 66 kB; label maps 1.8 against 1.4 kB), and
    decoding takes the same time."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG", compress_level=1)


# EXIF orientations (tag 0x0112) that a viewer applies before showing the photo; 5..8 swap width and height.
_EXIF_ORIENTATION = 0x0112
_EXIF_SWAPS_SIDES = (5, 6, 7, 8)


def _exif_orientation(img: Image.Image, header_only: bool = False) -> int:
    try:
        if header_only and img.format == "PNG":
            # Pillow's getexif() decodes a whole PNG to look for an eXIf chunk after the pixels (14 ms for
            # a CamVid frame against 0.5 ms for its header); one before them is already in info.
            exif = Image.Exif()
            if img.info.get("exif"):
                exif.load(img.info["exif"])
            return int(exif.get(_EXIF_ORIENTATION, 1))
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except (TypeError, ValueError, OSError, SyntaxError):  # a damaged EXIF block: shown as stored
        return 1


def upright(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation applied (a phone's portrait JPEG is stored
    sideways with a tag saying so). Untouched, without a copy, when there is no such tag."""
    if _exif_orientation(img) in (1, 0):
        return img
    return ImageOps.exif_transpose(img)


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(h, w) of an image as ``read_image`` returns it (EXIF orientation applied), from its header only.

    Raises UserError naming the file when it is missing or unreadable."""
    path = Path(path)
    try:
        with Image.open(path) as img:  # reads the header only: much cheaper than decoding the image
            width, height = img.size
            swapped = _exif_orientation(img, header_only=True) in _EXIF_SWAPS_SIDES
            return (width, height) if swapped else (height, width)
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: cannot read image ({err}); re-download or remove this file") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 RGB (H, W, 3), whatever its mode (gray, RGBA, palette, 16-bit), upright:
    with its EXIF orientation applied, as a viewer shows it (``upright``).

    Raises UserError naming the file when it is missing, unreadable or truncated.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # forces full decoding: truncated files fail here, not later
            img = upright(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                peak = arr.max() if arr.size else 0.0
                # 16-bit images: scale the full 16-bit range down to 8 bits.
                arr = (arr / (65535.0 if peak > 255 else 255.0) * 255.0).clip(0, 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=2)
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: cannot read image ({err}); re-download or remove this file") from None


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel label map as int32 (H, W), without any colour conversion.

    Palette PNGs give their indices, 16-bit PNGs their full values; RGB label files are refused.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGB", "RGBA"):
                raise UserError(
                    f"{path}: label map is {img.mode}, expected a single-channel (index) PNG; "
                    "convert colour-coded masks to class indices first"
                )
            return np.asarray(img).astype(np.int32)
    except FileNotFoundError:
        raise UserError(f"{path}: label file not found") from None
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: cannot read label map ({err}); re-download or remove this file") from None


def safe_child(root: str | os.PathLike, relative: str) -> Path:
    """Join ``relative`` under ``root`` and refuse anything that would escape it (``..``, absolute ids)."""
    root_resolved = Path(root).resolve()
    candidate = (root_resolved / relative).resolve()
    if candidate != root_resolved and root_resolved not in candidate.parents:
        raise UserError(f"refusing to write {relative!r}: it resolves outside the output folder {root}")
    return candidate


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
