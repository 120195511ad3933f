"""Prompt ensemble (85 templates), class-name sets, and the on-disk text-embedding cache."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from carbseg.data.classes import CAMVID, CITYSCAPES, WILDDASH2, ClassSet
from carbseg.errors import UserError
from carbseg.teacher import text_embeddings as te
from carbseg.teacher.prompts import ENSEMBLE_85, templates_from_spec
from carbseg.teacher.tiny import TINY_VIT_CONFIG, write_tiny_config


def test_ensemble_has_85_templates_ending_with_the_scene_ones():
    assert len(ENSEMBLE_85) == 85 and len(set(ENSEMBLE_85)) == 85
    assert ENSEMBLE_85[0] == "a bad photo of a {}."
    assert ENSEMBLE_85[-1] == "this is one {} in the scene."
    assert all(t.count("{}") == 1 for t in ENSEMBLE_85)


def test_paper_class_name_sets():
    renamed = dict(zip(CITYSCAPES.names, CITYSCAPES.text_names))
    assert renamed["vegetation"] == "tree" and renamed["terrain"] == "grass" and renamed["person"] == "pedestrian"
    assert CAMVID.text_names == ("sky", "building", "pole", "road", "sidewalk", "tree", "signsymbol", "fence",
                                 "car", "pedestrian", "bicyclist")
    assert WILDDASH2.num_classes == 25


def test_user_templates_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("# comment\na street photo of a {}.\n\nthe {} ahead.\n")
    assert templates_from_spec(str(path)) == ("a street photo of a {}.", "the {} ahead.")
    path.write_text("no placeholder\n")
    with pytest.raises(UserError, match="exactly one"):
        templates_from_spec(str(path))


def test_embeddings_are_the_normalised_mean_of_normalised_prompts_and_cached(tmp_path, monkeypatch):
    config = write_tiny_config(tmp_path / "tiny.json")
    torch.manual_seed(3)
    model = open_clip.model.CLIP(**TINY_VIT_CONFIG).eval()
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    classes = ClassSet("mine", ("road", "vegetation"), ("road", "tree"), ((0, 0, 0), (1, 1, 1)))
    templates = ("a photo of a {}.", "there is a {} in the scene.")
    emb = te.class_text_embeddings(classes, str(config), str(weights), "cpu", cache_dir=tmp_path / "cache",
                                   templates=templates)
    tok = open_clip.tokenizer.SimpleTokenizer()
    with torch.no_grad():
        rows = []
        for name in ("road", "tree"):  # the text names, not the display names
            e = F.normalize(model.encode_text(tok([t.format(name) for t in templates])), dim=-1)
            rows.append(F.normalize(e.mean(0), dim=-1))
    torch.testing.assert_close(emb, torch.stack(rows), rtol=1e-5, atol=1e-6)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2))
    cached = list((tmp_path / "cache" / "text_embeddings").glob("*.safetensors"))
    assert len(cached) == 1
    # A second call reads the cache and never builds the model.
    monkeypatch.setattr(te, "build_clip_model", lambda *a, **k: pytest.fail("model built despite the cache"))
    again = te.class_text_embeddings(classes, str(config), str(weights), "cpu", cache_dir=tmp_path / "cache",
                                     templates=templates)
    assert torch.equal(again, emb)
    # Other names or templates are another cache entry.
    other = ClassSet("mine", ("road", "vegetation"), ("road", "plant"), ((0, 0, 0), (1, 1, 1)))
    with pytest.raises(pytest.fail.Exception, match="model built despite the cache"):
        te.class_text_embeddings(other, str(config), str(weights), "cpu", cache_dir=tmp_path / "cache",
                                 templates=templates)


def test_default_cache_dir_is_carbseg_cache_or_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CARBSEG_CACHE", str(tmp_path / "elsewhere"))
    assert te.default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("CARBSEG_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert te.default_cache_dir() == tmp_path / ".cache" / "carbseg"


def test_tokenizer_context_length_comes_from_a_json_configs_text_tower(tmp_path):
    config = tmp_path / "short.json"
    config.write_text('{"text_cfg": {"context_length": 32}}')
    assert te.tokenizer_for(str(config)).context_length == 32
    config.write_text("{}")  # no text tower settings: CLIP's 77 tokens
    assert te.tokenizer_for(str(config)).context_length == 77
    named = te.tokenizer_for("ViT-B-16")
    assert torch.equal(named(["a photo of a car."]), open_clip.tokenize(["a photo of a car."]))


class _Source:
    def cache_key(self) -> str:
        return "fake-weights"


def test_class_text_embeddings_plumbing_device_templates_cache_dirs_and_messages(tmp_path, monkeypatch, caplog):
    """The 85-template default, the device and cache folder handed on, and the log lines (fakes for CLIP)."""
    calls = {}

    def resolve(model, pretrained, cache_dir):
        calls["resolve"] = (model, pretrained, cache_dir)
        return _Source()

    def build(source, device):
        calls["build"] = device
        return "model"

    def encode(model, tokenizer, names, templates, device):
        calls["encode"] = (model, tuple(names), templates, device)
        return torch.ones(len(names), 4)

    monkeypatch.setattr(te, "resolve_weights", resolve)
    monkeypatch.setattr(te, "build_clip_model", build)
    monkeypatch.setattr(te, "encode_class_names", encode)
    classes = ClassSet("mine", ("road", "vegetation"), ("road", "tree"), ((0, 0, 0), (1, 1, 1)))
    # Defaults: CPU, the 85-template ensemble, the cache under CARBSEG_CACHE, no cache folder for the weights.
    monkeypatch.setenv("CARBSEG_CACHE", str(tmp_path / "env-cache"))
    emb = te.class_text_embeddings(classes, "ViT-B-16", "openai")
    assert emb.device.type == "cpu" and calls["build"] == "cpu"
    assert calls["encode"] == ("model", ("road", "tree"), ENSEMBLE_85, "cpu")
    assert calls["resolve"] == ("ViT-B-16", "openai", None)
    assert len(list((tmp_path / "env-cache" / "text_embeddings").glob("*.safetensors"))) == 1
    # A cache folder given is the weights' folder too; the device is handed to every step and the result.
    emb = te.class_text_embeddings(classes, "ViT-B-16", "openai", device="meta", cache_dir=tmp_path / "given",
                                   templates=("a {}.",))
    assert calls["resolve"] == ("ViT-B-16", "openai", str(tmp_path / "given"))
    assert calls["build"] == "meta" and calls["encode"][2:] == (("a {}.",), "meta") and emb.device.type == "meta"
    # Read back from the cache, on the device asked for, and said so.
    path = next((tmp_path / "given" / "text_embeddings").glob("*.safetensors"))
    caplog.set_level("INFO", logger=te.log.name)
    cached = te.class_text_embeddings(classes, "ViT-B-16", "openai", device="meta", cache_dir=tmp_path / "given",
                                      templates=("a {}.",))
    assert cached.device.type == "meta"
    assert [r.getMessage() for r in caplog.records] == [f"text embeddings from cache {path}"]
    # A cache that cannot be written costs only time: the embeddings come back, with one warning.
    caplog.clear()

    def read_only(path):
        raise OSError("read-only file system")

    monkeypatch.setattr(te, "atomic_path", read_only)
    emb = te.class_text_embeddings(classes, "ViT-B-16", "openai", cache_dir=tmp_path / "ro", templates=("a {}.",))
    assert torch.equal(emb, torch.ones(2, 4))
    unwritten = te._cache_file(tmp_path / "ro", _Source(), ("road", "tree"), ("a {}.",))
    assert [r.getMessage() for r in caplog.records] == [
        f"could not cache text embeddings at {unwritten}: read-only file system"]


def test_cache_file_name_is_the_documented_key_so_caches_survive_upgrades(tmp_path):
    # sha256 of the JSON {"weights", "names", "templates"}, first 24 hex digits: a cache written by one
    # release is found by the next only while this key stays the same.
    import hashlib
    import json

    blob = json.dumps({"weights": "fake-weights", "names": ["road", "tree"], "templates": ["a {}."]})
    name = hashlib.sha256(blob.encode()).hexdigest()[:24] + ".safetensors"
    path = te._cache_file(tmp_path, _Source(), ("road", "tree"), ("a {}.",))
    assert path == tmp_path / "text_embeddings" / name


def test_encode_class_names_runs_on_the_cpu_by_default_and_on_the_asked_device():
    """The "meta" device stands in for a GPU: tokens left on the CPU beside a moved model would show."""
    import copy

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_VIT_CONFIG).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    default = te.encode_class_names(model, tokenizer, ["road", "car"], ["a photo of a {}."])
    assert default.device.type == "cpu"
    torch.testing.assert_close(default, te.encode_class_names(model, tokenizer, ["road", "car"],
                                                              ["a photo of a {}."], device="cpu"), rtol=0, atol=0)
    on_meta = te.encode_class_names(copy.deepcopy(model).to("meta"), tokenizer, ["road"], ["a {}."], device="meta")
    assert on_meta.device.type == "meta" and on_meta.shape == (1, 32)

    class RecordingModel:  # meta weights accept CPU token ids, so record where the tokens went
        def __init__(self):
            self.devices = []

        def encode_text(self, tokens):
            self.devices.append(tokens.device.type)
            return torch.ones(tokens.shape[0], 4)

    recording = RecordingModel()
    te.encode_class_names(recording, tokenizer, ["road", "car"], ["a {}."], device="meta")
    assert recording.devices == ["meta", "meta"]
