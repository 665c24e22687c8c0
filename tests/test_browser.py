"""The real app in a real browser: Debian's chromium driven by Playwright (no browser download).
Two tiny models side by side ('edge': every film borderline PNEUMONIA, P ~0.52 at threshold
0.5; 'sure-normal': P ~0.01), desktop and a 390x844 phone. Screenshots go to the test's tmp
folder (printed on failure)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.inference import Predictor
from tests.helpers import ROOT, greyscale_photo, make_dicom, make_model_folder, make_xray

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 60_000
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-proxy-server"]

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.is_file(),
                                 reason="/usr/bin/chromium is absent: apt-get install chromium (see .ci/run)")]


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from app import app as app_module

    root = tmp_path_factory.mktemp("models")
    folders = (make_model_folder(root / "edge", p_positive=0.52, threshold=0.5, name_seed=1),
               make_model_folder(root / "sure-normal", p_positive=0.01, threshold=0.5, name_seed=2))
    demo = app_module.create_demo([Predictor.from_pretrained(f, precision="fp32") for f in folders])
    _, url, _ = app_module.launch(demo, server_name="127.0.0.1", server_port=None, prevent_thread_lock=True,
                                  quiet=True)
    yield url.rstrip("/")
    demo.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def open_page(browser, url, width=1280, height=1000):
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)      # this shared 2-core machine can be slow
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=False)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url, wait_until="domcontentloaded")
    page.locator("#cxr-predict").wait_for()
    return page


def upload(page, path: Path):
    page.locator("#cxr-file input[type=file]").set_input_files(str(path))


PIXELS_JS = """img => { const c = document.createElement('canvas'); c.width = img.naturalWidth;
  c.height = img.naturalHeight; c.getContext('2d').drawImage(img, 0, 0); return c.toDataURL('image/png'); }"""


def chroma(img) -> float:
    """Colour saturation (max - min over RGB, 99.5th percentile) of the pixels an <img> shows,
    read back through a canvas: ~0 for a grey film, high where a heat map is drawn."""
    import base64

    url = img.evaluate(PIXELS_JS)
    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"), dtype=int)
    return float(np.percentile(a.max(-1) - a.min(-1), 99.5))


def test_upload_shows_film_then_side_by_side_answers(app_url, browser, tmp_path, shots):
    from playwright.sync_api import expect

    page = open_page(browser, app_url)
    predict = page.locator("#cxr-predict")
    expect(predict).to_be_disabled()                              # no file, no Predict
    xray = tmp_path / "film.png"
    make_xray(7, True, size=160).save(xray)
    upload(page, xray)
    film = page.locator("#cxr-film img")
    expect(film).to_be_visible()                                  # the film at upload, before Predict
    assert page.evaluate("img => img.complete && img.naturalWidth === 160", film.element_handle())
    expect(predict).to_be_enabled()
    page.screenshot(path=str(shots / "1-upload-shows-film.png"), full_page=True)

    predict.click()
    cards = page.get_by_test_id("cxr-card")
    expect(cards).to_have_count(2)                               # two models side by side
    edge, normal = cards.nth(0), cards.nth(1)
    expect(edge).to_contain_text("edge")
    expect(normal).to_contain_text("sure-normal")
    # the borderline film: headline, bar and threshold marker tell one story
    expect(edge.get_by_test_id("cxr-headline")).to_have_text("PNEUMONIAborderline")
    expect(edge).to_contain_text("at or above the model's threshold 0.50")
    marker = edge.get_by_test_id("cxr-threshold")
    expect(marker).to_be_visible()
    bar = edge.locator(".cxr-bar").bounding_box()
    fill = edge.locator(".cxr-fill").bounding_box()
    m = marker.bounding_box()
    assert abs((m["x"] + m["width"] / 2 - bar["x"]) / bar["width"] - 0.5) < 0.02    # marker at 0.50
    assert fill["width"] >= m["x"] - bar["x"]                                       # the bar reaches it
    expect(normal.get_by_test_id("cxr-headline")).to_have_text("NORMAL")
    o1, o2 = page.locator("#cxr-overlay-0 img"), page.locator("#cxr-overlay-1 img")
    expect(o1).to_be_visible()
    expect(o2).to_be_visible()
    expect(film).to_be_hidden()                                  # the panels show the film with its map
    expect(page.locator("#cxr-caption-0")).to_contain_text("Grad-CAM for PNEUMONIA")
    expect(page.locator("#cxr-caption-0")).to_contain_text("not a map of disease")
    page.wait_for_timeout(500)
    assert chroma(o1) > 30                          # a visible map on the borderline film
    assert chroma(o2) < 12                          # confident NORMAL: no strong blob
    page.screenshot(path=str(shots / "2-borderline-and-confident-normal.png"), full_page=True)

    page.locator("#cxr-overlay-0").scroll_into_view_if_needed()
    page.get_by_label("Show heat map").uncheck()                 # hides the map, no new Predict
    page.wait_for_timeout(800)
    assert chroma(o1) < 12
    expect(page.locator("#cxr-caption-0")).to_be_hidden()
    page.get_by_label("Show heat map").check()
    page.wait_for_timeout(800)
    strong = chroma(o1)
    slider = page.locator("#cxr-examples").locator("xpath=..").locator("input[type=range]")
    number = page.locator("input[type=number]").first
    number.fill("0")                                             # typed value re-blends
    number.press("Enter")
    page.wait_for_timeout(800)
    assert chroma(o1) < 12 < strong
    assert slider.count() >= 0
    assert not page.errors, page.errors
    page.context.close()


def test_example_click_predicts(app_url, browser, shots):
    from playwright.sync_api import expect

    page = open_page(browser, app_url)
    thumbs = page.locator("#cxr-examples img")
    expect(thumbs).to_have_count(6)
    captions = page.locator("#cxr-examples").inner_text()
    assert "Film 1" in captions and "NORMAL" not in captions and "bacteria" not in captions
    thumbs.nth(2).click()
    cards = page.get_by_test_id("cxr-card")
    expect(cards).to_have_count(2)                 # the click ran both models on the example film
    # These tiny test models were fitted on synthetic films only: a real film is far from their
    # training data, so the honest answer is "Not analysed" with the film shown and no map.
    expect(cards.nth(0)).to_contain_text("Not analysed")
    expect(page.locator("#cxr-film img")).to_be_visible()
    expect(page.locator("#cxr-overlay-0 img")).to_have_count(0)
    page.screenshot(path=str(shots / "3-example-click.png"), full_page=True)
    assert not page.errors, page.errors
    page.context.close()


def test_photo_and_ct_dicom_are_flagged_without_label_or_map(app_url, browser, tmp_path, shots):
    from playwright.sync_api import expect

    page = open_page(browser, app_url)
    photo = tmp_path / "portrait.png"
    greyscale_photo(4, size=160).save(photo)
    upload(page, photo)
    expect(page.locator("#cxr-film img")).to_be_visible()
    page.locator("#cxr-predict").click()
    cards = page.get_by_test_id("cxr-card")
    expect(cards).to_have_count(2)
    for i in range(2):
        expect(cards.nth(i)).to_have_attribute("data-decision", "none")
        expect(cards.nth(i)).to_contain_text("Not analysed")
        expect(cards.nth(i)).not_to_contain_text("PNEUMONIA")
        expect(page.locator(f"#cxr-overlay-{i} img")).to_have_count(0)
    expect(page.get_by_test_id("cxr-headline")).to_have_count(0)
    page.screenshot(path=str(shots / "4-greyscale-photo-flagged.png"), full_page=True)

    ct = tmp_path / "ct-slice.dcm"
    ct.write_bytes(make_dicom(np.asarray(greyscale_photo(6, 96), np.uint16)[..., 0] * 8, Modality="CT"))
    assert not page.errors, page.errors
    page.context.close()
    page = open_page(browser, app_url)
    upload(page, ct)
    notice = page.locator("#cxr-notice")
    expect(notice).to_contain_text("CT scan")
    expect(notice).to_contain_text("CR, DX or RG")
    expect(page.locator("#cxr-predict")).to_be_disabled()
    expect(page.get_by_test_id("cxr-card")).to_have_count(0)
    expect(page.locator("#cxr-overlay-0 img")).to_have_count(0)
    page.screenshot(path=str(shots / "5-ct-dicom-refused.png"), full_page=True)
    assert not page.errors, page.errors
    page.context.close()


def test_phone_shows_the_answer_without_scrolling(app_url, browser, tmp_path, shots):
    from playwright.sync_api import expect

    page = open_page(browser, app_url, 390, 844)
    xray = tmp_path / "phone.png"
    make_xray(11, True, size=400).save(xray)
    upload(page, xray)
    expect(page.locator("#cxr-film img")).to_be_visible()
    film = page.locator("#cxr-film img").bounding_box()
    assert film["y"] < 844                                       # the film is on screen at upload
    page.screenshot(path=str(shots / "6-phone-upload.png"))
    page.locator("#cxr-predict").click()
    headline = page.get_by_test_id("cxr-headline").first
    expect(headline).to_have_text("PNEUMONIAborderline")
    assert page.evaluate("window.scrollY") == 0
    box = headline.bounding_box()
    assert box["y"] >= 0 and box["y"] + box["height"] <= 844     # fully visible, not covered
    top = page.evaluate("([x, y]) => document.elementFromPoint(x, y).closest('[data-testid=cxr-headline]') !== null",
                        [box["x"] + 10, box["y"] + box["height"] / 2])
    assert top, "something covers the headline"
    page.screenshot(path=str(shots / "7-phone-answer.png"))
    assert not page.errors, page.errors
    page.context.close()
