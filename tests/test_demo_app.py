"""The demo page in headless Chromium: pick a prompt, generate, find the score and the files.

With NOTAGEN_SCREENSHOTS=docs/images the first test saves the page's screenshot there.
"""

import base64
import json
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from selenium.webdriver.support.ui import WebDriverWait

from notagen_jax import checkpoint
from notagen_jax import constraint
from notagen_jax import demo_app
from notagen_jax import generation
from notagen_jax import sampling
from notagen_jax.data import corpus
from test_report import _notes, _screenshot

BACH = ("Baroque", "Bach, Johann Sebastian", "Choral")
KNOWN = {BACH, ("Baroque", "Bach, Johann Sebastian", "Keyboard"),
         ("Classical", "Mozart", "Keyboard")}


@pytest.fixture(scope="module")
def tiny(golden_dir):
  return checkpoint.load_model(golden_dir / "tiny.pth")


@pytest.fixture
def url(tiny, tmp_path):
  demo = demo_app.Demo(tiny, tmp_path, KNOWN)
  server = demo_app.server(demo, port=0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{server.server_port}/"
  server.shutdown()


def test_choices_offer_only_known_combinations():
  assert demo_app.choices(KNOWN) == {
      "Baroque": {"Bach, Johann Sebastian": ["Choral", "Keyboard"]},
      "Classical": {"Mozart": ["Keyboard"]}}


def test_choices_list_the_most_pieces_first():
  pieces = {BACH: 5, ("Baroque", "Bach, Johann Sebastian", "Keyboard"): 6,
            ("Baroque", "Handel", "Organ"): 10, ("Classical", "Mozart", "Keyboard"): 20,
            ("Classical", "Haydn", "Keyboard"): 2}
  tree = demo_app.choices(pieces)
  # Classical's 22 pieces before Baroque's 21, Bach's 11 before Handel's 10, Keyboard's 6 before
  # Choral's 5.
  assert list(tree) == ["Classical", "Baroque"]
  assert list(tree["Classical"]) == ["Mozart", "Haydn"]
  assert tree["Baroque"] == {"Bach, Johann Sebastian": ["Keyboard", "Choral"], "Handel": ["Organ"]}


def _generate(browser, url, prompt, **fields):
  browser.get(url)
  menus = [Select(browser.find_element(By.ID, field))
           for field in ("period", "composer", "instrumentation")]
  # The menus are linked: Classical offers Mozart alone.
  menus[0].select_by_visible_text("Classical")
  assert [o.text for o in menus[1].options] == ["Mozart"]
  for menu, choice in zip(menus, prompt):
    menu.select_by_visible_text(choice)
  for name, value in fields.items():
    field = browser.find_element(By.ID, name)
    if field.get_attribute("type") != "file":
      field.clear()
    field.send_keys(str(value))
  browser.find_element(By.ID, "generate").click()
  WebDriverWait(browser, 300).until(
      lambda b: b.find_elements(By.CSS_SELECTOR, "#piece section.piece")
      or "failed:" in b.find_element(By.ID, "log").text)
  return browser.find_element(By.CSS_SELECTOR, "#piece section.piece")


def _links_work(section, url):
  links = section.find_elements(By.CSS_SELECTOR, "a[href]")
  assert links
  for link in links:
    with urllib.request.urlopen(link.get_attribute("href")) as response:
      assert response.status == 200 and response.read()
  return [link.text for link in links]


def test_a_generated_piece_is_engraved_played_and_downloadable(browser, url, golden_dir,
                                                              monkeypatch):
  # A real chorale stands in for what the tiny random model would write (noise, not engraved).
  text = json.loads((golden_dir / "cases.json").read_text())["cases"][0]["stream_text"]

  def run(self, prompts, seed=0, on_result=None, header=None, indices=None, on_patches=None):
    assert self.settings.constrained and header is None and indices == [0]
    on_patches([sampling.Piece(0, "", False, 0.0, text=[text], patches=8)])
    results = [sampling.Result(0, prompts[0], text, True, "", 10, 0, 0.1)]
    on_result(results[0])
    return results

  monkeypatch.setattr(sampling.Sampler, "run", run)
  section = _generate(browser, url, BACH, seed=3)
  _screenshot(browser, "demo.png")
  assert _notes(browser, section) and section.find_element(By.TAG_NAME, "audio")
  assert {"ABC", "MusicXML", "MIDI", "audio (Ogg)"} <= set(_links_work(section, url))
  log = browser.find_element(By.ID, "log").text
  assert "generating Baroque / Bach, Johann Sebastian / Choral: top-k 9" in log
  assert f"drawing: 8 patches, {len(text)} characters so far" in log
  assert "engraved: 2 pages" in log


# The demo draws one row at a time: its tests (and test_cli's continuation) share one worker, where
# the constrained sampler compiled for the first is read back from the run's compilation cache.
@pytest.mark.xdist_group("constrained_batch_1")
def test_the_tiny_model_continues_an_uploaded_score(browser, url):
  score = corpus.music21_corpus_root() / "bach" / "bwv1.6.mxl"
  section = _generate(browser, url, BACH, upload=score, bars=2, max_patches=2)
  log = browser.find_element(By.ID, "log").text
  assert "continuing bwv1.6.mxl" in log and "written: " in log
  assert "ABC (as generated)" in _links_work(section, url)
  # Its two patches of noise may or may not convert: either way the page says what became of it.
  assert _notes(browser, section) or section.find_element(By.CLASS_NAME, "reason").text


@pytest.mark.xdist_group("constrained_batch_1")
def test_the_meter_and_key_fields_fix_the_header(browser, url, tiny):
  section = _generate(browser, url, BACH, meter="3/4", key="Eb", seed=3, max_patches=16)
  log = browser.find_element(By.ID, "log").text
  assert "meter 3/4, key Eb" in log
  # Its 16 patches came in two of the sampler's calls: the log counted the first 8.
  assert "drawing: 8 patches, " in log
  link = section.find_element(By.LINK_TEXT, "ABC (as generated)").get_attribute("href")
  with urllib.request.urlopen(link) as response:
    text = response.read().decode()
  lines = text.splitlines()
  header = lines[:next(i for i, line in enumerate(lines) if line.startswith("[r:"))]
  assert [line for line in header if line.startswith(("M:", "K:"))] == ["M:3/4", "K:Eb"]
  # Counting changed no draw: the sampler alone writes the same piece.
  sampler = sampling.Sampler(tiny, sampling.Settings(constrained=True, max_patches=16), batch=1)
  [alone] = sampler.run([generation.prompt_text(*BACH, KNOWN)], seed=3,
                        header=constraint.Header(meter="3/4", key="Eb"))
  assert alone.text == text


def test_an_uploaded_score_keeps_its_own_header(tiny, tmp_path):
  demo = demo_app.Demo(tiny, tmp_path, KNOWN)
  tune = "X:1\nM:4/4\nL:1/8\nK:G\nGABc d2 e2|f2 g2 a4|]\n"
  upload = {"name": "tune.abc", "data": base64.b64encode(tune.encode()).decode()}
  job = demo.jobs[demo.start(dict(zip(("period", "composer", "instrumentation"), BACH),
                                  upload=upload, meter="3/4", key=" G "))]
  for _ in range(600):
    if job.done:
      break
    time.sleep(0.1)
  assert job.log[-1].endswith("failed: ValueError: meter 3/4: tune.abc has M:4/4")


def test_entry_point_serves_the_page(golden_dir, tmp_path):
  """`python -m notagen_jax.demo` as documented, on a free port: the page offers the prepared
  corpus's prompts, the one with the most pieces first."""
  mozart = ("Classical", "Mozart", "Keyboard")
  for name, combination, prompt in (("bwv1", BACH, True), ("k331", mozart, True),
                                    ("k545", mozart, True), ("bwv2", BACH, False)):
    (tmp_path / "prepared" / "pieces" / name).mkdir(parents=True)
    record = dict(zip(corpus.PROMPT_FIELDS, combination), prompt=prompt)
    (tmp_path / "prepared" / "pieces" / name / "0.json").write_text(json.dumps(record))
  demo = subprocess.Popen(
      [sys.executable, "-m", "notagen_jax.demo", f"--checkpoint={golden_dir / 'tiny.pth'}",
       f"--known_prompts={tmp_path / 'prepared'}", f"--output={tmp_path / 'out'}", "--port=0"],
      stdout=subprocess.PIPE, text=True)
  try:
    line = demo.stdout.readline()
    assert line.startswith("demo: http://127.0.0.1:"), line
    page = urllib.request.urlopen(line.split()[1], timeout=30).read().decode()
    tree = json.loads(page.split("const tree = ", 1)[1].split(";\n", 1)[0])
    assert tree == {"Classical": {"Mozart": ["Keyboard"]},
                    "Baroque": {"Bach, Johann Sebastian": ["Choral"]}}
    assert list(tree) == ["Classical", "Baroque"]
  finally:
    demo.terminate()
    demo.wait(timeout=30)
