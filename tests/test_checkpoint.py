"""Model checkpoints (safetensors + embedded config) and the safe loading of training states."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from carbseg import __version__
from carbseg.config import Config, ModelConfig, config_to_dict
from carbseg.data.classes import CAMVID
from carbseg.engine.checkpoint import (
    load_model,
    load_training_state,
    read_model_metadata,
    save_model,
    save_training_state,
)
from carbseg.errors import UserError
from carbseg.models.segmenter import build_segmenter


def _config(classifier: str) -> Config:
    cfg = Config(name="ckpt-test")
    cfg.model = ModelConfig(backbone="tiny", pretrained="none", classifier=classifier, head_channels=32,
                            embed_dim=16, aspp_dilations=[1, 2])
    cfg.eval.mode = "slide"
    return cfg


def _model(cfg: Config):
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(CAMVID.num_classes, 16), dim=1) if cfg.model.classifier == "text" else None
    model = build_segmenter(cfg.model, CAMVID.num_classes, class_embeddings=embeddings, load_pretrained=False)
    # Non-default BatchNorm statistics, so a forgotten buffer would show in the outputs.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("classifier", ["learned", "text"])
def test_model_round_trip_restores_weights_config_and_classes(tmp_path, classifier):
    cfg = _config(classifier)
    model = _model(cfg)
    path = save_model(tmp_path / "model.safetensors", model, cfg, CAMVID)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # atomic write: no temporary left behind

    loaded = load_model(path)
    assert loaded.config == cfg and loaded.classes == CAMVID
    assert not loaded.model.training
    original, restored = model.state_dict(), loaded.model.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        torch.testing.assert_close(restored[name], original[name], rtol=0, atol=0)
    images = torch.randint(0, 256, (1, 3, 24, 40)).float()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), model(images), rtol=0, atol=0)


def test_metadata_holds_config_classes_and_version_as_json(tmp_path):
    cfg = _config("learned")
    path = save_model(tmp_path / "m.safetensors", _model(cfg), cfg, CAMVID)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["carbseg.config"]) == config_to_dict(cfg)
    assert json.loads(meta["carbseg.classes"]) == CAMVID.to_dict()
    assert meta["carbseg.version"] == __version__
    assert read_model_metadata(path) == (cfg, CAMVID)


def test_a_pickled_model_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name, save in (("model.pt", lambda p: torch.save({"w": Payload()}, p)),
                       ("legacy.pth", lambda p: torch.save({"w": Payload()}, p, _use_new_zipfile_serialization=False)),
                       ("model.safetensors", lambda p: torch.save(_model(_config("learned")).state_dict(), p))):
        path = tmp_path / name
        save(path)
        with pytest.raises(UserError, match="pickle.*never loads"):
            load_model(path)
    assert not marker.exists()


def test_invalid_or_foreign_safetensors_are_refused_with_the_file_name(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(UserError, match=r"junk\.safetensors: not a valid safetensors file"):
        load_model(junk)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(UserError, match=r"foreign\.safetensors: .*lacks the carbseg metadata"):
        load_model(foreign)

    with pytest.raises(UserError, match=r"missing\.safetensors: checkpoint not found"):
        load_model(tmp_path / "missing.safetensors")


def test_weights_that_do_not_match_the_embedded_config_are_refused(tmp_path):
    cfg = _config("learned")
    model = _model(cfg)
    wrong = _config("learned")
    wrong.model.head_channels = 24  # the config claims another head width than the tensors have
    path = save_model(tmp_path / "m.safetensors", model, wrong, CAMVID)
    with pytest.raises(UserError, match="do not match the model described by its own config"):
        load_model(path)


def test_training_state_round_trip(tmp_path):
    state = {
        "iteration": 1234,
        "optimizer": {"state": {0: {"momentum_buffer": torch.arange(3.0)}}, "param_groups": [{"lr": 0.005}]},
        "carb_queues": {"consistent": [0.5, 0.25], "inconsistent": [1.0]},
        "torch_rng": torch.get_rng_state(),
    }
    path = save_training_state(tmp_path / "train_state.pt", state)
    assert sorted(os.listdir(tmp_path)) == ["train_state.pt"]
    loaded = load_training_state(path)
    assert loaded["iteration"] == 1234 and loaded["carb_queues"] == state["carb_queues"]
    torch.testing.assert_close(loaded["optimizer"]["state"][0]["momentum_buffer"], torch.arange(3.0))
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])


class _TouchMarker:
    """A pickle payload: unpickling it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "plain_pickle"])
def test_training_state_with_a_payload_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "train_state.pt"
    state = {"iteration": 1, "evil": _TouchMarker(marker)}
    if writer == "torch_zip":
        torch.save(state, path)
    elif writer == "torch_legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(UserError, match=r"train_state\.pt: refused to load"):
        load_training_state(path)
    assert not marker.exists()


def test_damaged_or_missing_training_state_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="training state not found"):
        load_training_state(tmp_path / "nope.pt")
    damaged = tmp_path / "damaged.pt"
    torch.save({"iteration": 1}, damaged)
    damaged.write_bytes(damaged.read_bytes()[:40])
    with pytest.raises(UserError, match=r"damaged\.pt"):
        load_training_state(damaged)


def test_a_safetensors_header_length_starting_like_a_pickle_still_loads(tmp_path):
    # The first byte of a safetensors file is the low byte of its header length; 0x80 is also the
    # first byte of a pickle. Grow the (embedded) run name until the header length ends in 0x80.
    cfg = _config("learned")
    model = _model(cfg)
    path = tmp_path / "m.safetensors"
    for length in range(1, 300):
        cfg.name = "n" * length
        save_model(path, model, cfg, CAMVID)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert load_model(path).config.name == cfg.name
