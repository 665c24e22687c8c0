"""The real app in a real browser: Debian's chromium driven by Playwright (no browser download).
Two tiny models side by side ('edge': every film borderline PNEUMONIA, P ~0.52 at threshold
0.5; 'sure-normal': P ~0.01), on a 1366x900 desktop and a 390x844 phone, light and dark.
Screenshots are kept beside this test, in tests/screenshots/ (git-ignored; CXR_SCREENSHOTS
moves them): desktop-answer.png and phone-answer.png show the page after a prediction."""

from __future__ import annotations

import io
import json
import os
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


DESKTOP, PHONE = (1366, 900), (390, 844)


@pytest.fixture(scope="module")
def shots():
    folder = Path(os.environ.get("CXR_SCREENSHOTS", Path(__file__).resolve().parent / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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


def open_page(browser, url, width=DESKTOP[0], height=DESKTOP[1], dark=False, downloads=False):
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)      # this shared 2-core machine can be slow
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=downloads,
                                  color_scheme="dark" if dark else "light")
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url + ("/?__theme=dark" if dark else ""), wait_until="domcontentloaded")
    page.locator("#cxr-predict").wait_for()
    page.wait_for_timeout(300)
    return page


CLIPPED_JS = """sel => { const out = []; const inside = (r, b) => r.left >= b.left - 1 && r.right <= b.right + 1
    && r.top >= b.top - 1 && r.bottom <= b.bottom + 1;
  for (const box of document.querySelectorAll(sel)) {
    const b = box.getBoundingClientRect();
    if (b.width === 0) continue;
    for (const el of box.querySelectorAll('svg, span, button, img, input, label, a, [data-testid=upload-text] *')) {
      const r = el.getBoundingClientRect();
      if (r.width === 0 || r.height === 0 || getComputedStyle(el).visibility === 'hidden') continue;
      if (!inside(r, b)) out.push(`${box.id}: ${el.tagName} "${(el.textContent || el.alt || '').trim().slice(0, 30)}"`);
    }
    for (const el of [box, ...box.querySelectorAll('*')]) {
      const cs = getComputedStyle(el);
      if ((cs.overflowX === 'auto' || cs.overflowX === 'scroll' || cs.overflowX === 'hidden')
          && el.scrollWidth > el.clientWidth + 2 && el.clientWidth > 0) {
        out.push(`${box.id}: ${el.className} scrolls sideways`);
      }
    }
  }
  return out; }"""


def assert_nothing_clipped(page, where: str):
    """The upload box, Predict, the example strip and the controls show whole: every icon, text,
    button and thumbnail lies inside its box, nothing scrolls sideways, the page is no wider
    than the screen."""
    clipped = page.evaluate(CLIPPED_JS, "#cxr-file, #cxr-predict, #cxr-examples")
    assert not clipped, f"{where}: {clipped}"
    width = page.viewport_size["width"]
    assert page.evaluate("document.documentElement.scrollWidth") <= width, f"{where}: the page scrolls sideways"
    for i in range(page.locator("#cxr-examples img").count()):
        box = page.locator("#cxr-examples img").nth(i).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, f"{where}: example film {i + 1} is cut off"
    upload_text = page.get_by_test_id("upload-text")
    if upload_text.count():
        assert page.evaluate("el => el.scrollHeight <= el.clientHeight + 1", upload_text.element_handle()), where


UNCOVERED_JS = """img => { const r = img.getBoundingClientRect(); const pts = [];
  for (const fy of [0.02, 0.08, 0.15, 0.5]) for (const fx of [0.05, 0.25, 0.5, 0.75, 0.95])
    pts.push([r.left + fx * r.width, r.top + fy * r.height]);
  return pts.filter(([x, y]) => y >= 0 && y < innerHeight)
    .every(([x, y]) => document.elementFromPoint(x, y) === img); }"""


def assert_film_uncovered(page, selector: str):
    """No label badge or button over the image: the top of the film (the lung apices) is the
    image itself at every probed point, and the block has no floating label."""
    img = page.locator(f"{selector} img")
    img.scroll_into_view_if_needed()
    assert page.locator(f"{selector} [data-testid=block-label]:visible").count() == 0, f"{selector} has a badge"
    assert page.evaluate(UNCOVERED_JS, img.element_handle()), f"something covers the top of {selector}"


def in_view(page, locator) -> bool:
    box = locator.bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= page.viewport_size["height"] + 1


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


def test_first_load_nothing_clipped_and_the_width_is_used(app_url, browser, shots):
    from playwright.sync_api import expect

    for (w, h), name in ((DESKTOP, "desktop"), (PHONE, "phone")):
        page = open_page(browser, app_url, w, h)
        expect(page.locator("#cxr-examples img")).to_have_count(6)
        page.wait_for_timeout(500)
        assert_nothing_clipped(page, f"{name} first load")
        note = page.locator("#cxr-note")                           # the answer's place is said, not empty
        expect(note).to_contain_text("The answer and its heat map appear here")
        if name == "desktop":                                       # the right-hand side is used at once
            film_col, result_col = page.locator("#cxr-file").bounding_box(), page.locator("#cxr-results").bounding_box()
            assert result_col["x"] > film_col["x"] + film_col["width"] and result_col["width"] > 0.45 * w
            assert page.locator("#cxr-examples").bounding_box()["y"] < h       # the examples on the first screen
        page.screenshot(path=str(shots / f"{name}-first-load.png"))
        assert not page.errors, page.errors
        page.context.close()


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
    assert_film_uncovered(page, "#cxr-film")
    assert "chest X-ray" in film.get_attribute("alt")             # alt text, not empty
    expect(predict).to_be_enabled()
    assert_nothing_clipped(page, "desktop after upload")
    page.screenshot(path=str(shots / "desktop-upload.png"))

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
    expect(film).to_be_visible()                                 # desktop: the whole film stays beside the maps
    for sel in ("#cxr-film", "#cxr-overlay-0", "#cxr-overlay-1"):
        assert_film_uncovered(page, sel)                          # no badge over the apices
    # each answer sits right above its own map
    for i in range(2):
        card, img = cards.nth(i).bounding_box(), page.locator(f"#cxr-overlay-{i} img").bounding_box()
        assert 0 <= img["y"] - (card["y"] + card["height"]) < 60
        assert card["x"] <= img["x"] + img["width"] / 2 <= card["x"] + card["width"]
    alt = o1.get_attribute("alt")
    assert "heat map for PNEUMONIA" in alt and "edge" in alt and "not a map of disease" in alt
    assert "without a map" not in alt and o2.get_attribute("alt")
    # the legend is true at this probability: a PNEUMONIA answer at P ~0.52 is drawn at full strength
    cap0, cap1 = page.locator("#cxr-caption-0"), page.locator("#cxr-caption-1")
    expect(cap0).to_contain_text("Grad-CAM for PNEUMONIA, drawn at full strength")
    expect(cap0).to_contain_text("not a map of disease")
    expect(cap1).to_contain_text("drawn at 2 % strength")         # P 0.01 of threshold 0.50
    assert page.locator("#cxr-caption-1 .cxr-colorbar-unused").count() == 1    # the unused part of the scale shown
    assert page.locator("#cxr-caption-0 .cxr-colorbar-unused").count() == 0
    expect(page.locator("#cxr-caption-0")).not_to_contain_text("no evidence")
    page.wait_for_timeout(500)
    assert chroma(o1) > 30                          # a visible map on the borderline PNEUMONIA answer
    assert chroma(o2) < 12                          # confident NORMAL: no strong blob
    # the file box is ready for the next film: no dead link to the deleted upload
    expect(page.get_by_test_id("upload-text")).to_be_visible()
    assert page.locator("#cxr-file a").count() == 0
    expect(predict).to_be_disabled()
    page.screenshot(path=str(shots / "desktop-answer.png"))
    for box in (page.get_by_test_id("cxr-headline").first, o1):
        assert in_view(page, box) or box.bounding_box()["y"] < 900, "answer and map on the first screen"
    page.screenshot(path=str(shots / "desktop-answer-full-page.png"), full_page=True)

    page.locator("#cxr-overlay-0").scroll_into_view_if_needed()
    page.get_by_label("Show heat map").uncheck()                 # hides the map, no new Predict
    page.wait_for_timeout(800)
    assert chroma(o1) < 12
    expect(page.locator("#cxr-caption-0")).to_be_hidden()
    expect(edge.get_by_test_id("cxr-headline")).to_have_text("PNEUMONIAborderline")   # the cards stay
    page.get_by_label("Show heat map").check()
    page.wait_for_timeout(800)
    strong = chroma(o1)
    number = page.locator("input[type=number]").first
    number.fill("0")                                             # typed value re-blends
    number.press("Enter")
    page.wait_for_timeout(800)
    assert chroma(o1) < 12 < strong

    # a second film straight away: no need to press x first
    second = tmp_path / "second.png"
    make_xray(8, False, size=120).save(second)
    upload(page, second)
    expect(page.get_by_test_id("cxr-card")).to_have_count(0)     # the old answers go
    expect(page.locator("#cxr-note")).to_contain_text("press Predict")
    page.wait_for_function("() => document.querySelector('#cxr-film img')?.naturalWidth === 120")
    expect(predict).to_be_enabled()
    predict.click()
    expect(page.get_by_test_id("cxr-card")).to_have_count(2)
    assert not page.errors, page.errors
    page.context.close()


def test_result_download_overlay_and_report(app_url, browser, tmp_path):
    from playwright.sync_api import expect

    page = open_page(browser, app_url, downloads=True)
    xray = tmp_path / "download-me.png"
    make_xray(5, True, size=128).save(xray)
    upload(page, xray)
    expect(page.locator("#cxr-predict")).to_be_enabled()
    page.locator("#cxr-predict").click()
    expect(page.get_by_test_id("cxr-card")).to_have_count(2)
    links = page.locator("#cxr-download a")
    expect(links).to_have_count(4)          # edge's overlay (sure-normal's too), the report, the answer
    got = {}
    for i in range(links.count()):
        with page.expect_download() as info:
            links.nth(i).click()
        d = info.value
        assert d.failure() is None, d.failure()
        got[d.suggested_filename] = Path(d.path()).read_bytes()
    assert set(got) == {"cxr-overlay-edge.png", "cxr-overlay-sure-normal.png", "cxr-report.md", "cxr-answer.json"}
    overlay = Image.open(io.BytesIO(got["cxr-overlay-edge.png"]))
    assert overlay.format == "PNG" and overlay.size == (128, 128)
    report = got["cxr-report.md"].decode()
    assert "download-me.png" in report and "**PNEUMONIA**" in report and "not a medical device" in report
    answer = json.loads(got["cxr-answer.json"])
    assert [m["decision"] for m in answer["models"]] == ["PNEUMONIA", "NORMAL"]
    assert not page.errors, page.errors
    page.context.close()


def test_example_click_predicts_then_reveals_its_label(app_url, browser, shots):
    from playwright.sync_api import expect

    from app.handlers import example_label, example_paths

    page = open_page(browser, app_url)
    thumbs = page.locator("#cxr-examples img")
    expect(thumbs).to_have_count(6)
    captions = page.locator("#cxr-examples").inner_text()
    assert "Film 1" in captions and "NORMAL" not in captions and "bacteria" not in captions
    expect(page.get_by_test_id("cxr-reveal")).to_have_count(0)     # no label before the answer
    thumbs.nth(1).click()
    cards = page.get_by_test_id("cxr-card")
    expect(cards).to_have_count(2)                 # the click ran both models on the example film
    # These tiny test models were fitted on synthetic films only: a real film is far from their
    # training data, so the honest answer is "Not analysed" with the film shown and no map.
    expect(cards.nth(0)).to_contain_text("Not analysed")
    expect(page.locator("#cxr-film img")).to_be_visible()
    expect(page.locator("#cxr-overlay-0 img")).to_have_count(0)
    reveal = page.get_by_test_id("cxr-reveal")
    label = example_label(example_paths()[1])
    expect(reveal).to_contain_text(f"labelled {label}")
    expect(reveal).to_contain_text("edge: not analysed")
    page.screenshot(path=str(shots / "desktop-example-click.png"), full_page=True)
    assert not page.errors, page.errors
    page.context.close()


def test_facts_panel_in_visitor_words(app_url, browser):
    from playwright.sync_api import expect

    page = open_page(browser, app_url)
    page.get_by_text("Learn: transfer learning, heat maps, and these models").click()
    facts = page.locator(".cxr-facts").first
    expect(facts).to_be_visible()
    text = facts.inner_text()
    for words in ("Set-aside films", "Cross-validated", "Another hospital's films", "cxr-calibrate",
                  "Specificity: the share of normal films it calls NORMAL", "Decision threshold"):
        assert words in text, words
    for internal in ("External data", "timm_wrapper", "no evidence"):
        assert internal not in page.locator("body").inner_text(), internal
    page.context.close()


def test_api_page_lists_every_field(app_url, browser):
    """The page's own link to the API page (?view=api) opens it, and it names and describes every
    field of the answer."""
    from playwright.sync_api import expect

    from cxr.api import FIELDS

    page = open_page(browser, app_url)
    href = page.locator("#cxr-api-links a", has_text="the API page").get_attribute("href")
    assert href == "?view=api"
    page.goto(app_url + "/" + href, wait_until="domcontentloaded")
    expect(page.get_by_text("handle_file").first).to_be_visible()
    body = " ".join(page.locator("body").inner_text().split())
    assert "/predict" in body and "show_heatmap" in body
    for name, description in FIELDS.items():
        assert f"{name}:" in body and " ".join(description.split())[:40] in body, name
    page.context.close()


def test_dark_mode_threshold_marker_is_readable(app_url, browser, tmp_path, shots):
    from playwright.sync_api import expect

    page = open_page(browser, app_url, dark=True)
    assert page.evaluate("document.body.classList.contains('dark') || "
                         "document.querySelector('.gradio-container').closest('.dark') !== null")
    xray = tmp_path / "dark.png"
    make_xray(7, True, size=160).save(xray)
    upload(page, xray)
    expect(page.locator("#cxr-predict")).to_be_enabled()
    page.locator("#cxr-predict").click()
    marker = page.get_by_test_id("cxr-threshold").first
    expect(marker).to_be_visible()
    ratio = page.evaluate("""m => { const lum = c => { const [r, g, b] = c.match(/[\\d.]+/g).slice(0, 3).map(Number)
          .map(v => v / 255).map(v => v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
          return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
      let bg = null; for (let el = m.closest('.cxr-card'); el; el = el.parentElement) {
        const c = getComputedStyle(el).backgroundColor;
        if (c && !c.endsWith(', 0)') && c !== 'transparent') { bg = c; break; } }
      const a = lum(getComputedStyle(m).backgroundColor), b = lum(bg || 'rgb(255, 255, 255)');
      return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); }""", marker.element_handle())
    assert ratio >= 4.5, f"threshold marker contrast {ratio:.1f} on the dark page"
    page.screenshot(path=str(shots / "desktop-dark-answer.png"))
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
    page.screenshot(path=str(shots / "desktop-photo-flagged.png"), full_page=True)

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
    page.screenshot(path=str(shots / "desktop-ct-dicom-refused.png"), full_page=True)
    assert not page.errors, page.errors
    page.context.close()


def test_phone_keeps_answer_and_map_together(app_url, browser, tmp_path, shots):
    from playwright.sync_api import expect

    page = open_page(browser, app_url, *PHONE)
    assert_nothing_clipped(page, "phone first load")
    xray = tmp_path / "phone.png"
    make_xray(11, True, size=400).save(xray)
    upload(page, xray)
    expect(page.locator("#cxr-film img")).to_be_visible()
    film = page.locator("#cxr-film img").bounding_box()
    assert film["y"] < PHONE[1]                                  # the film is on screen at upload
    assert_film_uncovered(page, "#cxr-film")
    page.screenshot(path=str(shots / "phone-upload.png"))
    page.locator("#cxr-predict").click()
    headline = page.get_by_test_id("cxr-headline").first
    expect(headline).to_have_text("PNEUMONIAborderline")
    overlay = page.locator("#cxr-overlay-0 img")
    expect(overlay).to_be_visible()
    page.wait_for_timeout(800)                                   # the page brings the answer into view
    assert in_view(page, headline), "the answer is off screen"
    box = headline.bounding_box()
    top = page.evaluate("([x, y]) => document.elementFromPoint(x, y).closest('[data-testid=cxr-headline]') !== null",
                        [box["x"] + 10, box["y"] + box["height"] / 2])
    assert top, "something covers the headline"
    assert in_view(page, overlay), "the map is not on the same screen as its answer"
    assert_film_uncovered(page, "#cxr-overlay-0")
    expect(page.locator("#cxr-film")).to_be_hidden()             # the map panel shows the film; no duplicate
    assert chroma(overlay) > 30
    assert_nothing_clipped(page, "phone after the answer")
    page.screenshot(path=str(shots / "phone-answer.png"))
    page.screenshot(path=str(shots / "phone-answer-full-page.png"), full_page=True)
    assert not page.errors, page.errors
    page.context.close()
