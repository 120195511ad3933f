"""Image-level labels: the only supervision of the method (which classes appear in each image).

In the benchmarks they are derived from the ground-truth masks (a class is present when it covers
at least ``min_pixels`` pixels); the masks themselves are never used for training. Stored as JSON:

    {"dataset": NAME, "classes": [class names], "labels": {IMAGE_ID: [class indices, ascending]}}

The authors' release ships them as ``labels.npy``, a pickled dict ``id -> float multi-hot vector``.
Unpickling can run arbitrary code, so :func:`labels_from_npy` uses a restricted unpickler that
only rebuilds numpy arrays and plain containers, and refuses anything else without running it.
Still, only convert files from a source you trust.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from carbseg.console import show_progress
from carbseg.data.base import SegmentationDataset
from carbseg.data.cityscapes import normalize_image_id
from carbseg.data.classes import ClassSet
from carbseg.errors import UserError
from carbseg.io import read_image_size, write_json_atomic


def image_labels_from_mask(mask: np.ndarray, num_classes: int, min_pixels: int = 1) -> list[int]:
    """Ascending indices of the classes covering at least ``min_pixels`` pixels (ignore, 255, never counts)."""
    if min_pixels < 1:
        raise ValueError("min_pixels must be >= 1")
    values = np.asarray(mask).ravel()
    counts = np.bincount(values[values < num_classes].astype(np.int64), minlength=num_classes)
    return np.flatnonzero(counts >= min_pixels).tolist()


def _image_shape(dataset: SegmentationDataset, index: int) -> tuple[int, int]:
    path = dataset.image_path(index)
    if path is None:
        return dataset.load_image(index).shape[:2]
    return read_image_size(path)  # the header only; EXIF-rotated as read_image returns the image


def compute_image_labels(dataset: SegmentationDataset, min_pixels: int = 1,
                         progress: bool = True) -> dict[str, list[int]]:
    """Image-level labels of every image of ``dataset`` from its ground-truth masks."""
    if not dataset.has_masks:
        raise UserError(f"{dataset}: this split has no ground-truth masks, so image-level labels cannot be "
                        "derived; use a split with masks (or --from-npy with the authors' labels.npy)")
    if min_pixels < 1:
        raise UserError(f"--min-pixels {min_pixels}: must be at least 1")
    labels: dict[str, list[int]] = {}
    for index in tqdm(range(len(dataset)), desc="image-level labels", unit="img",
                      disable=not show_progress(progress)):
        mask = dataset.load_mask(index, _image_shape(dataset, index))
        labels[dataset.ids[index]] = image_labels_from_mask(mask, dataset.classes.num_classes, min_pixels)
    return labels


def write_labels_json(path: str | Path, dataset_name: str, classes: ClassSet | Sequence[str],
                      labels: Mapping[str, Sequence[int]]) -> None:
    """Write the labels JSON of the command-line contract, atomically."""
    names = list(classes.names) if isinstance(classes, ClassSet) else [str(n) for n in classes]
    write_json_atomic(path, {
        "dataset": dataset_name,
        "classes": names,
        "labels": {str(i): sorted(int(c) for c in cls) for i, cls in labels.items()},
    })


def read_labels_json(path: str | Path, classes: ClassSet) -> dict[str, list[int]]:
    """Read a labels JSON, refusing one written for another class list; ids are normalised to IMAGE_IDs."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: labels file not found; create it with `carbseg labels`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a labels JSON ({err}); create it with `carbseg labels`") from None
    if not isinstance(data, dict) or not isinstance(data.get("labels"), dict) or not isinstance(
            data.get("classes"), list):
        raise UserError(f"{path}: expected {{\"dataset\", \"classes\", \"labels\"}}; create it with `carbseg labels`")
    if [str(c) for c in data["classes"]] != list(classes.names):
        raise UserError(
            f"{path}: its class list ({len(data['classes'])} classes, dataset {data.get('dataset')!r}) differs "
            f"from the {classes.name} class set ({classes.num_classes} classes); regenerate it with "
            f"`carbseg labels --dataset {classes.name} ...` for this dataset"
        )
    labels: dict[str, list[int]] = {}
    for raw_id, indices in data["labels"].items():
        image_id = normalize_image_id(str(raw_id))
        if image_id in labels:
            raise UserError(f"{path}: image id {image_id!r} appears twice (after removing folders/extensions)")
        if not isinstance(indices, list) or not all(
                isinstance(c, int) and 0 <= c < classes.num_classes for c in indices):
            raise UserError(f"{path}: labels of {raw_id!r} must be class indices 0..{classes.num_classes - 1}, "
                            f"got {indices!r}")
        labels[image_id] = sorted(set(indices))
    return labels


def labels_to_multi_hot(labels_for_ids: Sequence[Sequence[int]], num_classes: int):
    """(N, C) torch.BoolTensor: row n is True at the classes of the n-th label list."""
    import torch

    multi_hot = torch.zeros((len(labels_for_ids), num_classes), dtype=torch.bool)
    for row, indices in enumerate(labels_for_ids):
        if len(indices):
            multi_hot[row, torch.as_tensor(list(indices), dtype=torch.long)] = True
    return multi_hot


# ---------------------------------------------------------------- the authors' labels.npy
def _numpy_global(*names: str):
    """A numpy attribute under its numpy-2 (``numpy._core``) or numpy-1 (``numpy.core``) module path."""
    for module_name in names:
        module_path, _, attr = module_name.rpartition(".")
        try:
            module = __import__(module_path, fromlist=[attr])
            return getattr(module, attr)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {names} exists in this numpy")


def _allowed_globals() -> dict[tuple[str, str], object]:
    reconstruct = ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
    scalar = ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
    frombuffer = ("numpy._core.numeric._frombuffer", "numpy.core.numeric._frombuffer")
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("builtins", "dict"): dict,
        ("builtins", "list"): list,
        ("builtins", "str"): str,
        ("builtins", "float"): float,
    }
    for spellings in (reconstruct, scalar, frombuffer):
        value = _numpy_global(*spellings)
        for spelling in spellings:
            module, _, name = spelling.rpartition(".")
            allowed[(module, name)] = value
    return allowed


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Resolves only numpy array/dtype reconstruction and plain builtins; any other global is refused
    before it can be called (a hostile pickle names e.g. ``os.system`` here)."""

    def __init__(self, file, source: Path):
        super().__init__(file)
        self._allowed = _allowed_globals()
        self._source = source

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UserError(
                f"{self._source}: refusing to load: the pickle asks for {module}.{name}, which a labels file "
                "never needs (it may be malicious); use only labels.npy files from a trusted source"
            ) from None


def _load_npy_restricted(path: Path):
    """``np.load(path, allow_pickle=True).item()`` with the restricted unpickler instead of pickle.load."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    stream = io.BytesIO(raw)
    if raw.startswith(b"\x93NUMPY"):
        try:
            version = np.lib.format.read_magic(stream)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(stream)
        except ValueError as err:
            raise UserError(f"{path}: damaged .npy header ({err})") from None
        if dtype != np.dtype(object) or shape != ():
            raise UserError(f"{path}: holds a {dtype} array of shape {shape}, expected a pickled dict "
                            "(id -> multi-hot vector) as in the authors' labels.npy")
    try:
        obj = _ArrayOnlyUnpickler(stream, path).load()
    except UserError:
        raise
    except Exception as err:  # any unpickling failure is bad input, reported on one line
        raise UserError(f"{path}: cannot unpickle ({type(err).__name__}: {err}); expected the authors' "
                        "labels.npy") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    return obj


def labels_from_npy(path: str | Path, classes: ClassSet) -> dict[str, list[int]]:
    """Convert the authors' ``labels.npy`` (dict id -> float multi-hot vector) into IMAGE_ID -> indices.

    Ids like ``city/frame`` become ``frame``. Only use files from a trusted source (see module notes).
    """
    path = Path(path)
    obj = _load_npy_restricted(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, expected a dict id -> multi-hot vector")
    labels: dict[str, list[int]] = {}
    for raw_id, vector in obj.items():
        image_id = normalize_image_id(str(raw_id))
        values = np.asarray(vector, dtype=np.float64).ravel()
        if values.shape[0] != classes.num_classes:
            raise UserError(f"{path}: vector of {raw_id!r} has {values.shape[0]} entries but the {classes.name} "
                            f"class set has {classes.num_classes}; pick the --dataset the file was made for")
        if image_id in labels:
            raise UserError(f"{path}: image id {image_id!r} appears twice (after removing the city folder)")
        labels[image_id] = np.flatnonzero(values > 0.5).tolist()
    return dict(sorted(labels.items()))
