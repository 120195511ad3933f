"""CLIP weights: OpenAI TorchScript .pt, open_clip .bin / .safetensors, none, and missing offline."""

from __future__ import annotations

import logging
import time

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from carbseg.errors import MissingWeightsError, UserError
from carbseg.teacher.tiny import TINY_VIT_CONFIG, write_tiny_config
from carbseg.teacher.weights import build_clip_model, load_clip, resolve_weights


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny CLIP with random weights, its JSON config, and its weights in the three file formats."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    model = open_clip.model.CLIP(**TINY_VIT_CONFIG).eval()
    torch.manual_seed(1)
    model_qg = open_clip.model.CLIP(**TINY_VIT_CONFIG, quick_gelu=True).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, folder / "tiny.bin")
    save_file(state, str(folder / "tiny.safetensors"))
    # OpenAI's format: a TorchScript archive whose state_dict() carries the CLIP key names, with
    # QuickGELU activations (the loader infers QuickGELU from the format).
    scripted = torch.jit.script(model_qg)
    scripted.save(str(folder / "tiny_openai.pt"))
    return {"model": model, "model_qg": model_qg, "config": write_tiny_config(folder / "tiny.json"),
            "folder": folder}


def _encode(model, images):
    with torch.no_grad():
        return model.encode_image(images)


@pytest.mark.parametrize("name", ["tiny.bin", "tiny.safetensors"])
def test_open_clip_state_dict_files_round_trip(reference, name):
    loaded, source = load_clip(str(reference["config"]), str(reference["folder"] / name))
    assert source.quick_gelu is False
    images = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(_encode(loaded, images), _encode(reference["model"], images), rtol=0, atol=0)


def test_openai_torchscript_archive_uses_only_its_state_dict(reference):
    loaded, source = load_clip(str(reference["config"]), str(reference["folder"] / "tiny_openai.pt"))
    assert source.quick_gelu is True  # OpenAI archives imply QuickGELU
    images = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(_encode(loaded, images), _encode(reference["model_qg"], images), rtol=0, atol=0)
    assert not isinstance(loaded, torch.jit.ScriptModule)


def test_none_builds_random_model_with_loud_warning(reference, caplog):
    with caplog.at_level(logging.WARNING):
        model, source = load_clip(str(reference["config"]), "none")
    assert source.path is None
    assert "RANDOMLY INITIALISED" in caplog.text and "MEANINGLESS" in caplog.text
    assert model.visual.proj.shape == (64, 32)


def test_missing_tag_offline_is_one_clear_line_quickly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(MissingWeightsError) as err:
        resolve_weights("ViT-B-16", "openai", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "\n" not in message
    assert "ViT-B-16/openai" in message and "--clip-pretrained PATH" in message and "network" in message


def test_bad_tag_missing_file_and_mismatched_weights(reference, tmp_path):
    with pytest.raises(UserError, match="not an open_clip tag"):
        resolve_weights("ViT-B-16", "no_such_tag")
    with pytest.raises(MissingWeightsError, match="not found"):
        resolve_weights("ViT-B-16", str(tmp_path / "missing.pt"))
    source = resolve_weights("ViT-B-32", str(reference["folder"] / "tiny.bin"))
    with pytest.raises(UserError, match="do not fit"):
        build_clip_model(source)


def test_none_is_reproducible_and_leaves_the_global_rng_alone(reference):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, _ = load_clip(str(reference["config"]), "none")
    assert torch.equal(torch.rand(1), expected_next)
    b, _ = load_clip(str(reference["config"]), "none")
    assert torch.equal(a.visual.proj, b.visual.proj)
