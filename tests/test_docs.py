"""The user documentation: runnable API examples, a complete configuration reference, working links."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from conftest import PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs"
CODE_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_configuration", DOCS / "gen_configuration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_lists_every_key_with_its_default():
    gen = _generator()
    keys = gen.config_keys()
    assert len(keys) == len({k for k, _ in keys}) > 50
    missing = [k for k, _ in keys if k not in gen.MEANINGS]
    assert missing == [], f"document these keys in docs/gen_configuration.py: {missing}"
    assert set(gen.MEANINGS) == {k for k, _ in keys}, "MEANINGS documents keys that no longer exist"
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert page == gen.rendered_page(page), "docs/configuration.md is stale: run python docs/gen_configuration.py"
    for key, default in keys:
        assert f"| `{key}` | `{gen._yaml_value(default)}` |" in page
    # Spot checks against the paper's defaults.
    assert "| `train.warmup_iters` | `16000` |" in page and "| `glv.patch_size` | `[512, 256]` |" in page


def test_api_examples_run_in_order(tmp_path, monkeypatch):
    blocks = CODE_BLOCK.findall((DOCS / "api.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 -- our own documentation
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "overlay.png").is_file() and (tmp_path / "evaluation" / "report.md").is_file()
    assert 0.0 <= namespace["result"]["miou"] <= 100.0
    assert (tmp_path / "demo_out" / "report.json").is_file()


@pytest.mark.parametrize("page", ["README.md", "docs/README.md", "docs/reproducing.md", "docs/configuration.md",
                                  "docs/api.md", "docs/troubleshooting.md"])
def test_relative_links_resolve(page):
    path = PROJECT_ROOT / page
    targets = [t for t in LINK.findall(path.read_text(encoding="utf-8")) if "://" not in t]
    broken = [t for t in targets if not (path.parent / t).exists()]
    assert broken == []


def test_readme_has_exactly_the_two_setup_commands():
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert [c.strip() for c in commands] == ['pip install -e ".[dev]" && carbseg demo --out runs/demo',
                                             'pip install -e ".[dev]" && python -m pytest']
