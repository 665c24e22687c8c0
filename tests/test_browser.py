"""The real app in a real browser: Debian's chromium driven by Playwright (no browser download).
Upload an X-ray, press Predict, wait for the label and the overlay, keep a screenshot."""

import re
from pathlib import Path

import pytest

from cxr.inference import Predictor
from tests.helpers import ROOT, make_xray

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "test-output" / "browser"
TIMEOUT_MS = 60_000
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-proxy-server"]

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.is_file(),
                                 reason="/usr/bin/chromium is absent: apt-get install chromium (see .ci/run)")]


@pytest.fixture(scope="module")
def app_url(trained_folder):
    from app import app as app_module

    demo = app_module.create_demo(Predictor.from_pretrained(trained_folder, precision="fp32"))
    _, url, _ = app_module.launch(demo, server_name="127.0.0.1", server_port=None, prevent_thread_lock=True,
                                  quiet=True)
    yield url.rstrip("/")
    demo.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = tmp_path_factory.mktemp("chromium-profile")   # a fresh user-data-dir every run
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000}, accept_downloads=False)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()


def test_upload_predict_shows_label_overlay_and_disclaimer(app_url, page, tmp_path):
    from playwright.sync_api import expect

    xray = tmp_path / "synthetic-xray.png"
    make_xray(7, True, size=128).save(xray)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(app_url, wait_until="domcontentloaded")
    predict = page.get_by_role("button", name="Predict", exact=True)
    expect(predict).to_be_visible()

    page.locator("input[type=file]").first.set_input_files(str(xray))
    expect(page.get_by_text("synthetic-xray.png").first).to_be_visible()   # the upload finished
    predict.click()

    label = page.get_by_test_id("label-output-value")
    expect(label).to_have_text(re.compile(r"^\s*(NORMAL|PNEUMONIA)\s*$"))
    overlay_block = page.locator(".block").filter(
        has=page.get_by_test_id("block-label").filter(has_text="X-ray with attention map")).last
    overlay_img = overlay_block.locator("img").first
    expect(overlay_img).to_be_visible()
    assert page.evaluate("img => img.complete && img.naturalWidth > 0", overlay_img.element_handle())
    expect(page.get_by_text("Prediction:", exact=False).first).to_be_visible()
    expect(page.get_by_text("not a medical device").first).to_be_visible()

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "predict.png"), full_page=True)
    assert (SCREENSHOTS / "predict.png").stat().st_size > 10_000
    assert not errors, errors
