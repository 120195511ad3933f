"""Training batches whose content is a pure function of (seed, iteration, rank).

Exact resume needs the data order and every augmentation draw to be reproducible from the iteration
alone, not from the state of an iterator. So a batch is addressed by a key (iteration, micro-step,
slot): the key picks the image (through a per-epoch permutation sharded by rank, like a
DistributedSampler reseeded every epoch) and seeds the augmentation's random generator. Resuming at
iteration i simply asks for the keys of iteration i onwards; DataLoader workers compute the same
samples whichever worker gets which key.

What a sample carries depends on the training path of the method:
- dual path (online teacher): ``mask`` is the ground truth when the teacher is the simulated one
  (the only consumer of ground truth in training); otherwise no mask is made at all (CLIP never sees
  GT: an all-ignore map would be augmented, pinned and copied to the GPU for nothing), and the
  views are the ones an all-ignore mask would give;
- single path (``data.pseudo_masks``): ``mask`` is the offline pseudo-mask, augmented jointly with the image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from carbseg.data.base import SegmentationDataset, validate_train_ids
from carbseg.data.decoded_cache import DecodedCache
from carbseg.data.frames import frame_key
from carbseg.errors import UserError
from carbseg.io import read_label_png


@dataclass(frozen=True)
class BatchKey:
    iteration: int
    micro_step: int  # gradient-accumulation step within the iteration
    slot: int  # position within the per-process batch


class SampleOrder:
    """Which dataset index a (rank-local) stream position reads, epoch after epoch.

    Every epoch is a fresh permutation seeded by (seed, epoch), padded by wrapping so that it splits
    evenly over ``world`` processes; process r reads positions r, r + world, ... of it.
    """

    def __init__(self, num_items: int, seed: int, rank: int = 0, world: int = 1):
        if num_items <= 0:
            raise UserError("training set is empty; check data.root and data.train_split")
        self.num_items = num_items
        self.seed = seed
        self.rank = rank
        self.world = world
        self.per_rank = math.ceil(num_items / world)
        self._cache: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            padded = np.resize(perm, self.per_rank * self.world)  # wraps around to even out the shards
            self._cache = (epoch, padded[self.rank :: self.world])
        return self._cache[1]

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.per_rank)
        return int(self._epoch_order(epoch)[offset])

    def epoch(self, position: int) -> int:
        return position // self.per_rank


class TrainingSamples(torch.utils.data.Dataset):
    """Map-style dataset over ``BatchKey``: loads, augments and returns one training sample."""

    def __init__(
        self,
        dataset: SegmentationDataset,
        image_labels: np.ndarray,
        augmentation,
        *,
        seed: int,
        batch_size: int,
        grad_accum: int = 1,
        rank: int = 0,
        world: int = 1,
        read_gt: bool = False,
        pseudo_masks: str | Path | None = None,
        cache_bytes: int = 0,
    ):
        if len(image_labels) != len(dataset):
            raise ValueError("one image-level label vector per training image is required")
        self.dataset = dataset
        self.image_labels = np.asarray(image_labels, dtype=bool)
        self.augmentation = augmentation
        self.seed = seed
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.rank = rank
        self.order = SampleOrder(len(dataset), seed, rank, world)
        self.read_gt = read_gt
        self.pseudo_masks = Path(pseudo_masks) if pseudo_masks else None
        if self.pseudo_masks is not None:
            self._check_pseudo_masks()
        # Decoded (image, mask) per frame, within this process (each DataLoader worker has its own).
        self.decoded = DecodedCache(cache_bytes)

    def _check_pseudo_masks(self) -> None:
        if not self.pseudo_masks.is_dir():
            raise UserError(
                f"{self.pseudo_masks}: pseudo-mask folder not found (data.pseudo_masks); "
                "write it with carbseg pseudo-masks or unset data.pseudo_masks for the online teacher"
            )
        missing = [i for i in self.dataset.ids if not (self.pseudo_masks / f"{i}.png").is_file()]
        if missing:
            raise UserError(
                f"{self.pseudo_masks}: {len(missing)} of {len(self.dataset)} pseudo-masks are missing "
                f"(first: {missing[0]}.png); rerun carbseg pseudo-masks for the {len(missing)} images"
            )

    def stream_position(self, key: BatchKey) -> int:
        return (key.iteration * self.grad_accum + key.micro_step) * self.batch_size + key.slot

    def epoch_of(self, iteration: int) -> int:
        return self.order.epoch(self.stream_position(BatchKey(iteration, 0, 0)))

    def __len__(self) -> int:  # the key space is unbounded; this is one epoch per process
        return self.order.per_rank

    def _load_mask(self, index: int, image: np.ndarray) -> np.ndarray | None:
        if self.pseudo_masks is not None:
            path = self.pseudo_masks / f"{self.dataset.ids[index]}.png"
            mask = read_label_png(path)
            if mask.shape != image.shape[:2]:
                raise UserError(
                    f"{path}: pseudo-mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                    f"{image.shape[1]}x{image.shape[0]}; regenerate the pseudo-masks for this dataset"
                )
            validate_train_ids(mask, self.dataset.classes.num_classes, path, self.dataset.classes.name)
            return mask.astype(np.uint8)
        if self.read_gt:
            mask = self.dataset.load_mask(index, image.shape[:2])
            if mask is None:
                raise UserError(
                    f"{self.dataset.ids[index]}: the simulated teacher needs ground-truth masks, "
                    "but this split has none; use teacher.kind=clip or a split with masks"
                )
            return mask
        return None  # a teacher that reads only pixels: no mask is made at all

    def _decode(self, index: int) -> tuple[np.ndarray, ...]:
        """(image, mask), or (image,) where no mask is read."""
        image = self.dataset.load_image(index)
        mask = self._load_mask(index, image)
        return (image,) if mask is None else (image, mask)

    def __getitem__(self, key: BatchKey) -> dict:
        index = self.order.index(self.stream_position(key))
        image, *mask = self.decoded.get(index, self._decode)
        mask = mask[0] if mask else None
        # Every augmentation draw of this sample comes from its own key (never from a shared stream).
        rng = np.random.default_rng([self.seed, key.iteration, key.micro_step, self.rank, key.slot])
        # Without a mask the augmentation draws the views an all-ignore mask would give.
        image, mask, valid, frame = self.augmentation.with_frame(image, mask, rng)
        # torch.tensor copies: augmentations may hand back read-only views of decoded files.
        sample = {
            "image": torch.tensor(image).permute(2, 0, 1),  # uint8 (3, H, W)
            "valid": torch.tensor(valid, dtype=torch.bool),
            "image_labels": torch.from_numpy(self.image_labels[index].copy()),
            "index": index,
            # Where the view lies in its frame: the simulated teacher's noise persists across views.
            "frame_key": frame_key(self.dataset.ids[index]),
            "frame": torch.tensor(frame, dtype=torch.float64),
        }
        if self.ships_mask:
            sample["mask"] = torch.tensor(mask, dtype=torch.long)
        return sample

    @property
    def ships_mask(self) -> bool:
        """Whether a sample carries its mask: the offline pseudo-mask, or the ground truth for the
        teacher that reads it; an online CLIP teacher reads neither."""
        return self.pseudo_masks is not None or self.read_gt


class IterationKeys(torch.utils.data.Sampler):
    """Batch sampler: for each iteration from ``start`` to ``stop`` and each accumulation step, the keys."""

    def __init__(self, start: int, stop: int, batch_size: int, grad_accum: int = 1):
        self.start, self.stop = start, stop
        self.batch_size, self.grad_accum = batch_size, grad_accum

    def __iter__(self) -> Iterator[list[BatchKey]]:
        for iteration in range(self.start, self.stop):
            for micro in range(self.grad_accum):
                yield [BatchKey(iteration, micro, slot) for slot in range(self.batch_size)]

    def __len__(self) -> int:
        return max(self.stop - self.start, 0) * self.grad_accum


def collate(samples: list[dict]) -> dict:
    batch = {
        "images": torch.stack([s["image"] for s in samples]),  # uint8 (B, 3, H, W)
        "valid": torch.stack([s["valid"] for s in samples]),
        "image_labels": torch.stack([s["image_labels"] for s in samples]),
        "indices": torch.tensor([s["index"] for s in samples]),
        "frame_keys": torch.tensor([s["frame_key"] for s in samples], dtype=torch.int64),
        "frames": torch.stack([s["frame"] for s in samples]),
    }
    if "mask" in samples[0]:  # none in the dual path with a teacher that sees only pixels
        batch["masks"] = torch.stack([s["mask"] for s in samples])
    return batch


def training_loader(samples: TrainingSamples, start: int, stop: int, num_workers: int) -> torch.utils.data.DataLoader:
    """Batches for iterations [start, stop), in order; with workers, each sample is still key-determined."""
    return torch.utils.data.DataLoader(
        samples,
        batch_sampler=IterationKeys(start, stop, samples.batch_size, samples.grad_accum),
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
