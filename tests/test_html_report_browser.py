"""The HTML report in a real browser: headless chromium driven by selenium over file://.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package (the dev extra);
without them the module skips with one line. The page of a few 64 x 32 frames
(html_report_data.py) is checked against the --json report and against hand-computed orders and
overlay colours; a 233-image page must become interactive within 2 s.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carbseg.cli import main
from carbseg.data.classes import ClassSet
from carbseg.html_report import HtmlReport
from carbseg.metrics import ConfusionMatrix, confusion_counts, iou_from_counts
from carbseg.visualize import CORRECT_COLOR, WRONG_COLOR
from html_report_data import CAR, CLASSES, POLE, ROAD, ground_truth, make_dataset, prediction

pytestmark = pytest.mark.browser

# Checked once for the module, so that a machine without them reads one skip line, not one per test.
if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
    pytest.skip("needs chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e \".[dev]\")")

COUNT = 6
OPACITY = 0.6  # the page's default opacity slider position (60)


def _chromium_driver():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


@pytest.fixture(scope="module")
def browser():
    driver = _chromium_driver()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """An evaluate --json --html run on a folder whose path has a space and non-ASCII letters."""
    base = tmp_path_factory.mktemp("html") / "Straße mit Leerzeichen"
    root = base / "data"
    classes, pred, ids = make_dataset(root, COUNT)
    out, json_path = base / "report ü", base / "e.json"
    assert main(["evaluate", "--dataset", "folder", "--root", str(root), "--split", "val", "--classes",
                 str(classes), "--pred", str(pred), "--no-progress", "--json", str(json_path),
                 "--html", str(out), "--teacher-masks", str(pred)]) == 0
    return {"out": out, "report": json.loads(json_path.read_text()), "ids": ids}


def _open(browser, page: Path, fragment: str = ""):
    browser.get("about:blank")  # a fresh load even when only the fragment differs
    browser.get(page.resolve().as_uri() + fragment)
    for _ in range(100):
        if browser.execute_script("return document.body && document.body.dataset.ready === '1'"):
            return
        time.sleep(0.05)
    raise AssertionError("the page never became ready")


def _errors(browser) -> list:
    return [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]


def test_numbers_in_the_page_equal_the_json_report_without_console_errors(browser, evaluated):
    _open(browser, evaluated["out"] / "index.html")
    report = evaluated["report"]
    read = browser.execute_script
    assert json.loads(read("return document.getElementById('miou').dataset.value")) == report["miou"]
    assert json.loads(read("return document.getElementById('pixel-acc').dataset.value")) == report["pixel_acc"]
    assert int(read("return document.getElementById('num-images').textContent")) == report["num_images"]
    bars = read("return [...document.querySelectorAll('.bar')].map(b => [b.dataset.class, b.dataset.value, "
                "b.querySelector('.value').textContent])")
    assert [(name, json.loads(value)) for name, value, _ in bars] == list(report["iou"].items())
    assert [text for _, _, text in bars] == [f"{v:.1f}" for v in report["iou"].values()]
    assert json.loads(read("return document.getElementById('json').textContent")) == report
    # The heat map: each ground-truth row's pixels split by prediction (the last column: predicted 255),
    # counted here from the frames themselves; every cell's hover text names its share and pixel count.
    counts = np.zeros((3, 4), dtype=np.int64)
    for k in range(COUNT):
        gt, pred = ground_truth(k), prediction(k)
        valid = gt != 255
        np.add.at(counts, (gt[valid], np.where(pred[valid] == 255, 3, pred[valid])), 1)
    shares = read("return [...document.querySelectorAll('#confusion tr')].slice(1).map(r => "
                  "[...r.querySelectorAll('td')].map(td => [Number(td.dataset.share), td.title]))")
    for g, row in enumerate(shares):
        for p, (share, title) in enumerate(row):
            assert share == pytest.approx(counts[g, p] / counts[g].sum(), abs=1e-12)
            assert title.endswith(f"{100 * counts[g, p] / counts[g].sum():.2f} % ({counts[g, p]} px)")
    assert read("return document.querySelectorAll('.card').length") == COUNT
    assert _errors(browser) == []


def _expected_order(key_class: int | None, only_class: int | None) -> list[int]:
    """Positions sorted worst first by mIoU (or by a class's IoU; images without it last), ids breaking ties."""
    scores = []
    for k in range(COUNT):
        gt, pred = ground_truth(k), prediction(k)
        if only_class is not None and not (gt == only_class).any():
            continue
        iou = iou_from_counts(*confusion_counts(pred, gt, 3))
        score = np.nanmean(iou) if key_class is None else iou[key_class]
        scores.append((np.isnan(score), 0.0 if np.isnan(score) else round(100 * score, 3), k))
    return [k for *_, k in sorted(scores)]


def _cards(browser) -> list[int]:
    return browser.execute_script("return [...document.querySelectorAll('#cards .card:not([hidden])')]"
                                  ".map(c => Number(c.dataset.n))")


def _choose(browser, select_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", select_id)).select_by_value(value)


def test_sort_and_filter_give_the_expected_order_and_count(browser, evaluated):
    _open(browser, evaluated["out"] / "index.html")
    assert _cards(browser) == _expected_order(None, None)  # worst mIoU first by default
    _choose(browser, "sort", "best")
    assert _cards(browser) == _expected_order(None, None)[::-1]
    _choose(browser, "sort", f"class:{POLE}")
    # Images without a pole IoU (no pole in GT nor prediction) last; the spurious pole pixels score 0.
    assert _cards(browser) == _expected_order(POLE, None)
    _choose(browser, "filter", f"class:{POLE}")  # the ground truth holds pole, not just the prediction
    expected = _expected_order(POLE, POLE)
    assert expected == [4, 2, 0]  # 8, 4 and 0 pole columns predicted as car
    assert _cards(browser) == expected
    assert browser.execute_script("return document.getElementById('count').dataset.count") == str(len(expected))
    # Two clicks to the worst image of a class: its bar, then the first card.
    _choose(browser, "filter", "all")
    _choose(browser, "sort", "worst")
    browser.find_element("css selector", f".bar[data-class='{CLASSES['names'][POLE]}']").click()
    assert _cards(browser) == expected
    browser.switch_to.active_element.click()
    assert browser.execute_script("return location.hash") == "#image-4"
    assert _errors(browser) == []


def _screen_pixel(browser, png: np.ndarray, x: int, y: int) -> np.ndarray:
    """The screenshot's colour at the centre of layer pixel (x, y)."""
    box = browser.execute_script("const c = document.getElementById('overlay'); const r = c.getBoundingClientRect();"
                                 "return [r.left, r.top, r.width / c.width, r.height / c.height]")
    left, top, sx, sy = box
    return png[int(top + (y + 0.5) * sy), int(left + (x + 0.5) * sx)].astype(int)


def _switch(browser, layer: str) -> np.ndarray:
    browser.find_element("css selector", f"input[name=layer][value={layer}]").click()
    assert browser.execute_script("return document.getElementById('overlay').dataset.layer") == layer
    return np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"))


def test_switched_layers_show_the_expected_overlay_in_screenshot_pixels(browser, evaluated):
    n = 4  # rows 0..3 of road and pole columns 48..55 predicted as car
    _open(browser, evaluated["out"] / "index.html", f"#image-{n}")
    for _ in range(100):
        if browser.execute_script("return document.getElementById('overlay').dataset.drawn") == str(n):
            break
        time.sleep(0.05)
    photo = np.asarray(Image.open(evaluated["out"] / "photos" / f"{n}.jpg").convert("RGB")).astype(float)
    palette = np.asarray(CLASSES["palette"], dtype=float)

    def expected(x, y, colour):
        return np.rint((1 - OPACITY) * photo[y, x] + OPACITY * np.asarray(colour, dtype=float))

    points = {"road, wrong": (10, 1), "road, right": (10, 20), "car": (40, 16), "pole as car": (50, 16),
              "pole": (60, 16)}
    gt, pred = ground_truth(n), prediction(n)
    shots = {layer: _switch(browser, layer) for layer in ("pred", "gt", "error")}
    for x, y in points.values():
        assert np.abs(_screen_pixel(browser, shots["pred"], x, y) - expected(x, y, palette[pred[y, x]])).max() <= 4
        assert np.abs(_screen_pixel(browser, shots["gt"], x, y) - expected(x, y, palette[gt[y, x]])).max() <= 4
        colour = CORRECT_COLOR if gt[y, x] == pred[y, x] else WRONG_COLOR
        assert np.abs(_screen_pixel(browser, shots["error"], x, y) - expected(x, y, colour)).max() <= 4
    assert (pred[1, 10], pred[16, 50]) == (CAR, CAR) and gt[16, 50] == POLE  # the points are what they say
    # Highlight only road: the car and pole pixels show the bare photo.
    _choose(browser, "highlight", str(ROAD))
    shot = _switch(browser, "gt")
    x, y = points["car"]
    assert np.abs(_screen_pixel(browser, shot, x, y) - photo[y, x]).max() <= 4
    x, y = points["road, right"]
    assert np.abs(_screen_pixel(browser, shot, x, y) - expected(x, y, palette[ROAD])).max() <= 4
    assert _errors(browser) == []


def test_a_233_image_page_is_interactive_within_two_seconds(browser, tmp_path):
    classes = ClassSet("three", tuple(CLASSES["names"]), tuple(CLASSES["names"]),
                       tuple(tuple(c) for c in CLASSES["palette"]))
    rng = np.random.default_rng(0)
    confusion = ConfusionMatrix(3)
    with HtmlReport(tmp_path / "r", classes, {"evaluated": "233 small frames"}) as html:
        for k in range(233):
            gt = ground_truth(k % 7)
            pred = np.where(rng.random(gt.shape) < 0.1, CAR, gt).astype(np.uint8)
            matrix, missed = confusion_counts(pred, gt, 3)
            confusion.add_counts(matrix, missed)
            html.add(k, f"img {k:03d}", np.full(gt.shape + (3,), 120, np.uint8), pred, gt, matrix, missed)
        html.finish(confusion.report(CLASSES["names"]), confusion)
    started = time.perf_counter()
    _open(browser, tmp_path / "r" / "index.html")
    # carbsegReady: milliseconds from navigation start to the gallery being built and its handlers set.
    ready_ms = browser.execute_script("return window.carbsegReady")
    assert ready_ms < 2000 and time.perf_counter() - started < 5
    _choose(browser, "filter", f"class:{POLE}")
    assert browser.execute_script("return document.getElementById('count').dataset.count") == str(
        sum(1 for k in range(233) if k % 7 % 2 == 0))
    assert _errors(browser) == []


def _wait_for(browser, script: str, expected, seconds: float = 5.0):
    deadline = time.perf_counter() + seconds
    while (value := browser.execute_script(script)) != expected and time.perf_counter() < deadline:
        time.sleep(0.05)
    return value


def test_keyboard_moves_through_the_gallery_and_the_images(browser, evaluated):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    _open(browser, evaluated["out"] / "index.html")
    order = _cards(browser)
    browser.execute_script("document.querySelector(`#cards .card[data-n='${arguments[0]}']`).focus()", order[0])

    def press(key):
        ActionChains(browser).send_keys(key).perform()

    press(Keys.ARROW_RIGHT)
    assert browser.execute_script("return document.activeElement.dataset.n") == str(order[1])
    press(Keys.ENTER)
    assert _wait_for(browser, "return location.hash", f"#image-{order[1]}") == f"#image-{order[1]}"
    press(Keys.ARROW_RIGHT)  # the next image of the gallery's order
    assert _wait_for(browser, "return location.hash", f"#image-{order[2]}") == f"#image-{order[2]}"
    press("3")  # layers: photo only, prediction, ground truth, ...
    layer = "return document.getElementById('overlay').dataset.layer"
    assert _wait_for(browser, layer, "gt") == "gt"
    press(Keys.ESCAPE)
    assert _wait_for(browser, "return document.getElementById('viewer').hidden", True) is True
    assert browser.execute_script("return document.activeElement.dataset.n") == str(order[2])
    assert _errors(browser) == []
