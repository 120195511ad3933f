"""OpenAI's archive format (traced fp16 TorchScript, OpenAI's names, metadata entries) loads as open_clip would."""

from __future__ import annotations

import open_clip
import pytest
import torch

from carbseg.teacher.tiny import write_tiny_config
from carbseg.teacher.weights import load_clip
from openai_archive import write_openai_archive

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai")
    return write_openai_archive(folder / "ViT-tiny.pt"), write_tiny_config(folder / "tiny.json")


def test_archive_has_the_release_format(archive):
    path, _ = archive
    state = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert isinstance(torch.jit.load(str(path)), torch.jit.ScriptModule)
    assert state["visual.conv1.weight"].dtype == torch.float16
    assert state["visual.transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16
    assert state["visual.ln_post.weight"].dtype == torch.float32
    assert [int(state[k]) for k in ("input_resolution", "context_length", "vocab_size")] == [224, 77, 49408]


def test_loading_the_archive_gives_open_clips_own_conversion(archive):
    path, config = archive
    model, source = load_clip(str(config), str(path))
    assert source.quick_gelu  # OpenAI's networks use QuickGELU
    raw = {k: v.clone() for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    reference = open_clip.model.build_model_from_openai_state_dict(raw).float().eval()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    assert all(v.dtype == torch.float32 for v in ours.values() if v.is_floating_point())
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    activation = type(reference.visual.transformer.resblocks[0].mlp.gelu)
    assert activation.__name__ == "QuickGELU" and type(model.visual.transformer.resblocks[0].mlp.gelu) is activation
    # (Outputs are not compared: open_clip's conversion assumes 64-wide heads, the tiny ViT has 32-wide ones.)
