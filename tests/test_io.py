import os
import stat

import numpy as np
import pytest
from PIL import Image

from carbseg.errors import UserError
from carbseg.io import atomic_path, read_image, safe_child, write_png_atomic


def test_atomic_path_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "half.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_outputs_are_world_readable_like_plain_files(tmp_path):
    write_png_atomic(tmp_path / "m.png", np.zeros((2, 2), np.uint8))
    mode = stat.S_IMODE(os.stat(tmp_path / "m.png").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_read_image_converts_gray_rgba_and_16bit(tmp_path):
    Image.fromarray(np.full((2, 3), 7, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((2, 3, 4), 9, np.uint8), "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.full((2, 3), 65535, np.uint16)).save(tmp_path / "d.png")
    assert read_image(tmp_path / "g.png").tolist() == np.full((2, 3, 3), 7).tolist()
    assert read_image(tmp_path / "a.png").shape == (2, 3, 3)
    assert read_image(tmp_path / "d.png").max() == 255


def test_truncated_image_names_the_file(tmp_path):
    path = tmp_path / "t.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="t.png: cannot read image"):
        read_image(path)


def test_safe_child_refuses_escapes(tmp_path):
    assert safe_child(tmp_path, "a/b.png") == (tmp_path / "a" / "b.png").resolve()
    for bad in ("../x.png", "/etc/passwd", "a/../../x"):
        with pytest.raises(UserError, match="outside the output folder"):
            safe_child(tmp_path, bad)
