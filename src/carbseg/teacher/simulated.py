"""The simulated teacher: a research instrument that READS GROUND TRUTH (never a default).

It mimics what makes CLIP pseudo-masks what they are, so that training (GLV, CARB) can be
studied on real images without CLIP weights:

1. **Patch grid of CLIP's size.** A square grid of ``patch_size`` px is laid on the *view it is
   given*; each cell takes the majority ground-truth class among the image's classes, and cells
   are upsampled back (nearest). Objects thinner than about half a cell vanish -- unless the view
   is zoomed (a GLV local patch upscaled by s sees the scene through 16/s-px cells, exactly as a
   finer grid would), which is the effect GLV exploits.
2. **Seeded CLIP-like noise** of strength ``noise`` in [0, 1] (0 = none), at cell level:
   - *confusions* between similar classes (sidewalk<->road, terrain<->vegetation, truck<->car,
     rider<->person, wall<->building, pole<->traffic sign, ...; table by class *names*, only
     towards classes present in the image): each such class, with probability ``noise``, loses
     a blob-shaped fraction of its cells to its partner;
   - *boundary bleeding*: labels spread across class borders by a random number of cells
     (0 .. ceil(4 * noise) steps; each step a cell takes a random neighbour's label with p 0.5);
   - *patch flips*: each cell becomes a random present class with probability 0.1 * noise.

The noise is deterministic: each image's generator is seeded from a hash of its cell labels,
its image labels and ``seed``, so results do not depend on batching or sharding.
"""

from __future__ import annotations

import hashlib
import logging
import math

import torch
import torch.nn.functional as F

from carbseg.data.classes import ClassSet
from carbseg.errors import UserError

log = logging.getLogger(__name__)
IGNORE = 255

#: Pairs of class *names* that CLIP tends to confuse (symmetric); used when both are in the image.
SIMILAR_CLASSES: tuple[tuple[str, str], ...] = (
    ("sidewalk", "road"), ("terrain", "vegetation"), ("truck", "car"), ("bus", "truck"), ("train", "bus"),
    ("rider", "person"), ("wall", "building"), ("fence", "wall"), ("pole", "traffic sign"),
    ("traffic light", "pole"), ("motorcycle", "bicycle"), ("bicyclist", "pedestrian"),
    ("signsymbol", "pole"), ("fence", "building"), ("tree", "building"), ("pickup", "car"), ("van", "car"),
    ("guard rail", "fence"), ("streetlight", "pole"), ("road marking", "road"), ("billboard", "traffic sign"),
    ("ego vehicle", "car"), ("sidewalk", "terrain"),
)

# Noise constants at strength 1 (the `noise` argument scales them); calibrated in docs/teacher.md.
MAX_BLEED_STEPS = 4
BLEED_PROB = 0.5
FLIP_PROB = 0.1
CONFUSION_BLOB_CELLS = 4  # size of the blobs in which a class is confused, in cells


def confusion_partners(classes: ClassSet) -> dict[int, list[int]]:
    """class index -> indices of similar classes in this class set (by name)."""
    partners: dict[int, list[int]] = {i: [] for i in range(classes.num_classes)}
    for a, b in SIMILAR_CLASSES:
        if a in classes.names and b in classes.names:
            ia, ib = classes.names.index(a), classes.names.index(b)
            partners[ia].append(ib)
            partners[ib].append(ia)
    return partners


def cell_majority(gt: torch.Tensor, image_labels: torch.Tensor, num_classes: int, patch_size: int) -> torch.Tensor:
    """(B, H, W) train ids -> (B, gh, gw) majority present class per cell (255 where no present pixel).

    The grid starts at the view's top-left corner; the last row/column of cells may be partial.
    Ties go to the lower class index.
    """
    b, h, w = gt.shape
    gh, gw = math.ceil(h / patch_size), math.ceil(w / patch_size)
    rows = torch.arange(h, device=gt.device) // patch_size
    cols = torch.arange(w, device=gt.device) // patch_size
    cell = rows[:, None] * gw + cols[None, :]  # (H, W) cell index of each pixel
    image = torch.arange(b, device=gt.device).view(b, 1, 1) * (gh * gw)
    ids = gt.long().clamp(max=num_classes)  # ignore (255) -> extra bin num_classes
    bins = (image + cell) * (num_classes + 1) + ids
    counts = torch.bincount(bins.flatten(), minlength=b * gh * gw * (num_classes + 1))
    counts = counts.view(b, gh, gw, num_classes + 1)[..., :num_classes]
    counts = counts.masked_fill(~image_labels.bool().view(b, 1, 1, num_classes), -1)
    best_count, best = counts.max(dim=-1)
    return best.masked_fill(best_count <= 0, IGNORE)


def _image_seed(cells: torch.Tensor, labels: torch.Tensor, seed: int) -> int:
    """A seed from what the teacher sees (the view's cell labels and image labels) and ``seed``."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(cells.to(torch.uint8).cpu().numpy().tobytes())
    digest.update(labels.to(torch.uint8).cpu().numpy().tobytes())
    digest.update(f"{tuple(cells.shape)}|{seed}".encode())
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def add_cell_noise(cells: torch.Tensor, present: torch.Tensor, partners: dict[int, list[int]], noise: float,
                   generator: torch.Generator) -> torch.Tensor:
    """CLIP-like noise on one image's (gh, gw) cell labels; ``present`` is the (C,) bool label vector."""
    if noise <= 0:
        return cells
    gh, gw = cells.shape
    out = cells.clone()
    present_ids = torch.nonzero(present).flatten().tolist()

    # Confusions between similar classes, in blobs (CLIP confuses regions, not isolated patches).
    for c in present_ids:
        choices = [p for p in partners.get(c, []) if present[p]]
        if not choices or torch.rand((), generator=generator).item() >= noise:
            continue
        partner = choices[int(torch.randint(len(choices), (), generator=generator))]
        fraction = torch.rand((), generator=generator).item()
        coarse = torch.rand(1, 1, math.ceil(gh / CONFUSION_BLOB_CELLS) + 1,
                            math.ceil(gw / CONFUSION_BLOB_CELLS) + 1, generator=generator)
        field = F.interpolate(coarse, size=(gh, gw), mode="bilinear", align_corners=False)[0, 0]
        out[(cells == c) & (field < fraction)] = partner

    # Boundary bleeding: labels spread over class borders by a random number of cells.
    steps = int(torch.randint(0, math.ceil(MAX_BLEED_STEPS * noise) + 1, (), generator=generator))
    shifts = ((0, 1), (0, -1), (1, 0), (-1, 0))
    for _ in range(steps):
        padded = F.pad(out[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0].long()
        neighbours = torch.stack([padded[1 + dy: 1 + dy + gh, 1 + dx: 1 + dx + gw] for dy, dx in shifts])
        pick = torch.randint(0, 4, (gh, gw), generator=generator)
        chosen = neighbours.gather(0, pick[None])[0]
        take = (torch.rand(gh, gw, generator=generator) < BLEED_PROB) & (chosen != IGNORE) & (chosen != out)
        out = torch.where(take, chosen, out)

    # Patch-level random flips towards any present class.
    if present_ids:
        flip = (torch.rand(gh, gw, generator=generator) < FLIP_PROB * noise) & (out != IGNORE)
        random_class = torch.tensor(present_ids)[torch.randint(len(present_ids), (gh, gw), generator=generator)]
        out = torch.where(flip, random_class.to(out.device), out)
    return out


class SimulatedTeacher:
    """Implements ``carbseg.teacher.base.Teacher`` from ground truth (a research instrument)."""

    reads_ground_truth = True

    def __init__(self, classes: ClassSet, patch_size: int = 16, noise: float = 0.3, seed: int = 0):
        if patch_size < 1:
            raise UserError(f"teacher.patch_size must be >= 1, got {patch_size}")
        if not 0.0 <= noise <= 1.0:
            raise UserError(f"teacher.noise must be within [0, 1], got {noise}")
        self.classes = classes
        self.num_classes = classes.num_classes
        self.patch_size = patch_size
        self.noise = noise
        self.seed = seed
        self.partners = confusion_partners(classes)
        log.warning("simulated teacher: pseudo-masks are made from the GROUND TRUTH (patch grid %d px, noise %.2f); "
                    "a research instrument, not weak supervision", patch_size, noise)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, image_labels: torch.Tensor, gt: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
        if gt is None:
            raise UserError("the simulated teacher reads ground truth, but no gt was given; "
                            "use --teacher clip for images without masks")
        b, h, w = gt.shape
        labels = image_labels.to(gt.device).bool()
        cells = cell_majority(gt, labels, self.num_classes, self.patch_size)
        noisy = []
        for i in range(b):
            gen = torch.Generator().manual_seed(_image_seed(cells[i], labels[i], self.seed))
            noisy.append(add_cell_noise(cells[i].cpu(), labels[i].cpu(), self.partners, self.noise, gen))
        cells = torch.stack(noisy).to(gt.device)
        ps = self.patch_size
        masks = cells.repeat_interleave(ps, dim=1).repeat_interleave(ps, dim=2)[:, :h, :w]
        if valid is not None:
            masks = masks.masked_fill(~valid.to(gt.device).bool(), IGNORE)
        return masks.long()
