"""Prompt templates for the class text embeddings.

The paper's ensemble has 85 templates: the 80 ImageNet templates of CLIP's prompt-engineering
study (shipped by open_clip) plus five scene templates ("there is a {} in the scene." ...),
which suit driving scenes, where each class is one region among many.
Class *names* fed to the templates are a class set's ``text_names`` (the paper's renames, e.g.
Cityscapes vegetation -> "tree"); see ``carbseg.data.classes``.
"""

from __future__ import annotations

from pathlib import Path

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from carbseg.errors import UserError

SCENE_TEMPLATES = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

IMAGENET_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
ENSEMBLE_85: tuple[str, ...] = IMAGENET_TEMPLATES + SCENE_TEMPLATES
SINGLE: tuple[str, ...] = ("a photo of a {}.",)


def templates_from_spec(spec: str) -> tuple[str, ...]:
    """``ensemble85`` | ``single`` | a text file with one template per line, each containing ``{}``."""
    if spec == "ensemble85":
        return ENSEMBLE_85
    if spec == "single":
        return SINGLE
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"{spec}: prompt templates must be ensemble85, single, or a text file (one template "
                        "per line, with {} where the class name goes)")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    templates = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise UserError(f"{path}: every template needs exactly one {{}} for the class name"
                        + (f" (line {bad[0]!r})" if bad else " (file is empty)"))
    return templates
