"""Cost of the HTML report (`carbseg evaluate --pred ... --html DIR`) at Cityscapes val's scale.

Generates a folder dataset of synthetic driving scenes (the 19 Cityscapes classes) at 2048 x 1024
with predictions (the ground truth with a tenth of its 64-px blocks given a wrong class and a
4-px shift), then times, in this process:

- ``evaluate``: ``evaluate_predictions`` alone (what `carbseg evaluate --pred` does without --html);
- ``evaluate + html``: the same pass with the report's hook, then ``HtmlReport.finish`` (what
  `carbseg evaluate --pred ... --html DIR` does): the build time of the page;

and reports the page folder's size and, where chromium, chromium-driver and selenium are installed,
how long the page takes to open (navigation start to an interactive gallery, ``window.carbsegReady``)
and to show its first image's layers. Targets: build <= 90 s on 2 cores, <= 150 MB, open <= 2 s.

    python benchmarks/bench_html.py --work DIR [--num 500] [--size 2048x1024] [--unique 100]

Rendering a 2048 x 1024 scene takes about a second, so only ``--unique`` scenes are rendered and
the others are byte copies of them under their own names (every file is still decoded on its own).
The generated data stays in DIR/data and is reused by the next run of the same size. Synthetic
photos are smoother than real ones, so their JPEGs are smaller than Cityscapes' would be: the size
row says how much of it is photos.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from carbseg.data.classes import CITYSCAPES
from carbseg.data.datasets import build_dataset
from carbseg.engine.evaluate import evaluate_predictions
from carbseg.html_report.builder import HtmlReport, image_hook, machine_description


def _corrupt(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pred = np.roll(gt, 4, axis=1)
    pred[pred == 255] = 0
    h, w = gt.shape
    for y in range(0, h, 64):
        for x in range(0, w, 64):
            if rng.random() < 0.1:
                pred[y:y + 64, x:x + 64] = rng.integers(0, 19)
    return pred.astype(np.uint8)


def make_data(root: Path, num: int, width: int, height: int, unique: int) -> Path:
    """ROOT/images/val, ROOT/masks/val, ROOT/pred and ROOT/classes.json; reused when complete."""
    from carbseg.data.synthetic.render import render_scene

    done = root / "complete.json"
    settings = {"num": num, "width": width, "height": height, "unique": unique}
    if done.is_file() and json.loads(done.read_text()) == settings:
        return root
    if root.exists():
        shutil.rmtree(root)
    for sub in ("images/val", "masks/val", "pred"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(min(unique, num)):
        image, mask = render_scene(k, height, width)
        Image.fromarray(image).save(root / "images" / "val" / f"scene_{k:04d}.png", compress_level=1)
        Image.fromarray(mask).save(root / "masks" / "val" / f"scene_{k:04d}.png")
        Image.fromarray(_corrupt(mask, rng)).save(root / "pred" / f"scene_{k:04d}.png")
        print(f"rendered scene {k + 1}/{min(unique, num)}", end="\r", file=sys.stderr)
    for k in range(unique, num):
        source = f"scene_{k % unique:04d}.png"
        for sub in ("images/val", "masks/val", "pred"):
            shutil.copyfile(root / sub / source, root / sub / f"scene_{k:04d}.png")
    (root / "classes.json").write_text(json.dumps({"names": list(CITYSCAPES.names),
                                                   "palette": [list(c) for c in CITYSCAPES.palette]}))
    done.write_text(json.dumps(settings))
    return root


def folder_size(path: Path) -> tuple[int, int]:
    """Bytes of the whole folder and of its photos."""
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    photos = sum(p.stat().st_size for p in (path / "photos").iterdir())
    return total, photos


def open_times(page: Path) -> tuple[float, float] | None:
    """(ms to an interactive gallery, ms to the first image's drawn layer) in headless chromium."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_path is None:
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        driver.get(page.resolve().as_uri())
        while not driver.execute_script("return window.carbsegReady"):
            time.sleep(0.01)
        ready = float(driver.execute_script("return window.carbsegReady"))
        first = driver.execute_script("return document.querySelector('#cards .card').dataset.n")
        driver.execute_script("window.viewStart = performance.now(); location.hash = 'image-' + arguments[0]", first)
        while driver.execute_script("return document.getElementById('overlay').dataset.drawn") != first:
            time.sleep(0.005)
        view = float(driver.execute_script("return performance.now() - window.viewStart"))
    finally:
        driver.quit()
    return ready, view


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="working folder (generated data is kept and reused)")
    parser.add_argument("--num", type=int, default=500, help="images (default 500, Cityscapes val)")
    parser.add_argument("--size", default="2048x1024", help="WIDTHxHEIGHT (default 2048x1024)")
    parser.add_argument("--unique", type=int, default=100, help="distinct rendered scenes (default 100)")
    parser.add_argument("--workers", type=int, default=2, help="evaluation threads (default 2, as evaluate)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    work = Path(args.work)
    root = make_data(work / "data", args.num, width, height, max(1, args.unique))
    dataset = build_dataset("folder", str(root), "val", classes_file=str(root / "classes.json"))
    pred = root / "pred"

    started = time.perf_counter()
    evaluate_predictions(dataset, pred, progress=False, workers=args.workers)
    evaluate_s = time.perf_counter() - started

    out = work / "report"
    started, cpu = time.perf_counter(), time.process_time()
    with HtmlReport(out, dataset.classes, {"evaluated": f"predictions {pred}", "split": "val"}) as html:
        confusion, _ = evaluate_predictions(dataset, pred, progress=False, workers=args.workers,
                                            on_image=image_hook(html, dataset))
        page = html.finish(confusion.report(dataset.classes.names), confusion)
    build_s, build_cpu = time.perf_counter() - started, time.process_time() - cpu
    total, photos = folder_size(out)
    opened = open_times(page)

    print(f"machine: {machine_description()}")
    print(f"{args.num} images at {width}x{height}, {args.workers} evaluation threads, os.cpu_count() "
          f"{os.cpu_count()}\n")
    print("| measure | value | target |")
    print("|---|---:|---:|")
    print(f"| evaluate alone (s) | {evaluate_s:.1f} | |")
    print(f"| evaluate + html: page build (s) | {build_s:.1f} | <= 90 |")
    print(f"| of which the page (s) | {build_s - evaluate_s:.1f} | |")
    print(f"| page build, CPU seconds of this process | {build_cpu:.1f} | |")
    print(f"| page folder (MB) | {total / 1e6:.1f} (photos {photos / 1e6:.1f}) | <= 150 |")
    if opened is None:
        print("| open (ms) | not measured: needs chromium, chromium-driver and selenium | <= 2000 |")
    else:
        print(f"| open: gallery interactive (ms) | {opened[0]:.0f} | <= 2000 |")
        print(f"| first image's layers drawn (ms) | {opened[1]:.0f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
