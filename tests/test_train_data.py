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
    batch = collate([_samples()[BatchKey(0, 0, s)] for s in range(2)])
    assert batch["images"].shape == (2, 3, 32, 64) and batch["image_labels"].dtype == torch.bool
    # The simulated teacher's stream carries the ground truth (classes 0..18, ignore on padding).
    assert batch["masks"].shape == (2, 32, 64) and batch["masks"].dtype == torch.long
    assert ((batch["masks"] != 255) & batch["valid"]).any()
    # A teacher that sees only pixels (CLIP) gets no mask at all: no all-ignore int64 map of the crop
    # is built, pinned or copied to the GPU, and the batch holds everything else.
    no_gt = collate([_samples(read_gt=False)[BatchKey(0, 0, s)] for s in range(2)])
    assert "masks" not in no_gt and set(batch) - set(no_gt) == {"masks"}
    assert no_gt["images"].shape == (2, 3, 32, 64)


def test_missing_pseudo_masks_are_reported(tmp_path):
    with pytest.raises(UserError, match="4 of 4 pseudo-masks are missing"):
        _samples(pseudo_masks=tmp_path)


def test_decoded_frames_are_kept_within_the_budget_and_batches_do_not_change():
    from carbseg.data.decoded_cache import DecodedCache

    plain = _samples()
    cached = _samples(cache_bytes=1 << 30)
    decoded = []
    original_load = cached.dataset.load_image
    cached.dataset.load_image = lambda index: decoded.append(index) or original_load(index)
    keys = [BatchKey(iteration=i, micro_step=0, slot=s) for i in range(8) for s in range(2)]  # 4 epochs of 4 frames
    for key in keys:
        ours, theirs = cached[key], plain[key]
        for name in ("image", "mask", "valid", "image_labels", "frame"):
            assert torch.equal(ours[name], theirs[name]), name
    assert sorted(decoded) == [0, 1, 2, 3]  # each frame decoded once, then read from memory
    frame_bytes = 48 * 96 * 3 + 48 * 96  # uint8 image + mask
    assert len(cached.decoded) == 4 and cached.decoded.used_bytes == 4 * frame_bytes

    small = DecodedCache(2 * frame_bytes + 10)  # room for two frames only
    loads = []
    source = _samples()
    for index in [0, 1, 2, 0, 1, 2]:
        small.get(index, lambda i: loads.append(i) or source._decode(i))
    assert loads == [0, 1, 2, 2] and len(small) == 2 and small.used_bytes == 2 * frame_bytes
    assert len(DecodedCache(0)) == 0 and _samples().decoded.budget_bytes == 0  # 0: decode every time


def test_cached_frames_are_read_only():
    from carbseg.data.decoded_cache import DecodedCache

    cache = DecodedCache(1 << 20)
    image, mask = cache.get(0, lambda i: (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)))
    with pytest.raises(ValueError, match="read-only"):
        image[0, 0, 0] = 1  # an augmentation writing into its input would corrupt every later epoch
