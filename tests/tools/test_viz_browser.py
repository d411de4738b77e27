"""qkv.viz.html in a real browser: headless Chromium (Debian's chromium + chromium-driver) via Selenium.

The page is opened from a file:// URL with no network. `make test` installs the browser;
set QKV_SKIP_BROWSER=1 to skip these tests on a machine without it.

Legend: H heads, Lq/Lk query/key lengths.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch

from qkv import viz

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKENS = ["the", "dog", "<script>", "a&b", '"q"', "<img src=x onerror=\"window.pwned=1\">", "stick", "."]
LAYERS, HEADS = 2, 3


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


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A driver on the viewer of LAYERS x HEADS softmax maps over TOKENS."""
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp = tmp_path_factory.mktemp("viewer")
    g = torch.Generator().manual_seed(0)
    maps = {f"layer {i}": torch.softmax(3 * torch.randn(HEADS, 8, 8, generator=g), dim=-1) for i in range(LAYERS)}
    path = viz.html(maps, TOKENS, tmp / "attention.html", title="browser test")

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", "--window-size=1100,800"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit chromedriver: Selenium never looks one up (or downloads one) itself
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(30)
        driver.get(path.resolve().as_uri())
        assert driver.execute_script("return !!(window.qkvViewer && window.qkvViewer.ready)"), \
            "the viewer did not start"
        yield driver
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, f"console errors: {severe}"
    finally:
        driver.quit()


def _drawn(driver) -> tuple[str, str]:
    """(data-drawn summary, canvas pixels as a data URL) of the head view."""
    return driver.execute_script(
        "var c = document.getElementById('head-canvas'); return [c.dataset.drawn, c.toDataURL()];")


def _canvas_attr(driver, name: str) -> str:
    return driver.find_element("id", "head-canvas").get_attribute(f"data-{name}")


def test_loads_without_console_errors_and_escapes_tokens(page):
    severe = [e for e in page.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, f"console errors: {severe}"
    texts = [e.text for e in page.find_elements("css selector", "#key-col .token")]
    assert texts == TOKENS                                              # shown as text, not markup
    assert page.execute_script("return window.pwned === undefined && document.images.length === 0")
    assert page.title == "browser test"
    state = page.execute_script("return qkvViewer.state()")
    assert state["layer"] == 0 and state["head"] == "all" and state["focus"] is None
    assert _canvas_attr(page, "layer") == "0" and _canvas_attr(page, "head") == "all"


def test_switching_the_head_changes_the_drawing(page):
    from selenium.webdriver.support.ui import Select

    page.execute_script("qkvViewer.show('head'); qkvViewer.select(0, 'all'); qkvViewer.focus(null);")
    before = _drawn(page)
    Select(page.find_element("id", "head-select")).select_by_value("1")
    one = _drawn(page)
    assert _canvas_attr(page, "head") == "1"
    assert one[0] != before[0] and one[1] != before[1]
    # a swatch selects its head; another layer draws something else again
    page.find_element("css selector", '#swatches .swatch[data-head="2"]').click()
    two = _drawn(page)
    assert _canvas_attr(page, "head") == "2" and two[1] != one[1]
    Select(page.find_element("id", "layer-select")).select_by_index(1)
    assert _canvas_attr(page, "layer") == "1" and _canvas_attr(page, "head") == "2"
    assert _drawn(page)[1] != two[1]
    page.find_element("css selector", '#swatches .swatch[data-head="all"]').click()
    assert _canvas_attr(page, "head") == "all"


def test_hovering_a_token_shows_only_its_lines(page):
    from selenium.webdriver.common.action_chains import ActionChains

    page.execute_script("qkvViewer.show('head'); qkvViewer.select(0, 'all'); qkvViewer.focus(null);")
    before = _drawn(page)
    n_all = int(before[0].split("|")[3])
    token = page.find_elements("css selector", "#query-col .token")[3]
    ActionChains(page).move_to_element(token).perform()
    hovered = _drawn(page)
    assert _canvas_attr(page, "focus") == "q3"
    assert hovered[1] != before[1]
    assert 0 < int(hovered[0].split("|")[3]) < n_all                      # fewer lines: just this query's
    # the keys it attends to are shaded
    shaded = page.execute_script(
        "return Array.prototype.filter.call(document.querySelectorAll('#key-col .token'),"
        " function (e) { return e.style.background !== ''; }).length")
    assert shaded > 0
    ActionChains(page).move_to_element(page.find_element("tag name", "h1")).perform()
    assert _drawn(page) == before                                        # leaving restores the full drawing


def test_model_view_thumbnails_open_the_head_view(page):
    page.find_element("id", "tab-model").click()
    assert page.find_element("id", "model-view").is_displayed()
    assert not page.find_element("id", "head-view").is_displayed()
    thumbs = page.find_elements("css selector", "#model-grid canvas.thumb")
    assert len(thumbs) == LAYERS * HEADS
    urls = page.execute_script(
        "return Array.prototype.map.call(document.querySelectorAll('canvas.thumb'), function (c) {"
        " return c.toDataURL(); })")
    assert len(set(urls)) == LAYERS * HEADS                              # every thumbnail drew its own map
    target = page.find_element("css selector", 'canvas.thumb[data-layer="1"][data-head="2"]')
    target.click()
    assert page.find_element("id", "head-view").is_displayed()
    assert _canvas_attr(page, "layer") == "1" and _canvas_attr(page, "head") == "2"
    assert page.execute_script("return qkvViewer.state().view") == "head"


def test_screenshot_is_not_blank(page):
    from PIL import Image

    page.execute_script("qkvViewer.show('head'); qkvViewer.select(0, 'all'); qkvViewer.focus('q', 2);")
    img = np.asarray(Image.open(io.BytesIO(page.get_screenshot_as_png())).convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert img.std() > 10, "the screenshot is (nearly) uniform"
    packed = (img[..., 0].astype(np.int32) << 16) | (img[..., 1].astype(np.int32) << 8) | img[..., 2]
    assert len(np.unique(packed)) > 50                                   # text, lines and swatches, not a flat page
