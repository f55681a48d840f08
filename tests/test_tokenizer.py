import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import notagen_reference as reference
from notagen_jax.data import tokenizer
from notagen_jax.data.tokenizer import Patchilizer


@pytest.fixture(scope="module")
def cases(golden_dir):
  return json.loads((golden_dir / "cases.json").read_text())["cases"]


def test_golden_patch_ids(cases):
  patchilizer = Patchilizer(patch_length=256)
  for case in cases:
    # The reference the property tests below rely on reproduces the original's output too.
    assert reference.encode_train(case["input_text"], 256) == case["patch_ids"], case["name"]
    assert patchilizer.encode_train(case["input_text"]) == case["patch_ids"], case["name"]
    assert patchilizer.encode_train(case["input_text"], rng=random.Random(0)) == case["patch_ids"]


def test_decode_gives_stream_text(cases):
  patchilizer = Patchilizer(patch_length=256)
  for case in cases:
    decoded = patchilizer.decode(case["patch_ids"])
    # The bos patch decodes to fifteen chr(1), the eos patch to one.
    assert decoded == chr(1) * 15 + case["stream_text"] + chr(1)


_note = st.sampled_from(list("abcdefgABCDEFGz,'/2348 ^_=()-.!~") + ["[ceg]", "{g}", '"^dolce"'])
_bar_text = st.lists(_note, min_size=1, max_size=30).map("".join)
_barline = st.sampled_from(["|", "|", "|", "||", "|]", ":|", "|:", "::", "[|"])


@st.composite
def _pieces(draw, max_lines=40):
  n_voices = draw(st.integers(1, 3))
  meta = ["L:1/8", "M:4/4", draw(st.sampled_from(["K:C", "K:Eb", "K:F#m"]))]
  meta += [f"V:{v + 1} treble nm=\"Part {v + 1}\"" for v in range(n_voices)]
  if draw(st.booleans()):
    meta = ["%Baroque", "%Bach, Johann Sebastian", "%Keyboard"] + meta
  body = []
  for _ in range(draw(st.integers(1, max_lines))):
    voices = draw(st.lists(st.integers(1, n_voices), min_size=1, max_size=n_voices, unique=True))
    body.append("".join(f"[V:{v}]{draw(_bar_text)}{draw(_barline)}" for v in sorted(voices)))
  return "\n".join(meta + body) + draw(st.sampled_from(["\n", ""]))


@settings(max_examples=150, deadline=None)
@given(piece=_pieces(), patch_length=st.integers(8, 80), seed=st.integers(0, 2**32 - 1))
def test_stream_cut_matches_reference(piece, patch_length, seed):
  ours = Patchilizer(patch_length=patch_length).encode_train(piece, rng=random.Random(seed))
  assert ours == reference.encode_train(piece, patch_length, random.Random(seed))
  # Without an rng nothing is cut: the head, truncated.
  assert (Patchilizer(patch_length=patch_length).encode_train(piece)
          == reference.encode_train(piece, patch_length))


@settings(max_examples=150, deadline=None)
@given(piece=_pieces(), patch_length=st.integers(8, 80), seed=st.integers(0, 2**32 - 1))
def test_training_encoding_is_metadata_plus_suffix_of_lines(piece, patch_length, seed):
  patchilizer = Patchilizer(patch_length=patch_length)
  ids = patchilizer.encode_train(piece, rng=random.Random(seed))
  assert 1 <= len(ids) <= patch_length
  assert all(len(patch) == 16 for patch in ids)
  # The pieces drawn here always split, so every body line survives.
  lines = piece.rstrip("\n").split("\n")
  split = next(i for i, line in enumerate(lines) if line.startswith("[V:"))
  meta_text = "".join(line + "\n" for line in lines[:split])
  body = lines[split:]
  marked = [f"[r:{i}/{len(body) - 1 - i}]{line}\n" for i, line in enumerate(body)]
  decoded = patchilizer.decode(ids)
  # A suffix of the body lines (from the line the reference's cut keeps; possibly none), then the
  # eos patch, follows the metadata; only the final truncation to patch_length may shorten it.
  candidates = [chr(1) * 15 + meta_text + "".join(marked[k:]) + chr(1)
                for k in range(len(marked) + 1)]
  _, kept_from = reference.encode_train_patches(piece, patch_length, random.Random(seed))
  assert candidates[kept_from].startswith(decoded)
  metadata, body_lines = reference.training_lines(piece)
  full = (1 + sum(len(reference.split_patches(line)) for line in metadata)
          + len(reference.tunebody_patches(body_lines)) + 1)
  if full <= patch_length:
    assert decoded == candidates[0]
    assert ids[-1] == [1] + [2] * 15


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.lists(st.one_of(_bar_text, _barline, st.just("[V:1]")), min_size=1,
                               max_size=8).map(lambda items: "".join(items) + "\n"),
                      min_size=1, max_size=6))
def test_split_bars_matches_reference_including_failures(lines):
  assert tokenizer.split_bars(lines) == reference.split_bars(lines)


def test_split_failure_drops_the_line_and_all_later_ones():
  lines = ["[V:1]ab|cd|\n", "[V:1]a|:|b\n", "[V:1]ef|\n"]
  assert tokenizer.split_bars(lines) == ["[V:1]ab", "|cd|\n"]


def test_stream_cut_points_are_line_starts(cases):
  for case in cases:
    encoding = Patchilizer(patch_length=64).full_encoding(case["input_text"])
    n_lines = case["stream_text"].count("[r:")
    # A marker is shorter than a patch, so it always opens the first patch of its line.
    starts = [i for i, patch in enumerate(encoding.body) if patch.startswith("[r:")]
    assert len(starts) == n_lines
    for i, point in enumerate(starts):
      assert encoding.body[point].startswith(f"[r:{i}/{n_lines - 1 - i}]")
    # Every line start, then the eos patch (one past the last line's "\n").
    assert encoding.cut_points == starts + [len(encoding.body) - 1]
    assert encoding.body[-1] == chr(1) + chr(2) * 15


def test_long_piece_every_cut_is_one_the_original_could_make(cases):
  """Over many seeds on a real piece: the original's draws, and every cut it allows is drawn."""
  patch_length = 64
  patchilizer = Patchilizer(patch_length=patch_length)
  text = cases[0]["input_text"]
  metadata_lines, body_lines = reference.training_lines(text)
  n_metadata = 1 + sum(len(reference.split_patches(line)) for line in metadata_lines)
  body = reference.tunebody_patches(body_lines) + [reference.EOS_PATCH]
  n_allowed = len(reference.allowed_cuts(n_metadata, body, patch_length))
  assert n_allowed >= 4  # head, tail and more than one middle cut
  seen = set()
  for seed in range(400):
    ids = patchilizer.encode_train(text, rng=random.Random(seed))
    patches, kept_from = reference.encode_train_patches(text, patch_length, random.Random(seed))
    assert ids == reference.to_ids(patches)
    assert patchilizer.decode(ids[n_metadata:n_metadata + 1]).startswith(f"[r:{kept_from}/")
    seen.add(kept_from)
  assert seen == set(range(n_allowed))


@settings(max_examples=150, deadline=None)
@given(piece=_pieces(), patch_length=st.integers(4, 80), open_chars=st.integers(0, 40))
def test_generate_encoding_matches_reference(piece, patch_length, open_chars):
  # A prompt as the sampler continues it: whole lines, or the last one cut short (still open).
  prompt = piece.rstrip("\n")
  prompt = prompt[:len(prompt) - open_chars] if open_chars else piece
  if not any(line.startswith("[V:") for line in prompt.split("\n")):
    return  # the cut reached the metadata: not a prompt the sampler makes
  patchilizer = Patchilizer(patch_length=patch_length)
  try:
    expected = reference.encode_generate(prompt, patch_length)
  except IndexError:  # no bar the original can split: it crashes, ours says why
    with pytest.raises(ValueError, match="no bar the original could split"):
      patchilizer.encode_generate(prompt)
    return
  assert patchilizer.encode_generate(prompt) == expected


def test_generate_encoding_of_a_prompt_with_no_bar_to_split():
  prompt = "L:1/8\nK:C\n[V:1]abc|"  # one item to pair with a barline that is not there
  with pytest.raises(IndexError):
    reference.encode_generate(prompt, 64)
  with pytest.raises(ValueError, match="no bar the original could split"):
    Patchilizer().encode_generate(prompt)


def test_generate_encoding_leaves_last_bar_open():
  patchilizer = Patchilizer(patch_length=256)
  prompt = "%Baroque\n%Bach, Johann Sebastian\n%Keyboard\nL:1/8\nK:C\n[V:1]abcdefgabcdefgab|[V:1]cd"
  ids = patchilizer.encode_generate(prompt)
  assert ids[0] == [1] * 15 + [2]
  assert ids[-1] == [ord(c) for c in "|[V:1]cd"]  # not padded, no eos: the model continues it
  assert patchilizer.decode(ids[1:]) == prompt
  closed = patchilizer.encode_generate(prompt + "\n")
  assert closed[-1] == [ord(c) for c in "|[V:1]cd\n"]  # the last bar never gets an eos


def test_non_ascii_is_a_clear_error():
  with pytest.raises(ValueError, match="non-ASCII"):
    Patchilizer().encode_train("K:C\n[V:1]ab\u00e9|\n")


def test_body_rule_falls_back_to_last_line():
  patchilizer = Patchilizer(patch_length=64)
  encoding = patchilizer.full_encoding("L:1/8\nK:C\nabc|def|\n")
  assert "".join(encoding.metadata).count("\n") == 2
  assert encoding.body[0].startswith("[r:0/0]")
