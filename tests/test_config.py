import pytest

from carbseg.config import Config, dump_config, load_config, parse_overrides
from carbseg.errors import UserError


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain:\n  max_iters: 10\n  lr: 1\n")
    cfg = load_config(path, ["train.max_iters=20", "glv.enabled=false", "carb.fixed_coefficient=0.03"])
    assert cfg.train.max_iters == 20
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # int accepted where float expected
    assert cfg.glv.enabled is False
    assert cfg.carb.fixed_coefficient == pytest.approx(0.03)


def test_unknown_key_names_key_and_choices(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_iter: 10\n")
    with pytest.raises(UserError, match=r"unknown key 'train.max_iter'.*max_iters"):
        load_config(path)


def test_wrong_type_and_bad_choice():
    with pytest.raises(UserError, match="train.max_iters must be int"):
        load_config(None, ["train.max_iters=ten"])
    with pytest.raises(UserError, match="model.backbone.*resnet50"):
        load_config(None, ["model.backbone=vgg"])


def test_round_trip(tmp_path):
    cfg = load_config(None, ["data.crop_size=[64,128]", "seed=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg and isinstance(again, Config)


def test_override_needs_equals():
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["train.lr"])


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(path)
