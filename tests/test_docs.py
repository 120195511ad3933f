"""The user documentation: runnable API examples, a complete configuration reference, working links."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from conftest import PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs"
CODE_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


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


# Every page a reader may open: the README, docs/ (studies' tables included) and the benchmark results.
PAGES = sorted(["README.md", "benchmarks/RESULTS.md",
                *(str(p.relative_to(PROJECT_ROOT)) for p in DOCS.rglob("*.md"))])
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
# How the work went is not reference: the wording a page must not use (the repository's stop hook greps it too).
NARRATION = re.compile(r"(later|earlier|this|next|previous|last) session|\bstop [0-9]+|\bissue [0-9]+", re.I)


def _prose(path) -> str:
    """A page without its fenced code blocks (a '# comment' there is no heading, a '](x)' no link)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of ``text``: lower case, punctuation dropped (hyphens and
    underscores kept), spaces as hyphens, ``-1``, ``-2`` ... for repeats."""
    anchors: set[str] = set()
    for title in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_heading_anchors_follow_github():
    text = "# A first run on a CPU\n## Offline demo (`carbseg demo`, `benchmarks/bench_demo.py`)\n## Files\n## Files\n"
    assert heading_anchors(text) == {"a-first-run-on-a-cpu", "offline-demo-carbseg-demo-benchmarksbench_demopy",
                                     "files", "files-1"}


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    path = PROJECT_ROOT / page
    broken = []
    for target in MARKDOWN_LINK.findall(_prose(path)):
        if "://" in target or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        exists = linked.exists()
        if not exists or (anchor and linked.suffix == ".md" and anchor not in heading_anchors(_prose(linked))):
            broken.append(target)
    assert broken == [], f"{page}: links to missing files or headings"


def test_pages_are_reference_not_a_diary():
    pages = ["README.md", "benchmarks/RESULTS.md", *(str(p.relative_to(PROJECT_ROOT)) for p in DOCS.rglob("*")
                                                      if p.suffix in (".md", ".py"))]
    found = [f"{page}: {m.group(0)}" for page in pages
             for m in NARRATION.finditer((PROJECT_ROOT / page).read_text(encoding="utf-8"))]
    assert found == []


def test_readme_has_exactly_the_two_setup_commands():
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert [c.strip() for c in commands] == ['pip install -e ".[dev]" && carbseg demo --out runs/demo',
                                             'pip install -e ".[dev]" && python -m pytest']
