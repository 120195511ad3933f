import pytest
import yaml

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


# ---------------------------------------------------------------- renamed keys (every size (h, w))
def test_old_keys_are_refused_with_one_line_naming_the_new_key_and_order(tmp_path, capsys):
    from carbseg.cli import main

    path = tmp_path / "old.yaml"
    path.write_text("data:\n  resize: [2048, 1024]\n")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == (f"carbseg train: error: {path}: data.resize (w, h) was renamed data.scale_size, which is "
                   "(h, w): set data.scale_size to [1024, 2048] instead of data.resize [2048, 1024]\n")
    # The same refusal for an override, and for the simulated teacher's old cell key (no order change).
    with pytest.raises(UserError) as raised:
        load_config(None, ["data.resize=[640,480]"])
    assert str(raised.value) == ("config (with overrides): data.resize (w, h) was renamed data.scale_size, which "
                                 "is (h, w): set data.scale_size to [480, 640] instead of data.resize [640, 480]")
    with pytest.raises(UserError) as raised:
        load_config(None, ["teacher.patch_size=8"])
    assert str(raised.value) == ("config (with overrides): teacher.patch_size was renamed teacher.grid_cell "
                                 "(same value, no order change); set teacher.grid_cell to 8 instead")
    assert not (tmp_path / "run").exists()


def test_saved_configs_with_old_keys_are_translated_exactly(tmp_path):
    from carbseg.config import config_to_dict, load_saved_config, upgrade_saved_config

    cfg = load_config(None, ["data.scale_size=[270,360]", "teacher.grid_cell=12", "seed=3"])
    old = config_to_dict(cfg)
    old["data"] = {("resize" if k == "scale_size" else k): ([360, 270] if k == "scale_size" else v)
                   for k, v in old["data"].items()}
    old["teacher"] = {("patch_size" if k == "grid_cell" else k): v for k, v in old["teacher"].items()}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.raises(UserError, match="data.resize"):  # as a user's config: refused
        load_config(path)
    assert load_saved_config(path) == cfg  # as a run's own saved config: the same settings
    assert upgrade_saved_config(old)["data"]["scale_size"] == [270, 360]
    assert old["data"]["resize"] == [360, 270]  # the input is left as it was
    both = {"data": {"resize": [360, 270], "scale_size": [270, 360]}}
    with pytest.raises(UserError, match="holds both data.resize and data.scale_size"):
        upgrade_saved_config(both, "x.yaml")


def test_section_from_overrides_checks_like_train():
    from carbseg.config import TeacherConfig, section_from_overrides

    teacher = section_from_overrides("teacher", ["kind=simulated", "teacher.grid_cell=8"], {"noise": 0.1})
    assert teacher == TeacherConfig(kind="simulated", grid_cell=8, noise=0.1)
    assert section_from_overrides("teacher") == TeacherConfig()
    # Flags' values win over key=value; text keys keep the text as typed.
    assert section_from_overrides("teacher", ["noise=0.5", "cache_dir=2024"], {"noise": 0.2}) == \
        TeacherConfig(noise=0.2, cache_dir="2024")
    with pytest.raises(UserError, match="unknown key 'teacher.nois'"):
        section_from_overrides("teacher", ["nois=0.1"])
    with pytest.raises(UserError, match="teacher.kind = 'dino' is not valid"):
        section_from_overrides("teacher", ["kind=dino"])
    with pytest.raises(UserError, match="teacher.patch_size was renamed teacher.grid_cell"):
        section_from_overrides("teacher", ["patch_size=8"])
    with pytest.raises(UserError, match="only teacher settings apply here"):
        section_from_overrides("teacher", ["train.lr=0.1"])
    with pytest.raises(UserError, match="at least 1"):
        section_from_overrides("teacher", ["grid_cell=0"])


def test_train_ddp_takes_auto_always_or_never():
    assert load_config(None).train.ddp == "auto"
    assert load_config(None, ["train.ddp=always"]).train.ddp == "always"
    with pytest.raises(UserError, match=r"train.ddp = 'sometimes' is not valid; choose one of auto, always, never"):
        load_config(None, ["train.ddp=sometimes"])
