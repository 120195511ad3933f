"""Mutation testing of one carbseg module against its own fast tests (mutmut), never part of CI.

    python tools/mutation.py MODULE            # mutate src/carbseg/MODULE.py, run its tests per mutant
    python tools/mutation.py MODULE results    # list the surviving mutants of the last run
    python tools/mutation.py MODULE show NAME  # the diff of one mutant
    python tools/mutation.py --list            # the modules and their test files

MODULE is a dotted name below ``carbseg`` (``metrics``, ``data.views``, ``teacher.pseudo_masks``).
mutmut reads its settings from the ``pyproject.toml`` of the folder it runs in, one setting for the
whole folder; so each module gets its own folder ``mutants-work/MODULE/`` with a copy of ``src/`` and
``tests/`` and a ``pyproject.toml`` whose ``[tool.mutmut]`` is the project's, narrowed to that module
(``only_mutate``) and to its test files (``pytest_add_cli_args_test_selection``). Runs of different
modules therefore keep separate results. mutmut runs niced, one mutant at a time, one thread each: a
module's run stays affordable on a shared 2-core machine (see docs/testing.md for the times).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORK_ROOT = PROJECT_ROOT / "mutants-work"

#: Module (below carbseg) -> the test files that exercise it and run in seconds to a few minutes.
#: Slow, GPU and subprocess-heavy tests stay out: a mutant's tests run once per mutant.
TESTS_BY_MODULE: dict[str, tuple[str, ...]] = {
    "engine.schedule": ("tests/test_train_schedule.py",),
    "teacher.pseudo_masks": ("tests/test_teacher_pseudo_masks.py",),
    "teacher.text_embeddings": ("tests/test_teacher_text.py",),
    "data.views": ("tests/test_views.py",),
    "data.frames": ("tests/test_frames.py", "tests/test_teacher_persistence.py::test_frame_map_algebra_by_hand",
                    "tests/test_teacher_simulated.py"),
    "data.transforms": ("tests/test_transforms.py",
                        "tests/test_teacher_persistence.py::test_augmentation_frame_map_places_every_view_pixel_where_it_came_from"),
    "metrics": ("tests/test_metrics.py",),
    "losses.carb": ("tests/test_carb_loss.py",),
    "engine.step": ("tests/test_train_step.py", "tests/test_train_clip_teacher.py"),
    "teacher.clip_teacher": ("tests/test_clip_teacher.py", "tests/test_teacher_pseudo_masks.py"),
    # The subprocess test (4.5 s per mutant) repeats in another process what the others check in this one.
    "teacher.proxy": ("tests/test_teacher_proxy.py", "--deselect",
                      "tests/test_teacher_proxy.py::test_proxy_labels_are_the_same_in_another_process"),
    "teacher.clip_dense": ("tests/test_teacher_dense.py", "tests/test_teacher_dense_variants.py"),
    # Left out: two processes probing together (their calls run in subprocesses, unseen by mutmut) and the
    # resumed-run tests (a training run each, reached by every mutant of the CPU choice).
    "precision": ("tests/test_precision.py",
                  "--deselect", "tests/test_precision.py::test_two_processes_probing_together_share_the_cache",
                  "-k", "not test_a_resumed_run_keeps_the_precision_auto_chose_and_stays_bit_exact"),
}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def module_config(module: str) -> dict:
    """The project's [tool.mutmut] narrowed to ``module`` and its tests."""
    base = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text("utf-8"))["tool"].get("mutmut", {})
    return {**base,
            "only_mutate": ["src/carbseg/" + module.replace(".", "/") + ".py"],
            "pytest_add_cli_args_test_selection": list(TESTS_BY_MODULE[module])}


def _with_mutmut_section(pyproject_text: str, settings: dict) -> str:
    """``pyproject_text`` with its [tool.mutmut] table replaced by ``settings``."""
    without = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", pyproject_text)
    lines = ["[tool.mutmut]"] + [f"{key} = {_toml_value(value)}" for key, value in settings.items()]
    return without.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"


def prepare(module: str) -> Path:
    """A fresh ``mutants-work/MODULE/`` folder: src/, tests/ and the module's pyproject.toml."""
    work = WORK_ROOT / module
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(PROJECT_ROOT / "src", work / "src", ignore=ignore)
    shutil.copytree(PROJECT_ROOT / "tests", work / "tests", ignore=ignore)
    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text("utf-8")
    (work / "pyproject.toml").write_text(_with_mutmut_section(pyproject, module_config(module)), "utf-8")
    # PYTHONPATH names mutants/src (see mutmut()): it must exist when Python starts, or the import
    # system caches "no such folder" for it and the tests import the installed, unmutated carbseg.
    (work / "mutants" / "src").mkdir(parents=True)
    # The tests find the real data beside the project root; mutmut runs them from work/mutants/.
    shared = PROJECT_ROOT.parent / "shared"
    if shared.is_dir():
        (work / "shared").symlink_to(shared.resolve(), target_is_directory=True)
    return work


def mutmut(work: Path, *args: str) -> int:
    """Run mutmut in ``work``: niced, one thread; subprocesses of the tests import the mutants too."""
    exe = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(work / "mutants" / "src")}
    command = ["nice", "-n", "19", str(exe) if exe.exists() else "mutmut", *args]
    return subprocess.call(command, cwd=work, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?", help="dotted module below carbseg, e.g. metrics")
    parser.add_argument("action", nargs="?", default="run", choices=("run", "results", "show"))
    parser.add_argument("mutant", nargs="?", help="mutant name for 'show'")
    parser.add_argument("--list", action="store_true", help="print the modules and their tests")
    args = parser.parse_args(argv)
    if args.list or args.module is None:
        for module, tests in TESTS_BY_MODULE.items():
            print(f"{module:24s} {' '.join(tests)}")
        return 0
    if args.module not in TESTS_BY_MODULE:
        parser.error(f"unknown module {args.module!r}; add it and its test files to TESTS_BY_MODULE "
                     "in tools/mutation.py")
    work = WORK_ROOT / args.module
    if args.action == "run":
        work = prepare(args.module)
        code = mutmut(work, "run", "--max-children", "1")
        mutmut(work, "export-cicd-stats")
        stats = work / "mutants" / "mutmut-cicd-stats.json"
        if stats.is_file():
            print(stats.read_text("utf-8"))
        return code
    if not work.is_dir():
        parser.error(f"no run of {args.module} yet: python tools/mutation.py {args.module}")
    if args.action == "results":
        return mutmut(work, "results")
    if args.mutant is None:
        parser.error("show needs a mutant name (from 'results')")
    return mutmut(work, "show", args.mutant)


if __name__ == "__main__":
    sys.exit(main())
