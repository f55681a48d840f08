import json
import pathlib
import random

import pytest

from configs import clamp_dpo
from notagen_jax import dpo_loop
from notagen_jax import sampling
from notagen_jax.data import tokenizer

PROMPT = ("Baroque", "Bach, Johann Sebastian", "Choral")


def _with_markers(text):
  """A prepared piece as the sampler writes it: `[r:i/j]` on every body line."""
  lines = tokenizer.text_lines(text)
  split = tokenizer.body_index(lines)
  body = lines[split:]
  return "".join(lines[:split] + [tokenizer.stream_marker(i, len(body)) + line
                                  for i, line in enumerate(body)])


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

  def run(self, prompts, seed=0, on_result=None):
    calls.append(seed)
    rng = random.Random(seed)
    results = []
    for i, prompt in enumerate(prompts):
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
  assert all(r["pieces"] == 8 and r["scored"] >= 6 and r["mean_score"] > 0 for r in rows)
  it0 = tmp_path / "iteration_0"
  pairs = json.loads((it0 / "preferences.json").read_text())
  assert pairs["chosen"] and pairs["rejected"]
  assert all(text.startswith("%Baroque\n") for text in pairs["chosen"] + pairs["rejected"])
  assert (it0 / "train" / "final_params").exists()
  assert (tmp_path / "score.png").stat().st_size > 0
  assert "mean_score" in (tmp_path / "summary.txt").read_text()
  assert len(fake_sampler) == 2

  def no_training(*args, **kwargs):
    raise AssertionError("a finished iteration was trained again")

  monkeypatch.setattr(dpo_loop.trainer, "train_and_evaluate", no_training)
  assert dpo_loop.run(c) == rows
  assert len(fake_sampler) == 2  # nothing sampled again


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
