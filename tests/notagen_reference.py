"""The original NotaGen patchilizer (training encoder), transcribed for use as a test reference.

Written from the original's patchilizer in its own shape (its `split_bars` with the exception that
drops the failing line and all later ones, its `split_patches`, its stream cut with `bisect`), with
nothing imported from notagen_jax: the code under test must not check itself.
"""

from __future__ import annotations

import bisect
import random
import re

PATCH_SIZE = 16
PAD, BOS, EOS = 0, 1, 2
DELIMITERS = ["|:", "::", ":|", "[|", "||", "|]", "|"]
REGEX = "(" + "|".join(map(re.escape, DELIMITERS)) + ")"
BOS_PATCH = chr(BOS) * (PATCH_SIZE - 1) + chr(EOS)
EOS_PATCH = chr(BOS) + chr(EOS) * (PATCH_SIZE - 1)


def split_bars(body_lines):
  bars = []
  try:
    for line in body_lines:
      items = list(filter(None, re.split(REGEX, line)))
      if len(items) == 1:
        line_bars = items
      else:
        if items[0] in DELIMITERS:
          line_bars = [items[i] + items[i + 1] for i in range(0, len(items), 2)]
        else:
          line_bars = [items[0]] + [items[i] + items[i + 1] for i in range(1, len(items), 2)]
        if "V" not in line_bars[-1]:
          line_bars[-2] += line_bars[-1]
          line_bars = line_bars[:-1]
      bars += line_bars
  except IndexError:
    pass
  return bars


def split_patches(text, generate_last=False):
  if not generate_last and len(text) % PATCH_SIZE != 0:
    text += chr(EOS)
  return [text[i:i + PATCH_SIZE] for i in range(0, len(text), PATCH_SIZE)]


def tunebody_patches(lines):
  return [patch for bar in split_bars(lines) for patch in split_patches(bar)]


def training_lines(text, dpo=False):
  """(metadata lines, body lines) as the training encoder sees them, stream markers included.

  dpo: the DPO encoder's rule, for generated text that carries its markers already (the body starts
  at the first line beginning with `[r:`, no markers added).
  """
  lines = [line + "\n" for line in filter(None, text.split("\n"))]
  body_index = -1
  for i, line in enumerate(lines):
    if (line.startswith("[r:") if dpo else "[V:" in line):
      body_index = i
      break
  metadata, body = lines[:body_index], lines[body_index:]
  if not dpo:
    body = [f"[r:{i}/{len(body) - i - 1}]" + line for i, line in enumerate(body)]
  return metadata, body


def allowed_cuts(n_metadata_patches, body_patches, patch_length):
  """The cut points (body patch indices) the original may draw from; [0] when nothing is cut."""
  cuts = [0] + [i + 1 for i, patch in enumerate(body_patches) if "\n" in patch]
  end = n_metadata_patches + len(body_patches) - patch_length
  return cuts[:bisect.bisect_left(cuts, end) + 1]


def encode_train_patches(text, patch_length, rng: random.Random | None = None, dpo=False):
  """(patches as text, index of the first body line kept): the original's `encode_train`.

  rng None: no stream cut (plain truncation), which is also the DPO encoder's behaviour.
  """
  metadata_lines, body_lines = training_lines(text, dpo)
  metadata = [BOS_PATCH] + [p for line in metadata_lines for p in split_patches(line)]
  body = tunebody_patches(body_lines) + [EOS_PATCH]
  patches, line_index = metadata + body, 0
  if rng is not None and len(metadata) + len(body) > patch_length:
    cuts = allowed_cuts(len(metadata), body, patch_length)
    if len(cuts) == 1:
      choices = ["head"]
    elif len(cuts) == 2:
      choices = ["head", "tail"]
    else:
      choices = ["head", "tail", "middle"]
    choice = rng.choice(choices)
    if choice != "head":
      line_index = len(cuts) - 1 if choice == "tail" else rng.choice(range(1, len(cuts) - 1))
      patches = metadata + tunebody_patches(body_lines[line_index:]) + [EOS_PATCH]
  return patches[:patch_length], line_index


def to_ids(patches):
  return [[ord(c) for c in patch] + [PAD] * (PATCH_SIZE - len(patch)) for patch in patches]


def encode_train(text, patch_length, rng: random.Random | None = None, dpo=False):
  return to_ids(encode_train_patches(text, patch_length, rng, dpo)[0])


def encode_generate(text, patch_length):
  """The original's generation encoder (a prompt to continue): no markers added, the last bar
  left open (no eos, its last patch not padded when short)."""
  lines = list(filter(None, text.split("\n")))
  body_index = None
  for i, line in enumerate(lines):
    if line.startswith("[V:") or line.startswith("[r:"):
      body_index = i
      break
  metadata_lines = [line + "\n" for line in lines[:body_index]]
  body = lines[body_index:]
  body_lines = [line + "\n" for line in body[:-1]]
  body_lines.append(body[-1] + "\n" if text.endswith("\n") else body[-1])
  bars = split_bars(body_lines)
  patches = [BOS_PATCH] + [p for line in metadata_lines for p in split_patches(line)]
  patches += [p for bar in bars[:-1] for p in split_patches(bar)]
  patches += split_patches(bars[-1], generate_last=True)
  ids = []
  for patch in patches[:patch_length]:
    codes = [ord(c) for c in patch]
    if len(patch) == PATCH_SIZE or patch[-1] == chr(EOS):
      codes += [PAD] * (PATCH_SIZE - len(patch))
    ids.append(codes)
  return ids
