"""The real app in a real browser: Debian's chromium driven by Playwright (no browser download).
Two tiny models side by side ('edge': every film borderline PNEUMONIA, P ~0.52 at threshold
0.5; 'sure-normal': P ~0.01), on a 1366x900 desktop and a 390x844 phone, light and dark.
Screenshots are kept beside this test, in tests/screenshots/ (git-ignored; CXR_SCREENSHOTS
moves them): desktop-answer.png and phone-answer.png show the page after a prediction.
A second page serves three tiny models laid out as a checkout's models/ will be (the default
first, a second binary model, a NORMAL/BACTERIAL/VIRAL one): desktop-3-models-answer.png,
phone-3-models-answer.png, phone-3-models-multiclass.png, desktop-dark-3-models-answer.png."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.inference import Predictor
from tests.helpers import greyscale_photo, make_dicom, make_model_folder, make_xray

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


THUMBS_COVERED_JS = """() => { const gallery = document.querySelector('#cxr-examples');
  const labels = [...gallery.querySelectorAll('[data-testid=block-label]')].filter(e => e.offsetWidth > 0);
  return [...gallery.querySelectorAll('img')].flatMap((img, i) => {
    const r = img.getBoundingClientRect();
    const hit = [0.1, 0.5].map(fy => document.elementFromPoint(r.left + r.width / 2, r.top + fy * r.height))
      .filter(e => e !== img).map(e => `film ${i + 1} under ${e.tagName} "${(e.textContent || '').trim().slice(0, 30)}"`);
    // the label lets the pointer through (pointer-events: none), so its box is compared too
    const over = labels.filter(l => { const b = l.getBoundingClientRect();
      return Math.min(r.right, b.right) - Math.max(r.left, b.left) > 2 && Math.min(r.bottom, b.bottom) - Math.max(r.top, b.top) > 2; })
      .map(l => `film ${i + 1} under the label "${l.textContent.trim().slice(0, 30)}"`);
    return [...hit, ...over]; }); }"""


def assert_examples_uncovered(page, where: str):
    """Nothing (the gallery's label, a caption) lies over the top or the middle of an example film."""
    page.locator("#cxr-examples").scroll_into_view_if_needed()
    page.wait_for_timeout(200)
    covered = page.evaluate(THUMBS_COVERED_JS)
    assert not covered, f"{where}: {covered}"


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
        assert_examples_uncovered(page, f"{name} first load")
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

    from app.handlers import api_predict
    from cxr.api import FIELDS, FINDING_FIELDS, SCREENING_FIELDS
    from gradio.utils import get_function_description

    page = open_page(browser, app_url)
    href = page.locator("#cxr-api-links a", has_text="the API page").get_attribute("href")
    assert href == "?view=api"
    page.goto(app_url + "/" + href, wait_until="domcontentloaded")
    expect(page.get_by_text("handle_file").first).to_be_visible()
    body = " ".join(page.locator("body").inner_text().split())
    assert "/predict" in body and "show_heatmap" in body
    for name, description in (*FIELDS.items(), *FINDING_FIELDS.items(), *SCREENING_FIELDS.items()):
        assert f"{name}:" in body and " ".join(description.split())[:40] in body, name
    _, params, _ = get_function_description(api_predict)     # every argument, heatmap_class (#29) too
    assert list(params)[:3] == ["file", "show_heatmap", "heatmap_class"]
    for name in ("file", "show_heatmap", "heatmap_class"):
        assert name in body and " ".join(params[name].split())[:50] in body, name
    assert "Accepts 3 parameters" in body and "heatmap_class=None" in body
    assert "Research and education only: not a medical device. A plain-HTTP alternative" in body   # its own words
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
    assert_results_whole(page, "phone after the answer")
    page.screenshot(path=str(shots / "phone-answer.png"))
    page.screenshot(path=str(shots / "phone-answer-full-page.png"), full_page=True)
    assert not page.errors, page.errors
    page.context.close()


# ------------------------------------------------------------------ three shipped models (issue #29)
# The layout a checkout will serve once the lead adds the three-class model: the shipped default
# (binary) first, then every other models/ folder by name - a second binary model and the
# NORMAL/BACTERIAL/VIRAL one - chosen by the app's own rule (app.shipped_models), under the real
# folder names (long ones: the chooser and the cards must hold them). Tiny models, so no figure of
# a shipped model is pinned here.

DEFAULT = "efficientnet-lite0-imagenet-full"
SHIPPED3 = (DEFAULT, "cxr-resnet-small-scratch", "efficientnet-lite0-imagenet-3class")


@pytest.fixture(scope="module")
def three_url(tmp_path_factory):
    import cxr.locate
    from app import app as app_module
    from tests.test_label_sets_serving import LOGITS3, THREE, make_label_set_folder, multiclass_op

    models = tmp_path_factory.mktemp("shipped") / "models"
    make_model_folder(models / SHIPPED3[0], p_positive=0.52, threshold=0.5, name_seed=1)
    make_model_folder(models / SHIPPED3[1], p_positive=0.01, threshold=0.5, name_seed=2)
    make_label_set_folder(models / SHIPPED3[2], THREE, multiclass_op(), logits=LOGITS3,
                          problem_type="single_label_classification")
    with pytest.MonkeyPatch.context() as mp:
        for var in (*cxr.locate.MODEL_ENV, app_module.SHIPPED_ENV):
            mp.delenv(var, raising=False)
        mp.setattr(cxr.locate, "resolve_model", lambda *a, **k: str(models / DEFAULT))
        specs = app_module.shipped_models()
    assert specs == [None, str(models / SHIPPED3[1]), str(models / SHIPPED3[2])]   # the default first
    demo = app_module.create_demo([Predictor.from_pretrained(s or models / DEFAULT, precision="fp32")
                                   for s in specs])
    _, url, _ = app_module.launch(demo, server_name="127.0.0.1", server_port=None, prevent_thread_lock=True,
                                  quiet=True)
    yield url.rstrip("/")
    demo.close()


def assert_results_whole(page, where: str):
    """The model chooser and every shown card, map and caption lie inside their boxes; no
    card's text runs past its card."""
    clipped = page.evaluate(CLIPPED_JS, "#cxr-models, #cxr-results")
    assert not clipped, f"{where}: {clipped}"
    over = page.evaluate("""() => [...document.querySelectorAll('.cxr-card')].filter(c => c.offsetWidth > 0)
        .filter(c => c.scrollWidth > c.clientWidth + 1 || [...c.querySelectorAll('*')].some(e => {
            const r = e.getBoundingClientRect(), b = c.getBoundingClientRect();
            return r.width > 0 && (r.left < b.left - 1 || r.right > b.right + 1); }))
        .map(c => c.querySelector('.cxr-model')?.textContent)""")
    assert not over, f"{where}: text runs out of the card of {over}"


def predict_film(page, tmp_path, name="film.png", size=160):
    from playwright.sync_api import expect

    xray = tmp_path / name
    make_xray(7, True, size=size).save(xray)
    upload(page, xray)
    expect(page.locator("#cxr-predict")).to_be_enabled()
    page.locator("#cxr-predict").click()
    expect(page.get_by_test_id("cxr-card")).to_have_count(3)


def test_three_models_chooser_default_first_and_a_multiclass_card(three_url, browser, tmp_path, shots):
    from playwright.sync_api import expect

    page = open_page(browser, three_url)
    chooser = page.locator("#cxr-models")
    expect(chooser).to_be_visible()
    boxes = chooser.locator("input[type=checkbox]")
    expect(boxes).to_have_count(3)
    assert [" ".join(t.split()) for t in chooser.locator("label").all_inner_texts()][-3:] == list(SHIPPED3)
    assert all(boxes.nth(i).is_checked() for i in range(3))           # every model shown at first
    expect(page.locator("#cxr-header")).to_contain_text("not a medical device")
    expect(page.locator("#cxr-header h1")).to_contain_text("3 models side by side")
    assert_nothing_clipped(page, "desktop, 3 models, first load")
    assert_results_whole(page, "desktop, 3 models, first load")

    predict_film(page, tmp_path)
    cards = page.get_by_test_id("cxr-card")
    for i, name in enumerate(SHIPPED3):                                # cards in the chooser's order
        expect(cards.nth(i).locator(".cxr-model")).to_have_text(name)
    expect(cards.nth(0).get_by_test_id("cxr-headline")).to_have_text("PNEUMONIAborderline")
    expect(cards.nth(1).get_by_test_id("cxr-headline")).to_have_text("NORMAL")
    three = cards.nth(2)
    expect(three).to_have_attribute("data-task", "multiclass")
    expect(three.get_by_test_id("cxr-headline")).to_have_text("BACTERIAL")
    rows = three.get_by_test_id("cxr-finding")
    expect(rows).to_have_count(3)                                      # every class, its probability
    assert [rows.nth(i).get_attribute("data-label") for i in range(3)] == ["NORMAL", "BACTERIAL", "VIRAL"]
    probs = [float(rows.nth(i).locator("span").last.inner_text()) for i in range(3)]
    assert abs(sum(probs) - 1) <= 0.02 and max(probs) == probs[1]
    assert [rows.nth(i).get_attribute("data-present") for i in range(3)] == ["false", "true", "false"]
    for i in range(3):                                                  # each bar as long as its probability
        bar, fill = rows.nth(i).locator(".cxr-minibar").bounding_box(), rows.nth(i).locator(".cxr-fill").bounding_box()
        assert abs(fill["width"] / bar["width"] - probs[i]) < 0.03
    expect(three.get_by_test_id("cxr-screening")).to_contain_text("abnormal")
    expect(three).to_contain_text("The class with the highest probability decides")
    for i in range(3):                                                  # a map under every answer, none covered
        expect(page.locator(f"#cxr-overlay-{i} img")).to_be_visible()
        assert_film_uncovered(page, f"#cxr-overlay-{i}")
        card, img = cards.nth(i).bounding_box(), page.locator(f"#cxr-overlay-{i} img").bounding_box()
        assert 0 <= img["y"] - (card["y"] + card["height"]) < 60         # the map right under its own answer
        assert card["x"] <= img["x"] + img["width"] / 2 <= card["x"] + card["width"]
    page.screenshot(path=str(shots / "desktop-3-models-answer.png"))
    page.screenshot(path=str(shots / "desktop-3-models-answer-full-page.png"), full_page=True)
    tops = [cards.nth(i).bounding_box()["y"] for i in range(3)]
    assert max(tops) - min(tops) < 2, "the three answers are not side by side on the desktop"
    assert page.locator("#cxr-map-class-0").is_hidden() and page.locator("#cxr-map-class-1").is_hidden()
    assert_nothing_clipped(page, "desktop, 3 models, answer")
    assert_results_whole(page, "desktop, 3 models, answer")

    # the three-class model's map, class by class: drawn again from the stored maps
    caption, overlay = page.locator("#cxr-caption-2"), page.locator("#cxr-overlay-2 img")
    expect(caption).to_contain_text("for BACTERIAL, drawn at full strength")
    choice = page.locator("#cxr-map-class-2")
    expect(choice).to_be_visible()
    before = overlay.evaluate(PIXELS_JS)
    choice.locator("input").click()
    page.get_by_role("option", name="VIRAL").click()
    expect(caption).to_contain_text("for VIRAL")
    expect(caption).to_contain_text("% strength: the probability of VIRAL")
    expect(overlay).to_have_attribute("alt", re.compile("heat map for VIRAL"))
    page.wait_for_timeout(500)
    assert overlay.evaluate(PIXELS_JS) != before                       # another map is drawn
    expect(three.get_by_test_id("cxr-headline")).to_have_text("BACTERIAL")   # the answer stays
    assert_results_whole(page, "desktop, 3 models, VIRAL map")

    # the chooser hides a model's panel and brings it back, no new prediction
    files = page.locator("#cxr-download a[download]")
    expect(files).to_have_count(5)                                      # 3 overlays, the report, the answer
    boxes.nth(1).uncheck()
    expect(page.get_by_test_id("cxr-card")).to_have_count(2)
    expect(files).to_have_count(4)                                      # the result files follow the choice
    assert f"cxr-overlay-{SHIPPED3[1]}.png" not in [files.nth(i).get_attribute("download") for i in range(4)]
    expect(page.locator("#cxr-overlay-1 img")).to_have_count(0)
    expect(page.get_by_test_id("cxr-card").nth(1)).to_have_attribute("data-task", "multiclass")
    assert_results_whole(page, "desktop, 2 of 3 models")
    boxes.nth(1).check()
    expect(page.get_by_test_id("cxr-card")).to_have_count(3)
    expect(page.get_by_test_id("cxr-card").nth(1).locator(".cxr-model")).to_have_text(SHIPPED3[1])
    assert not page.errors, page.errors
    page.context.close()


def test_three_models_on_the_phone_and_in_the_dark(three_url, browser, tmp_path, shots):
    from playwright.sync_api import expect

    page = open_page(browser, three_url, *PHONE)
    assert_nothing_clipped(page, "phone, 3 models, first load")
    assert_results_whole(page, "phone, 3 models, first load")
    assert_examples_uncovered(page, "phone, 3 models, first load")
    predict_film(page, tmp_path, size=400)
    headline = page.get_by_test_id("cxr-headline").first
    overlay = page.locator("#cxr-overlay-0 img")
    expect(overlay).to_be_visible()
    page.wait_for_timeout(800)                                   # the page brings the first answer into view
    assert in_view(page, headline) and in_view(page, overlay), "answer and map are not on one phone screen"
    assert_results_whole(page, "phone, 3 models, answer")
    assert_nothing_clipped(page, "phone, 3 models, answer")
    page.screenshot(path=str(shots / "phone-3-models-answer.png"))
    three = page.get_by_test_id("cxr-card").nth(2)
    three.scroll_into_view_if_needed()
    expect(three.get_by_test_id("cxr-finding")).to_have_count(3)
    map3 = page.locator("#cxr-overlay-2 img")
    map3.scroll_into_view_if_needed()
    box, card = map3.bounding_box(), three.bounding_box()
    assert box["y"] + min(box["height"], 200) <= PHONE[1] and card["y"] + card["height"] >= 0, \
        "the three-class answer and its map are not together"
    assert_film_uncovered(page, "#cxr-overlay-2")
    page.screenshot(path=str(shots / "phone-3-models-multiclass.png"))
    page.screenshot(path=str(shots / "phone-3-models-answer-full-page.png"), full_page=True)
    assert not page.errors, page.errors
    page.context.close()

    page = open_page(browser, three_url, dark=True)
    predict_film(page, tmp_path, name="dark3.png")
    three = page.get_by_test_id("cxr-card").nth(2)
    for el in (three.get_by_test_id("cxr-headline"), three.get_by_test_id("cxr-finding").nth(0),
               three.get_by_test_id("cxr-screening"), page.locator("#cxr-caption-2")):
        assert contrast(page, el, text=True) >= 4.5, f"{el} is hard to read on the dark page"
    for i in range(3):                                           # every bar's fill stands out from its track
        assert contrast(page, three.locator(".cxr-fill").nth(i), against=".cxr-minibar") >= 1.4
    assert contrast(page, page.get_by_test_id("cxr-threshold").first) >= 4.5
    page.screenshot(path=str(shots / "desktop-dark-3-models-answer.png"))
    assert not page.errors, page.errors
    page.context.close()


CONTRAST_JS = """([el, text, against]) => { const rgb = c => c.match(/[\\d.]+/g).map(Number);
  const lum = c => rgb(c).slice(0, 3).map(v => v / 255)
      .map(v => v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4)
      .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
  const opaque = c => c && c !== 'transparent' && !(rgb(c).length > 3 && rgb(c)[3] === 0);
  let bg = null;
  for (let e = against ? el.closest(against) : el.parentElement; e; e = e.parentElement) {
    const c = getComputedStyle(e).backgroundColor; if (opaque(c)) { bg = c; break; } }
  const fg = text ? getComputedStyle(el).color : getComputedStyle(el).backgroundColor;
  const a = lum(fg), b = lum(bg || 'rgb(255, 255, 255)');
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); }"""


def contrast(page, locator, *, text: bool = False, against: str | None = None) -> float:
    """WCAG contrast of an element's text colour (``text``) or background against the first
    opaque background behind it (``against``: from that ancestor up)."""
    return page.evaluate(CONTRAST_JS, [locator.element_handle(), text, against])
