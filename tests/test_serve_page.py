"""The page `lorafit serve` ships at `/`, in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by selenium): one text, batch mode with its table, the run picker, and an API
error shown as the API's sentence. Screenshots go to test-artifacts/ (or $LORAFIT_TEST_ARTIFACTS).

Skipped where Chromium is not installed, except under CI (CI=true), where that is a failure."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install chromium and chromium-driver for the page test (see .ci/run)")
    pytest.skip("chromium / chromedriver not installed", allow_module_level=True)
pytest.importorskip("selenium")
pytest.importorskip("fastapi")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from lorafit import load_classifier  # noqa: E402
from lorafit.serve import ServeLimits, create_app  # noqa: E402

ARTIFACTS = Path(os.environ.get("LORAFIT_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))


@pytest.fixture(scope="module")
def server(runs):
    """A real uvicorn server on a free loopback port, in a thread, serving runs a and b."""
    from conftest import served_in_thread

    app = create_app(
        {"a": runs["a"], "b": runs["b"]}, precision="fp32", limits=ServeLimits(max_client_batch=4)
    )
    with served_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=20):
    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def screenshot(driver, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))


def test_page_classifies_one_text_and_a_batch(server, browser, runs):
    browser.get(server)
    wait_for(browser, lambda d: "ham, spam" in d.find_element(By.ID, "info").text)
    assert browser.find_element(By.ID, "run-picker").is_displayed()  # two runs: the picker shows

    text = "WIN FREE prize claim cash now 12345"
    browser.find_element(By.ID, "text").send_keys(text)
    browser.find_element(By.ID, "classify").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "label").text)
    expected = load_classifier(runs["a"], device="cpu", precision="fp32").predict([text])[0]
    assert browser.find_element(By.ID, "label").text == expected["label"]
    bars = {b.get_attribute("data-label"): float(b.find_element(By.CLASS_NAME, "num").text)
            for b in browser.find_elements(By.CSS_SELECTOR, "#bars .bar")}  # fmt: skip
    assert set(bars) == {"ham", "spam"}
    for label, score in bars.items():
        assert abs(score - expected["probabilities"][label]) < 1e-4
    for bar in browser.find_elements(By.CSS_SELECTOR, "#bars .bar"):  # each bar drawn as long as its score
        track = bar.find_element(By.CLASS_NAME, "track").size["width"]
        fill = bar.find_element(By.CLASS_NAME, "fill").size["width"]
        assert abs(fill / track - bars[bar.get_attribute("data-label")]) < 0.02
    classifier = load_classifier(runs["a"], device="cpu", precision="fp32")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#tokens .tok"))
    chips = browser.find_elements(By.CSS_SELECTOR, "#tokens .tok")
    ids = [int(c.get_attribute("title").split(",")[0].removeprefix("id ")) for c in chips]
    assert ids == classifier.tokenizer.encode(text) and not browser.find_elements(By.CSS_SELECTOR, ".tok.cut")
    assert "".join(c.get_attribute("textContent") for c in chips) == text
    assert (
        browser.find_element(By.ID, "tokens-note").text
        == f"{len(ids)} tokens (the run reads up to {classifier.max_length})"
    )
    screenshot(browser, "serve-page-single.png")

    long = "WIN FREE prize claim " * 8  # longer than the run's max length: the end is struck through
    browser.find_element(By.ID, "text").clear()
    browser.find_element(By.ID, "text").send_keys(long)
    browser.find_element(By.ID, "classify").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".tok.cut"))
    count, limit = len(classifier.tokenizer.encode(long)), classifier.max_length
    assert len(browser.find_elements(By.CSS_SELECTOR, "#tokens .tok")) == count
    assert len(browser.find_elements(By.CSS_SELECTOR, ".tok.cut")) == count - limit
    note = f"{count} tokens; the run reads {limit} (its max length), the struck ones are cut"
    assert browser.find_element(By.ID, "tokens-note").text == note
    screenshot(browser, "serve-page-tokens.png")

    browser.find_element(By.ID, "tab-batch").click()
    lines = ["see you later at home", "URGENT claim your cash prize now 99999", "ok thanks"]
    browser.find_element(By.ID, "lines").send_keys("\n".join(lines))
    browser.find_element(By.ID, "classify").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#table tbody tr")) == 3)
    cells = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
             for tr in browser.find_elements(By.CSS_SELECTOR, "#table tbody tr")]  # fmt: skip
    predicted = load_classifier(runs["a"], device="cpu", precision="fp32").predict(lines)
    assert [c[1] for c in cells] == lines
    assert [c[2] for c in cells] == [p["label"] for p in predicted]
    assert browser.find_element(By.ID, "download").is_displayed()
    screenshot(browser, "serve-page-batch.png")


def test_page_uses_the_picked_run_and_shows_api_errors(server, browser, runs):
    browser.get(server)
    wait_for(browser, lambda d: "ham, spam" in d.find_element(By.ID, "info").text)
    picker = browser.find_element(By.ID, "run")
    picker.find_element(By.CSS_SELECTOR, "option[value=b]").click()
    wait_for(browser, lambda d: str(runs["b"]) in d.find_element(By.ID, "info").text)
    text = "urgent txt claim offer now"
    browser.find_element(By.ID, "text").send_keys(text)
    browser.find_element(By.ID, "classify").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#bars .bar"))
    expected = load_classifier(runs["b"], device="cpu", precision="fp32").predict([text])[0]
    shown = {b.get_attribute("data-label"): float(b.find_element(By.CLASS_NAME, "num").text)
             for b in browser.find_elements(By.CSS_SELECTOR, "#bars .bar")}  # fmt: skip
    assert all(abs(shown[k] - v) < 1e-4 for k, v in expected["probabilities"].items())

    browser.find_element(By.ID, "tab-batch").click()
    browser.find_element(By.ID, "lines").send_keys("\n".join(f"text {i}" for i in range(5)))
    browser.find_element(By.ID, "classify").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "error").text)
    error = browser.find_element(By.ID, "error").text
    assert error == '"inputs" holds 5 texts; this server takes at most 4 per request (--max-client-batch)'
    screenshot(browser, "serve-page-error.png")
