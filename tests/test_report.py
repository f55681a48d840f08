"""Rendering and the HTML reports, opened from the file system in headless Chromium.

With NOTAGEN_SCREENSHOTS=docs/images the browser test saves each page's screenshot there.
"""

import json
import os
import pathlib
import subprocess
import sys
import urllib.parse
import urllib.request

import ml_collections
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from notagen_jax import dpo_loop
from notagen_jax import generation
from notagen_jax import render
from notagen_jax import report
from notagen_jax import sampling
from notagen_jax.scoring import preferences
from notagen_jax.scoring import symbolic

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT = "%Baroque\n%Bach, Johann Sebastian\n%Choral\n"
BROKEN = PROMPT + "not music at all\n"


@pytest.fixture(scope="module")
def texts(golden_dir):
  """Three Bach chorales in generation form (music21's corpus through the data path)."""
  cases = json.loads((golden_dir / "cases.json").read_text())["cases"]
  return [case["stream_text"] for case in cases]


def _write(texts, out, formats=("xml", "mid")):
  out.mkdir(parents=True, exist_ok=True)
  return [generation.write_piece(sampling.Result(i, PROMPT, text, True, "", 10, 0, 1.0), out,
                                 f"piece_{i:05d}", formats) for i, text in enumerate(texts)]


def _screenshot(browser, name: str):
  folder = os.environ.get("NOTAGEN_SCREENSHOTS")
  if folder:
    browser.execute_script("window.scrollTo(0, 0)")
    WebDriverWait(browser, 60).until(lambda b: b.execute_script(  # the score pages in view
        "return [...document.images].every(i => i.getBoundingClientRect().top > innerHeight"
        " || (i.complete && i.naturalWidth > 0))"))
    # Loaded is not yet painted: once a shot showed a first system without its key signatures.
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all([...document.images].filter(i => i.complete).map(i => i.decode()))"
        ".then(() => requestAnimationFrame(() => requestAnimationFrame(done)));")
    (REPO / folder).mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(REPO / folder / name))


def _open(browser, page: pathlib.Path, screenshot: str):
  browser.get(page.as_uri())
  assert browser.find_element(By.TAG_NAME, "h1").text
  _screenshot(browser, screenshot)
  for link in browser.find_elements(By.CSS_SELECTOR, "a[href]"):
    href = link.get_dom_attribute("href")
    if not href.startswith("#"):
      target = page.parent / urllib.parse.unquote(href)
      assert target.is_file(), href
  return browser.find_elements(By.CSS_SELECTOR, "section.piece")


def _notes(browser, section) -> int:
  """The notes on a piece's score pages, each page an SVG image that the browser loaded."""
  notes = 0
  for image in section.find_elements(By.CSS_SELECTOR, "div.page img"):
    browser.execute_script("arguments[0].scrollIntoView()", image)  # loaded once in view
    WebDriverWait(browser, 60).until(lambda b, image=image: b.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", image))
    with urllib.request.urlopen(image.get_attribute("src")) as page:
      notes += page.read().decode().count('class="note"')
  return notes


def _first_system_key_accidentals(page: str) -> int:
  return page.split('class="system"')[1].count('class="keyAccid"')


def test_a_real_piece_renders_to_pages_with_notes(texts, tmp_path):
  written = _write(texts[:1], tmp_path)[0]
  rendered = render.render_piece(written.files, tmp_path, written.name)
  assert rendered.error == "" and rendered.pages
  assert all(page.startswith("<svg") for page in rendered.pages)
  assert (tmp_path / "piece_00000.page1.svg").read_text() == rendered.pages[0]
  # BWV 1.6 in F: one flat on each of its five staves in the first system.
  assert _first_system_key_accidentals(rendered.pages[0]) == 5
  # Debian's fluidsynth and fluid-soundfont-gm are installed wherever the tests run (.ci/run).
  assert (tmp_path / "piece_00000.ogg").read_bytes()[:4] == b"OggS"
  # Without MusicXML, the MusicXML its un-reduced ABC converts to is engraved: Verovio's own ABC
  # reader put the voices on one staff under an empty key signature.
  abc_only = {k: v for k, v in written.files.items() if k in ("abc", "unreduced")}
  pages = render.svg_pages(render.score_source(abc_only))
  assert _first_system_key_accidentals(pages[0]) == 5
  with pytest.raises(render.RenderError, match="Verovio could not read it"):
    render.svg_pages("not music")
  with pytest.raises(render.RenderError, match="no MusicXML or un-reduced ABC"):
    render.score_source({"abc": written.files["abc"]})


def test_without_verovio_a_piece_says_which_extra_to_install(texts, tmp_path, monkeypatch):
  written = _write(texts[:1], tmp_path)[0]
  monkeypatch.setitem(sys.modules, "verovio", None)  # as if not installed
  rendered = render.render_piece(written.files, tmp_path, written.name, audio=False)
  assert (rendered.pages, rendered.files) == ([], {})
  assert rendered.error == "verovio is not installed (pip install 'notagen-jax[render]')"


def test_html_is_escaped():
  piece = report.Piece("a<b", [], {"ABC": "x y&.abc"}, {"k": "<i>"}, ["<script>"], "%<p>")
  page = report.index_html("t<", {"s": "<v>"}, [piece])
  assert "<script>" not in page and "&lt;script&gt;" in page and "<i>" not in page
  assert 'href="x%20y%26.abc"' in page and 'id="a&lt;b"' in page


def test_filter_verdicts_as_recorded_or_read_again(texts):
  recorded = {"verdicts": {"aligned": [True, False], "grouped": [True, True],
                           "original": [False, True]}}
  assert report.verdicts(recorded, 1, "", False, ()) == {
      "aligned": False, "grouped": True, "original": True}
  # A scores.json from before the loop recorded them: `aligned` and `grouped` are read off the
  # text again; `original` is known only for a chosen piece that had to pass it.
  assert report.verdicts({}, 0, texts[0], True, preferences.FILTERS) == {
      "aligned": True, "grouped": True, "original": True}
  assert report.verdicts({}, 0, BROKEN, True, ("aligned",)) == {
      "aligned": False, "grouped": True, "original": None}
  assert report.filter_results({"aligned": True, "grouped": False, "original": None},
                               preferences.FILTERS) == {
      "aligned": "passed", "grouped": "failed", "original": "not recorded"}
  assert report.filter_results({"aligned": False, "grouped": None}, ("original",)) == {
      "aligned": "failed (not applied)", "grouped": "not applied", "original": "not recorded"}


def test_mean_and_error():
  assert report.mean_and_error([None, float("nan")]) is None
  assert report.mean_and_error([0.5]) == (0.5, 0.0)
  mean, error = report.mean_and_error([0.2, 0.4, None])
  assert mean == pytest.approx(0.3) and error == pytest.approx(0.1)


def test_generate_writes_an_index_that_opens_in_a_browser(golden_dir, browser, tmp_path):
  out = tmp_path / "tiny_model"  # the page's title
  subprocess.run(
      [sys.executable, "-m", "notagen_jax.generate", f"--checkpoint={golden_dir / 'tiny.pth'}",
       f"--output={out}", "--period=Baroque", "--composer=Bach, Johann Sebastian",
       "--instrumentation=Choral", "--num_pieces=2", "--batch=2", "--max_patches=4",
       "--noconstrained"], cwd=REPO, capture_output=True, text=True, check=True)
  sections = _open(browser, out / "index.html", "generate_tiny_model.png")
  # Unconstrained, the tiny random model writes noise: both pieces are shown, failed, with their
  # reasons.
  assert [s.get_attribute("id") for s in sections] == ["piece_00000", "piece_00001"]
  for section in sections:
    assert "failed" in section.get_attribute("class")
    assert "no tune body" in section.find_element(By.CLASS_NAME, "reason").text
  assert "top_k" in browser.find_element(By.TAG_NAME, "table").text


def test_an_index_of_real_pieces_shows_every_score(texts, browser, tmp_path):
  out = tmp_path / "bach_chorales"
  written = _write(texts + [BROKEN], out)
  report.write_index(out, written, [PROMPT] * len(written), {"seed": 0})
  sections = _open(browser, out / "index.html", "index.png")
  assert len(sections) == 4
  for section in sections[:3]:
    assert "failed" not in section.get_attribute("class") and _notes(browser, section)
    assert section.find_element(By.TAG_NAME, "audio")
  assert not _notes(browser, sections[3])
  assert "un-reduced ABC: no tune body" in sections[3].find_element(By.CLASS_NAME, "reason").text
  failures = browser.find_element(By.CSS_SELECTOR, "ul.failures").text
  assert failures.startswith("piece_00003: un-reduced ABC: no tune body")


def test_the_dpo_report_shows_each_iterations_pairs(texts, browser, tmp_path):
  workdir = tmp_path / "clamp_dpo"
  c = ml_collections.ConfigDict({"select": {"fraction": 0.5, "score_malformed": True,
                                            "filters": ["aligned", "grouped"]},
                                 "scorer": {"max_similarity": 0.95},
                                 "sample": {"num_pieces": len(texts) + 1}})
  embedder = symbolic.SymbolicEmbedder()
  truth = preferences.ground_truth_features(texts, embedder)
  rows = []
  # Iteration 1 wrote no MusicXML: its pieces are engraved from their un-reduced ABC. The broken
  # piece cannot be scored (the symbolic embedder reads no notes in it) and is in no pair.
  for k, formats in enumerate([("xml",), ()]):
    out = workdir / f"iteration_{k}"
    pieces = texts + [BROKEN]
    written = _write(pieces, out / "samples", formats)
    samples = {"summary": generation.summary(written),
               "pieces": [{"abc": w.files["abc"], "ok": w.ok, "musicxml": "xml" in w.files}
                          for w in written]}
    (out / "samples" / "samples.json").write_text(json.dumps(samples))
    scores = dpo_loop.score(c, pieces, embedder, [truth], out)
    rows.append(dpo_loop.row(k, samples, scores))
  report.write_dpo_report(workdir, rows, dpo_loop.COLUMNS, embedder.name, ("aligned", "grouped"))
  sections = _open(browser, workdir / "report.html", "clamp_dpo_report.png")
  assert len(browser.find_elements(By.CSS_SELECTOR, "svg.plot line.error")) == 2
  table = browser.find_element(By.TAG_NAME, "table").text.splitlines()
  assert table[0].split() == list(dpo_loop.COLUMNS) and len(table) == 3
  chosen = browser.find_elements(By.CSS_SELECTOR, "div.chosen section.piece")
  rejected = browser.find_elements(By.CSS_SELECTOR, "div.rejected section.piece")
  assert len(chosen) == len(rejected) == 2 and len(sections) == 4
  # Each piece's verdicts as the loop recorded them, those of the filter not applied too: the
  # chorales are the ground truth itself, so none is original.
  for section in sections:
    assert _notes(browser, section) and "failed" not in section.get_attribute("class")
    assert ("aligned: passed · grouped: passed · original: failed (not applied)"
            in section.text)
  assert [s.get_attribute("id") for s in chosen + rejected] == [
      "iteration_0/piece_00001", "iteration_1/piece_00001", "iteration_0/piece_00002",
      "iteration_1/piece_00002"]
