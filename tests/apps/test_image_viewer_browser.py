"""qkv.viz.image_html (the viewer's image view) in a real browser: headless Chromium via Selenium,
opened from a file:// URL with no network, like tests/tools/test_viz_browser.py. Set QKV_SKIP_BROWSER=1
to skip on a machine without the browser (`make test` installs it).

Legend: L layers, H heads, N tokens (CLS + P patches), gh x gw patch grid.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from qkv import viz
from qkv.inspect import rollout

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
LAYERS, HEADS, GRID = 2, 3, (4, 4)
N = 1 + GRID[0] * GRID[1]
TITLE = "<img src=x onerror=\"window.pwned=1\"> digit"


def _need_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (the dev extra)")
    if not missing:
        return
    msg = (f"the browser test needs {', '.join(missing)}: run `make test`, which installs them "
           "(apt-get install chromium chromium-driver; pip install -e '.[dev]'), or set QKV_SKIP_BROWSER=1 to skip")
    if os.environ.get("QKV_SKIP_BROWSER") == "1":
        pytest.skip(msg)
    pytest.fail(msg, pytrace=False)


def _weights():
    g = torch.Generator().manual_seed(0)
    return [torch.softmax(3 * torch.randn(HEADS, N, N, generator=g, dtype=torch.float64), -1) for _ in range(LAYERS)]


IMAGE = np.linspace(0, 1, 64).reshape(1, 8, 8)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp = tmp_path_factory.mktemp("image_viewer")
    path = viz.image_html(IMAGE, {f"layer {i}": w for i, w in enumerate(_weights())}, tmp / "image.html",
                          grid=GRID, title=TITLE)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", "--window-size=1100,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(30)
        driver.get(path.resolve().as_uri())
        assert driver.execute_script("return !!(window.qkvViewer && window.qkvViewer.ready)"), \
            "the image viewer did not start"
        yield driver
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, f"console errors: {severe}"
    finally:
        driver.quit()


def _canvas(driver):
    """(data-drawn, canvas pixels as a data URL) of the image canvas."""
    return driver.execute_script("var c = document.getElementById('image-canvas'); return [c.dataset.drawn, c.toDataURL()];")


def _attr(driver, name):
    return driver.find_element("id", "image-canvas").get_attribute(f"data-{name}")


def _pixel(driver, r, c, dy=0.5, dx=0.5):
    """RGB of the canvas at a point of patch (r, c) (fractions dy, dx of the patch)."""
    return driver.execute_script(
        "var c = document.getElementById('image-canvas'), ph = c.height / arguments[4], pw = c.width / arguments[5];"
        "return Array.prototype.slice.call(c.getContext('2d').getImageData("
        "Math.floor((arguments[1] + arguments[3]) * pw), Math.floor((arguments[0] + arguments[2]) * ph), 1, 1).data, 0, 3);",
        r, c, dy, dx, *GRID)


def _reset(driver):
    driver.execute_script("qkvViewer.select(0, 'mean'); qkvViewer.query(0);")


def test_loads_offline_and_escapes_the_title(page):
    assert page.title == TITLE
    assert page.execute_script("return window.pwned === undefined && document.images.length === 0")
    assert page.execute_script("return performance.getEntriesByType('resource').length") == 0    # nothing fetched
    state = page.execute_script("return qkvViewer.state()")
    assert state["view"] == "image" and state["layer"] == 0 and state["head"] == "mean" and state["query"] == 0
    assert _attr(page, "layer") == "0" and _attr(page, "query") == "0"
    assert page.execute_script("return qkvViewer.grid") == list(GRID)


def test_the_drawn_colours_follow_the_map(page):
    """The most- and least-attended patches carry the colour map's two ends, blended as viz.overlay does."""
    from matplotlib import colormaps

    page.execute_script("qkvViewer.select(1, 2); qkvViewer.query(5);")
    m = _weights()[1][2, 5, 1:].numpy()
    got_map = np.array(page.execute_script("return qkvViewer.map()"))
    assert np.abs(got_map - m).max() < 1e-4                                            # stored to 4 decimals
    lut = np.rint(colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255)
    for j, end in ((int(np.argmax(m)), 255), (int(np.argmin(m)), 0)):
        r, c = divmod(j, GRID[1])
        y, x = 2 * r, 2 * c                                                           # the patch's first pixel
        grey = np.rint(IMAGE[0, y, x] * 255)
        want = np.rint(0.4 * grey + 0.6 * lut[end])
        got = np.array(_pixel(page, r, c, 0.25, 0.25))
        assert np.abs(got - want).max() <= 1, (j, got, want)
    hot, cold = divmod(int(np.argmax(m)), GRID[1]), divmod(int(np.argmin(m)), GRID[1])
    assert np.abs(np.array(_pixel(page, *hot, 0.25, 0.25)) - np.array(_pixel(page, *cold, 0.25, 0.25))).max() > 60


def test_selecting_a_layer_and_a_head_changes_the_drawing(page):
    from selenium.webdriver.support.ui import Select

    _reset(page)
    before = _canvas(page)
    Select(page.find_element("id", "layer-select")).select_by_value("1")
    after = _canvas(page)
    assert _attr(page, "layer") == "1" and after[0] != before[0] and after[1] != before[1]
    Select(page.find_element("id", "head-select")).select_by_value("2")
    head = _canvas(page)
    assert _attr(page, "head") == "2" and head[1] != after[1]
    Select(page.find_element("id", "layer-select")).select_by_value("rollout")
    assert _attr(page, "layer") == "rollout" and _attr(page, "head") == "mean"
    assert page.find_element("id", "head-select").get_attribute("disabled") == "true"
    R = rollout([w[None] for w in _weights()])[0]
    assert np.abs(np.array(page.execute_script("return qkvViewer.map()")) - R[0, 1:].numpy()).max() < 1e-4
    assert _canvas(page)[1] != head[1]


def test_clicking_a_patch_makes_it_the_query(page):
    from selenium.webdriver.common.action_chains import ActionChains

    _reset(page)
    before = _canvas(page)
    canvas = page.find_element("id", "image-canvas")
    size = canvas.size
    r, c = 2, 3
    dx = (c + 0.5) * size["width"] / GRID[1] - size["width"] / 2                      # offsets from the centre
    dy = (r + 0.5) * size["height"] / GRID[0] - size["height"] / 2
    ActionChains(page).move_to_element_with_offset(canvas, int(dx), int(dy)).click().perform()
    assert _attr(page, "query") == str(1 + r * GRID[1] + c)
    assert page.execute_script("return qkvViewer.state().patch") == [r, c]
    after = _canvas(page)
    assert after[0] != before[0] and after[1] != before[1]
    assert "patch (2, 3)" in page.find_element("id", "query-label").text
    assert "patch (2, 3): " in page.find_element("id", "readout").text                # the hover readout
    assert np.abs(np.array(_pixel(page, r, c, 0.02, 0.5)) - [0, 229, 255]).max() <= 2  # the query's cyan frame
    page.find_element("id", "cls-button").click()
    assert _attr(page, "query") == "0"


def test_bad_calls_throw(page):
    for call in ("qkvViewer.select(5, 'mean')", "qkvViewer.select(0, 7)", "qkvViewer.query(99)"):
        msg = page.execute_script(f"try {{ {call}; return null; }} catch (e) {{ return e.message; }}")
        assert msg and msg.startswith("qkvViewer."), call
    _reset(page)
