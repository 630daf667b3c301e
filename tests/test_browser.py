"""The HTML reports in a real browser: headless Chromium (Debian's chromium and chromium-driver, driven by
selenium) opens report.html of a real tiny run, and the report of two runs, with networking blocked, and checks
that every table and plot is there and visible, that plots decoded, that nothing is fetched from outside and
that the page logs no console error. A full-page screenshot of each is saved outside the repository
($DECODEBENCH_ARTIFACTS, else pytest's temporary folder) and its path printed.

Elsewhere (no chromium, no chromedriver or no selenium) the test skips and says what is missing."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from harness import cli

# networking blocked (every host name resolves to nothing) and nothing fetched in the background
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1280,1000")
WIDTH = 1280
EXTERNAL = re.compile(r"^\s*(https?:|ftp:|wss?:|//)", re.IGNORECASE)


def _binary(env: str, *names: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    return next((found for name in names if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    chromium = _binary("DECODEBENCH_CHROMIUM", "chromium", "chromium-browser")
    driver_path = _binary("DECODEBENCH_CHROMEDRIVER", "chromedriver")
    if not chromium or not driver_path:
        pytest.skip(f"no {'chromium' if not chromium else 'chromedriver'} on this machine: the browser test needs "
                    "Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run "
                    "installs them)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")  # a fresh profile
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ["DECODEBENCH_ARTIFACTS"]) if os.environ.get("DECODEBENCH_ARTIFACTS") else \
        tmp_path_factory.mktemp("artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _markdown_tables(markdown: str) -> list[int]:
    """Rows (header included) of each table of the Markdown twin of the page, in order."""
    tables, rows = [], 0
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            rows += not line.startswith("| --- |")
        elif rows:
            tables.append(rows)
            rows = 0
    return tables


def _check_in_browser(driver, folder: Path, screenshot: Path) -> None:
    """Open folder/report.html and check it as a reader would see it; save a full-page screenshot."""
    from selenium.webdriver.common.by import By

    driver.get_log("browser")  # start from an empty console
    driver.set_window_size(WIDTH, 1000)
    driver.get((folder / "report.html").resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"

    markdown = (folder / "report.md").read_text(encoding="utf-8")
    expected_tables = _markdown_tables(markdown)  # the Markdown report is built from the same tables
    expected_plots = sorted(p.name for p in folder.glob("*.png"))
    assert expected_tables and expected_plots
    assert len(re.findall(r"^!\[", markdown, re.MULTILINE)) == len(expected_plots)

    tables = driver.find_elements(By.TAG_NAME, "table")
    assert [len(t.find_elements(By.TAG_NAME, "tr")) for t in tables] == expected_tables
    for table in tables:
        assert table.is_displayed() and table.size["width"] > 0 and table.size["height"] > 0, table.text[:80]
    images = driver.find_elements(By.TAG_NAME, "img")
    assert len(images) == len(expected_plots)
    for image in images:
        title = image.get_attribute("alt")
        assert image.get_attribute("src").startswith("data:image/png;base64,"), title
        assert image.is_displayed() and image.size["width"] > 0 and image.size["height"] > 0, title
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0 "
                                     "&& arguments[0].naturalHeight > 0", image), f"plot {title!r} did not decode"

    # offline: no external URL anywhere in the DOM or the styles, and nothing but the file and data: loaded
    urls = driver.execute_script(
        "const urls = [];"
        "for (const el of document.querySelectorAll('[src],[href],[srcset],[action],[data],[poster]'))"
        "  for (const a of ['src', 'href', 'srcset', 'action', 'data', 'poster'])"
        "    if (el.hasAttribute(a)) urls.push(el.getAttribute(a));"
        "for (const el of document.querySelectorAll('style,[style]'))"
        "  for (const m of (el.textContent + ' ' + (el.getAttribute('style') || '')).matchAll("
        "      /(?:url\\(\\s*['\"]?|@import\\s+['\"])([^'\")\\s]+)/g)) urls.push(m[1]);"
        "return urls;")
    external = [u for u in urls if EXTERNAL.match(u)]
    assert not external, f"external URLs in the page: {external}"
    assert not driver.find_elements(By.CSS_SELECTOR, "script[src], link[rel=stylesheet], link[rel=preload], iframe")
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    fetched = [name for name in loaded if not name.startswith(("data:", "file:"))]
    assert not fetched, f"the page fetched {fetched}"
    fonts = driver.execute_script("return [...document.fonts].map(f => f.family)")
    assert not fonts, f"web fonts loaded: {fonts}"  # system fonts only

    # laid out for a reader: nothing wider than the window, every table and plot inside the text column, and
    # no table so wide that it has to scroll sideways
    overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a {WIDTH}px window"
    column_right = driver.execute_script("const b = document.body; return b.getBoundingClientRect().right "
                                         "- parseFloat(getComputedStyle(b).paddingRight)")
    for element in [*tables, *images]:
        right = driver.execute_script("return arguments[0].getBoundingClientRect().right", element)
        assert right <= column_right + 1, f"{element.tag_name} sticks out of the text column: {element.text[:80]!r}"
    for table in tables:
        hidden = driver.execute_script("return arguments[0].scrollWidth - arguments[0].clientWidth", table)
        assert hidden <= 1, f"a table scrolls sideways ({hidden}px hidden): {table.text[:80]!r}"

    errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors

    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WIDTH, height + 200)  # the window chrome's share: the whole page in one picture
    assert driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 0


def test_single_run_report_in_chromium(browser, artifacts, tiny_runs, capsys):
    run = tiny_runs[0]
    assert cli.main(["report", str(run)]) == 0
    screenshot = artifacts / "report-single-run.png"
    _check_in_browser(browser, run / "report", screenshot)
    with capsys.disabled():
        print(f"\nscreenshot of the single-run report: {screenshot}")


def test_report_of_two_runs_in_chromium(browser, artifacts, tiny_runs, tmp_path, capsys):
    out = tmp_path / "both"
    assert cli.main(["report", *map(str, tiny_runs), "--out", str(out)]) == 0
    screenshot = artifacts / "report-two-runs.png"
    _check_in_browser(browser, out, screenshot)
    with capsys.disabled():
        print(f"\nscreenshot of the two-run report: {screenshot}")
