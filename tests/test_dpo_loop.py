import json
import pathlib
import random
import re

import numpy as np
import pytest

import notagen_reference as reference
from configs import clamp_dpo
from notagen_jax import dpo_loop
from notagen_jax import sampling
from notagen_jax.data import abc
from notagen_jax.scoring import symbolic

PROMPT = ("Baroque", "Bach, Johann Sebastian", "Choral")


def _with_markers(text):
  """A prepared piece as the sampler writes it: `[r:i/j]` on every body line."""
  return "".join(sum(reference.training_lines(text), []))


def _cosine(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def _expected_scores(prepared, texts):
  """Each text's symbolic score, computed here: cosine to the mean ground-truth feature."""
  embedder = symbolic.SymbolicEmbedder()
  truth = [json.loads(p.read_text()) for p in sorted(prepared.glob("pieces/*/*.json"))]
  truth = [r["interleaved"] for r in truth
           if (r["period"], r["composer"], r["instrumentation"]) == PROMPT]
  truth_features = embedder.embed(truth)
  mean = truth_features[np.isfinite(truth_features).all(axis=1)].mean(axis=0)
  scores = []
  for text in texts:
    try:
      readable = abc.unreduce(text)
    except abc.PieceError:  # scored as generated, markers removed (select.score_malformed)
      readable = re.sub(r"^\[r:[^\]]*\]", "", text, flags=re.MULTILINE)
    scores.append(_cosine(embedder.embed([readable])[0], mean))
  return np.array(scores)


@pytest.fixture(scope="module")
def prepared(corpus_shards):
  return pathlib.Path(corpus_shards).parents[3] / "prepared"


def _config(prepared, workdir, golden_dir):
  c = clamp_dpo.get_config("quickstart")
  c.workdir = str(workdir)
  c.init_checkpoint = str(golden_dir / "tiny.pth")
  c.iterations = 1
  c.ground_truth.prepared_dir = str(prepared)
  c.sample.num_pieces = 8
  c.select.fraction = 0.25  # two pieces each side
  c.sample.batch = 4
  c.scorer.workers = 1
  c.train.train.num_steps = 2
  assert c.train.data.per_device_batch_size == 1  # one pair per simulated device
  return c


@pytest.fixture()
def fake_sampler(monkeypatch, prepared):
  """Real chorales (with markers) and broken texts instead of a tiny random model's noise."""
  records = [json.loads(p.read_text()) for p in sorted(prepared.glob("pieces/*/*.json"))]
  real = [_with_markers(r["augmented"][key]) for r in records for key in ("C", "G")]
  calls = []

  def run(self, prompts, seed=0, on_result=None, header=None, indices=None, on_patches=None):
    assert self.settings.constrained and header is None
    calls.append(seed)
    results = []
    for i, prompt in zip(indices or range(len(prompts)), prompts):
      rng = random.Random(seed * 1000 + i)  # each piece its own draw, as the sampler's
      body = rng.choice(real) if i % 4 else "[r:0/0]zz|\n" * 3
      result = sampling.Result(i, prompt, prompt + body, True, "", 10, 0, 0.1)
      results.append(result)
      on_result(result)
    return results

  monkeypatch.setattr(sampling.Sampler, "run", run)
  return calls


@pytest.mark.slow  # about a minute: runs in CI's second pass
def test_loop_writes_every_iteration_and_resumes(prepared, tmp_path, golden_dir, fake_sampler,
                                                 monkeypatch):
  c = _config(prepared, tmp_path, golden_dir)
  rows = dpo_loop.run(c)
  assert [r["iteration"] for r in rows] == [0, 1]
  for k, r in enumerate(rows):
    it = tmp_path / f"iteration_{k}"
    pieces = json.loads((it / "samples" / "samples.json").read_text())["pieces"]
    texts = [pathlib.Path(p["abc"]).read_text() for p in pieces]
    expected = _expected_scores(prepared, texts)
    scores = np.array(json.loads((it / "scores.json").read_text())["scores"], np.float64)
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-6)
    scored = np.isfinite(expected)
    assert r["pieces"] == 8 and r["scored"] == scored.sum()
    # Pieces 0 and 4 are the broken texts; the chorales' bars all align.
    assert (r["unreduced"], r["musicxml"], r["bae"]) == (0.75, 0.75, 0.0) and r["perplexity"] > 1
    # The score row carries the mean over the scored pieces, rounded to 4 places.
    assert abs(r["mean_score"] - expected[scored].mean()) <= 5e-5 + 1e-6
  it0 = tmp_path / "iteration_0"
  pairs = json.loads((it0 / "preferences.json").read_text())
  assert pairs["chosen"] and pairs["rejected"]
  assert all(text.startswith("%Baroque\n") for text in pairs["chosen"] + pairs["rejected"])
  assert (it0 / "train" / "final_params").exists()
  assert (tmp_path / "score.png").read_bytes().startswith(b"\x89PNG")
  assert json.loads((tmp_path / "summary.json").read_text()) == rows
  assert (tmp_path / "summary.txt").read_text() == dpo_loop.table(rows) + "\n"
  assert len(fake_sampler) == 2

  def no_training(*args, **kwargs):
    raise AssertionError("a finished iteration was trained again")

  monkeypatch.setattr(dpo_loop.trainer, "train_and_evaluate", no_training)
  assert dpo_loop.run(c) == rows
  assert len(fake_sampler) == 2  # nothing sampled again


def _two_prompt_corpus(prepared, root):
  """A corpus of two prompts: the chorales split into two instrumentations."""
  corpus = root / "corpus"
  for i, path in enumerate(sorted(prepared.glob("pieces/*/*.json"))):
    record = json.loads(path.read_text())
    record["instrumentation"] = "Choral" if i % 2 else "Organ"
    (corpus / "pieces" / path.parent.name).mkdir(parents=True, exist_ok=True)
    (corpus / "pieces" / path.parent.name / path.name).write_text(json.dumps(record))
  return corpus


def test_many_prompts_are_scored_against_their_own_ground_truth(prepared, tmp_path, golden_dir):
  corpus = _two_prompt_corpus(prepared, tmp_path)
  c = _config(corpus, tmp_path / "run", golden_dir)
  c.prompts_from_corpus = True
  c.sample.num_pieces = 4
  c.select.filters = ()
  dpo_loop.validate(c)
  combinations = dpo_loop.prompts(c)
  assert [p[2] for p in combinations] == ["Choral", "Organ"]
  truths = [dpo_loop.ground_truth_texts(corpus, p) for p in combinations]
  records = [json.loads(p.read_text()) for p in sorted(prepared.glob("pieces/*/*.json"))]
  texts = [_with_markers(r["augmented"]["C"]) for r in records[:8]]
  embedder = symbolic.SymbolicEmbedder()
  features = [embedder.embed(t) for t in truths]
  out = tmp_path / "run" / "iteration_0"
  out.mkdir(parents=True)
  scores = dpo_loop.score(c, texts, embedder, features, out)
  for j, prompt in enumerate(scores["prompts"]):
    # Each prompt's four pieces against its own ground truth: one chosen, one rejected each.
    mean = np.nanmean(features[j], axis=0)
    expected = [_cosine(embedder.embed([abc.unreduce(t)])[0], mean) for t in texts[4 * j:4 * j + 4]]
    np.testing.assert_allclose(prompt["scores"], expected, rtol=1e-5)
    assert prompt["counts"]["chosen"] == prompt["counts"]["rejected"] == 1
    assert scores["scores"][4 * j:4 * j + 4] == prompt["scores"]
  assert [i // 4 for i in scores["chosen"]] == [0, 1] == [i // 4 for i in scores["rejected"]]
  assert scores["counts"]["generated"] == 8 and scores["counts"]["chosen"] == 2
  assert scores["counts"]["mean_score"] == pytest.approx(np.mean(scores["scores"]), rel=1e-6)
  assert scores["score_se"] == pytest.approx(np.std(scores["scores"], ddof=1) / np.sqrt(8))
  rows = dpo_loop.prompt_rows(0, combinations, scores)
  assert [r["prompt"] for r in rows] == [" / ".join(p) for p in combinations]
  assert all(r["aligned"] == 1.0 and r["score_se"] > 0 for r in rows)
  assert "Baroque / Bach, Johann Sebastian / Organ" in dpo_loop.table(rows, dpo_loop.PROMPT_COLUMNS)


@pytest.mark.slow  # about a minute (two DPO steps): runs in CI's second pass
def test_a_loop_over_many_prompts_reports_each(prepared, tmp_path, golden_dir, fake_sampler):
  corpus = _two_prompt_corpus(prepared, tmp_path)
  c = _config(corpus, tmp_path / "run", golden_dir)
  c.prompts_from_corpus = True
  c.sample.num_pieces = 4
  c.select.filters = ()
  c.select.fraction = 0.34  # of each prompt's 3 scored pieces (the fake's piece 0 is broken): 1
  rows = dpo_loop.run(c)
  run = tmp_path / "run"
  samples = json.loads((run / "iteration_0" / "samples" / "samples.json").read_text())["pieces"]
  prompts = [pathlib.Path(p["abc"]).read_text().split("\n")[2] for p in samples]
  assert prompts == ["%Choral"] * 4 + ["%Organ"] * 4  # num_pieces of each prompt, in order
  assert [r["pieces"] for r in rows] == [8, 8]
  by_prompt = json.loads((run / "summary_prompts.json").read_text())
  assert [(r["iteration"], r["prompt"].split(" / ")[2]) for r in by_prompt] == [
      (0, "Choral"), (0, "Organ"), (1, "Choral"), (1, "Organ")]
  assert all(r["pieces"] == 4 for r in by_prompt)
  # Pairs from both prompts, trained together.
  pairs = json.loads((run / "iteration_0" / "preferences.json").read_text())
  assert {t.split("\n")[2] for t in pairs["chosen"]} == {"%Choral", "%Organ"}
  page = (run / "report.html").read_text()
  assert "<h2>Per prompt</h2>" in page
  assert all(r["prompt"] in page for r in by_prompt)


@pytest.mark.parametrize("arg", ["small", "quickstart"])
def test_the_loop_samples_constrained_and_keeps_the_alignment_filter(arg):
  c = clamp_dpo.get_config(arg)
  assert sampling.Settings(**dpo_loop._settings_fields(c)).constrained
  assert "aligned" in c.select.filters
  c.sample.constrained = False  # the original's sampling, one field away
  assert not sampling.Settings(**dpo_loop._settings_fields(c)).constrained


@pytest.mark.parametrize("field,value,message", [
    ("scorer.kind", "human", "scorer.kind"),
    ("select.fraction", 0.9, "select.fraction"),
    ("init_checkpoint", "", "init_checkpoint"),
    ("sample.top_p", 1.5, "top_p"),
])
def test_a_wrong_value_stops_before_any_work(prepared, tmp_path, golden_dir, field, value,
                                             message):
  c = _config(prepared, tmp_path / "run", golden_dir)
  section, _, name = field.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=message):
    dpo_loop.run(c)
  assert not (tmp_path / "run").exists()
