"""The loader of a model's evaluation (``evaluation_batches``): images decoded in DataLoader workers,
shipped as uint8, made float on the device; the scores are those of decoding in the main process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carbseg.class_argmax import class_argmax
from carbseg.data.classes import IGNORE_INDEX
from carbseg.data.datasets import build_dataset
from carbseg.data.synthetic import generate_synthetic_dataset
from carbseg.engine import inference
from carbseg.engine.checkpoint import load_model
from carbseg.engine.evaluate import evaluation_batches
from carbseg.engine.inference import evaluate_checkpoint, images_to_tensor, predict
from carbseg.metrics import ConfusionMatrix, confusion_counts
from test_inference import TinyDataset, _tiny_checkpoint


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Four generated driving scenes as PNG files (decoding happens in the loader)."""
    root = tmp_path_factory.mktemp("scenes")
    generate_synthetic_dataset(root, "val", 4, 48, 96, seed=3, progress=False)
    return build_dataset("synthetic", root, "val")


def _matrix_decoding_in_this_process(dataset, path) -> np.ndarray:
    """What evaluate_checkpoint computed before the loader: each sample read here, sent as float32."""
    loaded = load_model(path)
    confusion = ConfusionMatrix(loaded.classes.num_classes, IGNORE_INDEX)
    for index in range(len(dataset)):
        sample = dataset[index]
        logits = predict(loaded.model.eval(), images_to_tensor([sample.image]), mode=loaded.config.eval.mode,
                         crop_hw=loaded.config.eval.crop_size, stride_hw=loaded.config.eval.stride,
                         num_classes=loaded.classes.num_classes)
        pred = class_argmax(logits).to(torch.uint8).numpy()[0]
        confusion.add_counts(*confusion_counts(pred, sample.mask, loaded.classes.num_classes, IGNORE_INDEX))
    return confusion.matrix


def _random_tiny_checkpoint(tmp_path, dataset):
    from carbseg.config import Config, ModelConfig
    from carbseg.engine.checkpoint import save_model
    from carbseg.models.segmenter import build_segmenter

    cfg = Config(name="loader")
    cfg.model = ModelConfig(backbone="tiny", pretrained="none", classifier="learned", head_channels=16,
                            aspp_dilations=[1, 2])
    torch.manual_seed(0)
    model = build_segmenter(cfg.model, dataset.classes.num_classes, load_pretrained=False)
    return save_model(tmp_path / "model.safetensors", model, cfg, dataset.classes)


@pytest.mark.parametrize("workers", [0, 2])
def test_scores_equal_decoding_in_the_main_process(scenes, tmp_path, workers):
    path = _random_tiny_checkpoint(tmp_path, scenes)
    confusion, stats, samples = evaluate_checkpoint(scenes, path, num_workers=workers, progress=False,
                                                    keep_samples=1)
    expected = _matrix_decoding_in_this_process(scenes, path)
    assert len(np.flatnonzero(expected)) > 1  # not a degenerate matrix
    np.testing.assert_array_equal(confusion.matrix, expected)
    assert [s.id for s in stats] == scenes.ids
    for sample in samples:  # the kept images are the dataset's own, (H, W, 3)
        np.testing.assert_array_equal(sample.image, scenes.load_image(scenes.ids.index(sample.id)))
        assert sample.image.flags["C_CONTIGUOUS"]


def test_workers_give_the_same_matrix_with_batches_of_mixed_sizes(tmp_path):
    path = _tiny_checkpoint(tmp_path)
    dataset = TinyDataset()  # sizes 24x40, 24x40, 32x32
    in_process, stats0, _ = evaluate_checkpoint(dataset, path, batch_size=2, num_workers=0, progress=False)
    workers, stats2, _ = evaluate_checkpoint(dataset, path, batch_size=2, num_workers=2, progress=False)
    np.testing.assert_array_equal(workers.matrix, in_process.matrix)
    np.testing.assert_array_equal(workers.missed, in_process.missed)
    assert [(s.id, s.miou) for s in stats2] == [(s.id, s.miou) for s in stats0]


def test_batches_are_uint8_in_dataset_order_one_size_each():
    dataset = TinyDataset()
    batches = list(evaluation_batches(dataset, batch_size=2, num_workers=2))
    assert [[s.index for s in group] for group, _ in batches] == [[0, 1], [2]]
    for group, images in batches:
        assert images.dtype == torch.uint8 and images.is_contiguous()
        assert images.shape == (len(group), 3, *dataset.images[group[0].index].shape[:2])
        for k, sample in enumerate(group):
            np.testing.assert_array_equal(images[k].permute(1, 2, 0).numpy(), dataset.images[sample.index])
            np.testing.assert_array_equal(sample.mask.numpy(), dataset.masks[sample.index])
            assert sample.id == dataset.ids[sample.index]


def test_the_model_receives_uint8_images(tmp_path, monkeypatch):
    """Float conversion (and normalisation) happens on the device, after the copy."""
    seen = []
    original = inference.predict

    def recording(model, images, **kwargs):
        seen.append(images.dtype)
        return original(model, images, **kwargs)

    monkeypatch.setattr(inference, "predict", recording)
    evaluate_checkpoint(TinyDataset(), _tiny_checkpoint(tmp_path), num_workers=0, progress=False)
    assert seen == [torch.uint8] * 3


def test_config_sets_the_number_of_workers(tmp_path, monkeypatch):
    asked = []
    original = torch.utils.data.DataLoader

    def recording(*args, **kwargs):
        asked.append(kwargs["num_workers"])
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", recording)
    path = _tiny_checkpoint(tmp_path)
    loaded = load_model(path)
    assert loaded.config.eval.num_workers == 2  # the default
    evaluate_checkpoint(TinyDataset(), path, progress=False)
    loaded.config.eval.num_workers = 1
    evaluate_checkpoint(TinyDataset(), loaded, progress=False)
    assert asked == [2, 1]


def test_real_camvid_frames_score_as_decoded_in_the_main_process(camvid_root, tmp_path):
    from carbseg.data.base import Subset

    dataset = Subset(build_dataset("camvid", camvid_root, "val"), [0, 1, 2])  # real 360x480 PNG frames
    path = _random_tiny_checkpoint(tmp_path, dataset)
    confusion, _, _ = evaluate_checkpoint(dataset, path, num_workers=2, progress=False)
    np.testing.assert_array_equal(confusion.matrix, _matrix_decoding_in_this_process(dataset, path))
    assert confusion.num_images == 3
