"""CLaMP 2's music encoder: the original's golden patches and features, its rules, weight import."""

import json

import numpy as np
import pytest
import torch
from flax import nnx

from notagen_jax.scoring import Embedder
from notagen_jax.scoring import clamp2


@pytest.fixture(scope="module")
def golden(golden_dir):
  return json.loads((golden_dir / "clamp2_cases.json").read_text())


@pytest.fixture(scope="module")
def state_dict(golden_dir):
  return clamp2.load_state_dict(golden_dir / "clamp2_tiny.pth")


@pytest.fixture(scope="module")
def embedder(golden_dir):
  return clamp2.Clamp2Embedder.from_checkpoint(golden_dir / "clamp2_tiny.pth")


@pytest.fixture(scope="module")
def embedded(embedder, golden):
  """The golden pieces and two unreadable texts, embedded in one call."""
  texts = [case["input_text"] for case in golden["cases"]]
  return embedder.embed(["", *texts, "X:1\nabc|\n||"])


# --- Golden data from the original code.


def test_patch_ids_and_chunks_match_golden(golden):
  for case in golden["cases"]:
    ids = clamp2.patchify(case["input_text"], 64)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, np.asarray(case["patch_ids"]), err_msg=case["name"])
    assert clamp2.chunks(len(ids), 64) == [(s["start"], s["end"], s["weight"])
                                           for s in case["segments"]], case["name"]


def test_features_match_golden(embedded, golden):
  assert embedded.shape == (len(golden["cases"]) + 2, 128) and embedded.dtype == np.float32
  assert np.isnan(embedded[0]).all() and np.isnan(embedded[-1]).all()
  # The README's figure: within 3e-7 of the original's features (measured: 2.1e-7 at most).
  for row, case in zip(embedded[1:-1], golden["cases"]):
    np.testing.assert_allclose(row, case["feature"], rtol=0, atol=3e-7, err_msg=case["name"])


def test_chunk_features_and_hidden_states_match_golden(embedder, golden):
  segments, expected = [], []
  for case in golden["cases"]:
    ids = clamp2.patchify(case["input_text"])
    segments += [ids[s["start"]:s["end"]] for s in case["segments"]]
    expected += [s["projected"] for s in case["segments"]]
  # Measured: 2.7e-7 on chunk features of magnitude < 0.6, 1.4e-6 on hidden states up to 3.2.
  np.testing.assert_allclose(embedder.chunk_features(segments), expected, rtol=0, atol=5e-7)
  short = golden["cases"][1]  # padded: 58 of 64 patches valid
  n = short["seg0_n_valid"]
  ids = np.zeros((1, 64, 64), np.int32)
  ids[0, :n] = clamp2.patchify(short["input_text"])
  hidden_states = nnx.jit(lambda model, *args: model.hidden_states(*args))
  hidden = np.asarray(hidden_states(embedder.model, ids, np.arange(64)[None] < n))[0, :n, :8]
  np.testing.assert_allclose(hidden, np.asarray(short["seg0_last_hidden_first8"])[:n],
                             rtol=0, atol=5e-6)


def test_cosine_similarities_match_golden(embedded, golden):
  sim = golden["similarity"]
  features = embedded[1:-1]
  assert sim["names"] == [case["name"] for case in golden["cases"]]
  # statistics.py: np.dot(a, b) / (norm(a) * norm(b)), against the float32 mean feature.
  norms = np.linalg.norm(features, axis=1)
  # Measured: 4.3e-7, 9e-8 and 1.8e-7 from the original's figures.
  np.testing.assert_allclose(features @ features.T / np.outer(norms, norms),
                             sim["pairwise_float64"], rtol=0, atol=1e-6)
  mean = features.mean(0)
  np.testing.assert_allclose(mean, sim["mean_feature_float32"], rtol=0, atol=3e-7)
  to_mean = features @ mean / (norms * np.linalg.norm(mean))
  np.testing.assert_allclose(to_mean, [sim["to_mean_float64"][n] for n in sim["names"]], rtol=0,
                             atol=1e-6)


# --- The patchifier's rules, written out.


def test_patchifier_rules():
  text = ("%%score 1\n% a comment\nX:1\nK:C\n|:ab|c2:|\n[V:1]de|f\n[V:1]no barline\n"
          "w: lyric\n%%MIDI program 1\n")
  assert clamp2.patch_strings(text) == [
      "%%score 1\n", "X:1\n", "K:C\n",
      "|:ab|", "c2:|\n",          # a leading barline joins the first bar; '\n' on the last
      "[V:1]de|\n",               # text after the last barline is dropped, the '\n' re-added
                                  # ...and a line without a barline gives no patch at all
      "w: lyric\n", "%%MIDI program 1\n"]
  assert clamp2.patch_strings("K:C\r\n% c\r\nab||cd|]\r\n") == ["K:C\n", "ab||", "cd|]\n"]
  assert clamp2.patch_strings("T:Café Ñu\n") == ["T:Cafe Nu\n"]  # unidecode to ASCII


def test_patch_ids_special_patches_and_cut():
  ids = clamp2.patchify("K:C\n" + "a" * 20 + "|\n", patch_size=8)
  np.testing.assert_array_equal(ids, [
      [1] * 8,
      [1, ord("K"), ord(":"), ord("C"), ord("\n"), 2, 0, 0],
      [1] + [ord("a")] * 7,  # cut to patch_size: no room for the closing 2
      [1] + [2] * 7])


def test_mtf_messages_share_patches():
  text = "ticks_per_beat 480\nnote_on 0 60 64\nnote_on 0 64 64\nnote_on 0 67 64\nend 0\n"
  assert clamp2.patch_strings(text, patch_size=26) == [
      "ticks_per_beat 480\n", "note_on 0 60 64\t0 64 64\n", "note_on 0 67 64\n", "end 0\n"]


@pytest.mark.parametrize("text", ["", "% only a comment\n", "X:1\nab|\n|", "K:C\n|]"])
def test_texts_the_original_fails_on(text):
  with pytest.raises(ValueError):
    clamp2.patchify(text)


def test_chunk_weights():
  assert clamp2.chunks(5, 8) == [(0, 5, 5)]
  assert clamp2.chunks(16, 8) == [(0, 8, 8), (8, 16, 8)]
  # The last chunk is the final 8 patches (from 9) yet weighs only the 1 patch left over.
  assert clamp2.chunks(17, 8) == [(0, 8, 8), (8, 16, 8), (9, 17, 1)]


# --- Weight import.


def _keys(path):
  shapes = {}
  for line in path.read_text().splitlines():
    key, shape, _ = line.split("\t")
    # Zero-stride views: the full-size list costs no memory.
    shapes[key] = np.broadcast_to(np.float32(0), tuple(json.loads(shape)))
  return shapes


def test_key_lists_load(golden_dir):
  full = _keys(golden_dir / "clamp2_keys_full.txt")
  full.update({"text_model.embeddings.word_embeddings.weight": np.zeros((2, 2)),
               "text_proj.weight": np.zeros((2, 2)), "logit_scale": np.zeros(())})
  cfg = clamp2.config_from_state_dict(full)
  assert cfg == clamp2.M3Config() and cfg.heads == 12
  clamp2.check_state_dict(full, cfg)
  tiny = _keys(golden_dir / "clamp2_keys_tiny.txt")
  cfg, params = clamp2.params_from_state_dict(tiny)
  assert cfg == clamp2.M3Config(patch_size=64, patch_length=64, layers=2, hidden=128,
                                intermediate=512, out_dim=128) and cfg.heads == 2
  assert clamp2.build(cfg, params).layers[1].q[...].shape == (128, 2, 64)


def _error(state_dict):
  with pytest.raises(ValueError) as info:
    clamp2.params_from_state_dict(state_dict)
  return str(info.value)


def test_bad_checkpoints_name_the_tensors(state_dict):
  layer = clamp2.BERT + "encoder.layer.1."
  broken = dict(state_dict)
  del broken[layer + "attention.self.key.bias"], broken[clamp2.PROJ + "bias"]
  broken[layer + "output.dense.weight"] = np.zeros((128, 100), np.float32)
  broken[clamp2.BERT + "encoder.layer.0.attention.self.distance_embedding.weight"] = np.zeros(1)
  message = _error(broken)
  assert f"missing {layer}attention.self.key.bias [128]" in message
  assert f"missing {clamp2.PROJ}bias [128]" in message
  assert f"shape of {layer}output.dense.weight: [128, 100], expected [128, 512]" in message
  assert "unexpected music_model.base.encoder.layer.0.attention.self.distance_embedding" in message
  assert clamp2.POSITIONS in _error({k: v for k, v in state_dict.items()
                                     if k != clamp2.POSITIONS})


def test_checkpoint_wrappers_text_branch_and_token_type(state_dict, embedded, golden, tmp_path):
  tensors = {key: torch.from_numpy(value) for key, value in state_dict.items()}
  text = {"text_model.embeddings.word_embeddings.weight": torch.zeros(3, 4),
          "text_proj.weight": torch.zeros(4, 4), "text_proj.bias": torch.zeros(4)}
  texts = [golden["cases"][1]["input_text"]]
  for i, obj in enumerate([{"checkpoint_model": {**tensors, **text}},
                           {"model": tensors, "epoch": 3, "min_eval_loss": 0.5}, tensors]):
    torch.save(obj, tmp_path / f"{i}.pth")
    features = clamp2.Clamp2Embedder.from_checkpoint(tmp_path / f"{i}.pth").embed(texts)
    np.testing.assert_allclose(features[0], embedded[2], rtol=1e-6, atol=1e-6)
  no_types = {k: v for k, v in state_dict.items() if k != clamp2.TOKEN_TYPE}
  assert not clamp2.params_from_state_dict(no_types)[1]["token_type"].any()


def test_satisfies_embedder_protocol(embedder):
  assert isinstance(embedder.name, str) and embedder.name == "clamp2"
  _: Embedder = embedder
  assert embedder.embed([]).shape == (0, 128)


# --- Parity with a PyTorch M3 built from transformers' BertModel, as the original does.


class TorchMusicBranch(torch.nn.Module):
  """CLaMP2Model's music branch: M3PatchEncoder + avg_pooling + music_proj."""

  def __init__(self, config, patch_size, out_dim):
    super().__init__()
    from transformers import BertModel  # pylint: disable=import-outside-toplevel
    self.patch_size = patch_size
    self.music_model = torch.nn.Module()
    self.music_model.patch_embedding = torch.nn.Linear(patch_size * 128, config.hidden_size)
    self.music_model.base = BertModel(config)
    self.music_proj = torch.nn.Linear(config.hidden_size, out_dim)

  def forward(self, patches, masks):
    x = torch.nn.functional.one_hot(patches, num_classes=128).float()
    x = self.music_model.patch_embedding(x.reshape(len(patches), -1, self.patch_size * 128))
    hidden = self.music_model.base(inputs_embeds=x, attention_mask=masks)["last_hidden_state"]
    masks = masks.unsqueeze(-1)
    return self.music_proj((hidden * masks).sum(1) / masks.sum(1))


def _extract_feature(model, ids, length, patch_size):
  """extract_clamp2.py's extract_feature(normalize=True), written out."""
  ids = torch.from_numpy(ids).long()
  segments = [ids[i:i + length] for i in range(0, len(ids), length)]
  segments[-1] = ids[-length:]
  features = []
  for segment in segments:
    masks = torch.cat((torch.ones(len(segment)), torch.zeros(length - len(segment))))
    segment = torch.cat((segment, torch.zeros((length - len(segment), patch_size)).long()))
    features.append(model(segment[None], masks[None]))
  full, rest = divmod(len(ids), length)
  weights = torch.tensor([length] * full + ([rest] if rest else [])).view(-1, 1)
  return (torch.cat(features) * weights).sum(0) / weights.sum()


def test_matches_torch_bert_reference(tmp_path):
  from transformers import BertConfig  # pylint: disable=import-outside-toplevel
  patch_size, length, hidden, out_dim = 16, 64, 128, 96
  config = BertConfig(vocab_size=1, hidden_size=hidden, num_hidden_layers=2,
                      num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                      max_position_embeddings=length, attn_implementation="eager")
  torch.manual_seed(0)
  model = TorchMusicBranch(config, patch_size, out_dim).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      # Sharpened: far from the init, so attention and the LayerNorms do real work.
      scale = 0.3 if "query" in name or "key" in name else 0.08
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if "LayerNorm.weight" in name
              else scale * torch.randn_like(p))
  torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "m3.pth")
  # Chunks of up to 32 (a half-length sequence), 64 and more patches: 5, 129 (a 1-patch overlap
  # chunk), 128 (two full chunks), 70 patches.
  texts = ["X:1\nab|c|\n",
           "K:C\n" + "[V:1]ab|cd|\n" * 62 + "|:e:|f|\n",
           "K:C\n" + "ab|" * 125 + "\n",
           "K:D\n%%MIDI x\n" + "".join(f"[V:{i % 3}]a{i}|b,|\n" for i in range(33))]
  ids = [clamp2.patchify(text, patch_size) for text in texts]
  assert [len(x) for x in ids] == [5, 129, 128, 70]
  with torch.no_grad():
    expected = np.stack([_extract_feature(model, x, length, patch_size).numpy() for x in ids])
  # A small max_tokens: several batches, padded rows, two sequence lengths.
  embedder = clamp2.Clamp2Embedder.from_checkpoint(tmp_path / "m3.pth", max_tokens=128)
  assert embedder.cfg.out_dim == out_dim and embedder.cfg.patch_size == patch_size
  # Sharpened weights give features up to 2.2; measured within 1.7e-6 of the PyTorch branch.
  np.testing.assert_allclose(embedder.embed(texts), expected, rtol=0, atol=1e-5)
