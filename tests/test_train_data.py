import numpy as np
import pytest
import torch

from carbseg.config import DataConfig
from carbseg.data.synthetic import SyntheticScenes
from carbseg.data.transforms import TrainAugmentation
from carbseg.engine.train_data import BatchKey, TrainingSamples, collate
from carbseg.errors import UserError


def _samples(rank=0, world=1, read_gt=True, **kwargs):
    dataset = SyntheticScenes(4, 48, 96, seed=5)
    labels = np.zeros((4, dataset.classes.num_classes), dtype=bool)
    labels[np.arange(4), np.arange(4)] = True  # row n marks class n: tells which image a sample is
    cfg = DataConfig(scale_size=[48, 96], ratio_range=[0.5, 2.0], crop_size=[32, 64])
    return TrainingSamples(dataset, labels, TrainAugmentation(cfg), seed=3, batch_size=2, rank=rank, world=world,
                           read_gt=read_gt, **kwargs)


def test_a_sample_is_a_pure_function_of_its_key():
    a, b = _samples(), _samples()
    key = BatchKey(iteration=5, micro_step=0, slot=1)
    first, again = a[key], b[key]
    for name in ("image", "mask", "valid", "image_labels"):
        assert torch.equal(first[name], again[name])
    assert first["image"].shape == (3, 32, 64) and first["image"].dtype == torch.uint8
    assert first["image_labels"].nonzero().item() == first["index"]  # labels follow the image
    other = a[BatchKey(iteration=6, micro_step=0, slot=1)]
    assert not torch.equal(first["image"], other["image"])  # a new iteration draws anew
    # Padding is ignore in the mask and False in the validity map.
    assert torch.equal(first["mask"][~first["valid"]], torch.full_like(first["mask"][~first["valid"]], 255))


def test_ranks_read_disjoint_shards_and_gt_is_withheld_from_clip():
    first = [_samples(rank=r, world=2)[BatchKey(0, 0, 0)]["index"] for r in range(2)]
    second = [_samples(rank=r, world=2)[BatchKey(0, 0, 1)]["index"] for r in range(2)]
    assert len({*first, *second}) == 4  # 4 images, 2 ranks x 2 slots: one epoch, no overlap
    no_gt = _samples(read_gt=False)[BatchKey(0, 0, 0)]
    assert (no_gt["mask"] == 255).all()  # the CLIP teacher never sees ground truth
    batch = collate([_samples()[BatchKey(0, 0, s)] for s in range(2)])
    assert batch["images"].shape == (2, 3, 32, 64) and batch["image_labels"].dtype == torch.bool


def test_missing_pseudo_masks_are_reported(tmp_path):
    with pytest.raises(UserError, match="4 of 4 pseudo-masks are missing"):
        _samples(pseudo_masks=tmp_path)
