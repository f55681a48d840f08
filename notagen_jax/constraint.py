"""Constrained decoding: a per-row automaton over characters that admits only well-formed pieces.

The automaton reads what the sampler writes, character by character and patch by patch, and says
which of the 128 characters may come next. What it admits is NotaGen's training form:

- metadata lines in the training data's order and syntax: up to three `%` comment lines,
  `%%score` (voices 1 to n, each once, in nested groups), `L:1/d`, `Q:n/d=bpm`, `M:`, `K:` (a key
  or a clef), then `V:` lines for voices 1 to n (in `%%score`'s order when there is one) with a
  clef and `key="name"` / `key=value` items; nothing abctoolkit or abc2xml misreads (see
  docs/constrained_decoding.md);
- body lines `[r:i/j]` with i counting the lines, then voices in increasing order, each declared
  and at most once (rest reduction leaves out the voices that rest), each `[V:n]` bar closed by a
  barline (the first line's may also open with one); the first voice's bar lasts at most
  BAR_LIMIT bars of the meter (pickups and the training data's short and long bars), every other
  voice's bar lasts exactly as long and ends with the same barline, durations read as abctoolkit
  reads them (unit length, multipliers and fractions, broken rhythm, `(3` and `(p:q:r` tuplets
  rounded as it rounds them, chords, grace notes as zero, decorations, annotations and inline
  fields as nothing);
- patches cut as the tokenizer cuts them: eos only where a bar or a line ends, the barline of a
  voice that is not the line's last opening the next patch, `\n` ending the line's last patch;
  the piece ends with the bos-eos patch after a complete line, with no ending left open (endings
  as music21 unrolls them); a start repeat may stay open, as the data's reels and airs leave
  their last strain's.

Every admitted prefix can be completed: lengths are dyadic (`/`, `/d` and `n/d` with d up to 64,
numerators up to 99), tuplet groups total a whole number of 1/64 units, each note, tuplet or
broken rhythm starts only with room left for what it waits for, and zero-length elements come at
most MAX_MARKS in a row, a note's octave marks, length and ties at most MAX_RUN characters in a
row, a chord or grace group at most MAX_CHORD_NOTES / MAX_GRACE_NOTES notes, so every bar can end
(and header lines are bounded too). A row left with no admissible character would be reported
dead (the sampler then cuts its piece after its last complete line); the random walks of the
tests meet none.

`step` is one transition for one row and one character, written with jnp scalars so that it is
vmapped over the 128 candidates and over rows inside the sampler's compiled loop; `advance` runs
it over a prompt on the host side to start a row.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from notagen_jax.data import tokenizer

VOCAB = 128
# Ticks per unit note length: every dyadic length down to 1/64 and every tuplet ratio p <= 9 of
# such lengths is a whole number of ticks.
TICKS = 2**9 * 315
MIN_TICKS = TICKS // 64
MAX_NUM = 99
# The longest bar the first voice may write: this many bars of the meter (the training data has
# bars up to 2.5 times the meter's), or units when the meter is free (`M:none`).
BAR_LIMIT = 4
FREE_BAR_UNITS = 64

# Contexts: where in the piece the next character falls.
(H_LINE, H_PERCENT, H_FIXED, H_SCORE, H_UNIT, H_METER, H_TEXT, H_VOICE, EOL, B_LINE, B_FIXED,
 B_INDEX, B_REMAIN, B_VOICE, CONTENT, BARLINE, END, DONE, H_KEY, H_TEMPO, H_CLEF, H_NAMES,
 H_INFO) = range(23)
# Header ranks: lines must come in this order (comments first, voices last).
R_START, R_SCORE, R_UNIT, R_TEMPO, R_METER, R_KEY, R_VOICES = range(7)
# Fixed strings, each followed by a context.
FIXED = ("%score ", ":1/", ":", ":", ":", ":", ":", "[r:", "[V:")
(F_SCORE, F_UNIT, F_TEMPO, F_METER, F_KEY, F_VOICE, F_INFO, F_MARKER, F_VTAG) = range(len(FIXED))
_FIXED_NEXT = (H_SCORE, H_UNIT, H_TEMPO, H_METER, H_KEY, H_VOICE, H_INFO, B_INDEX, B_VOICE)
# The words a key field may hold (header `K:` and inline `[K:]`): keys with their modes, and the
# clef changes of the training data; and the clefs of `V:` lines.
KEYS = tuple(f"{tonic}{accidental}{mode}" for tonic in "ABCDEFG" for accidental in ("", "b", "#")
             for mode in ("", "m", "min", "maj", "mix", "dor", "phr", "lyd", "loc")) + ("none",)
CLEFS = ("treble", "bass", "alto", "tenor", "treble-8", "bass-8", "treble+8", "bass+8", "perc",
         "baritone", "mezzosoprano", "soprano", "none")
MAX_COMMENTS = 3  # the prompt's period, composer and instrumentation
# Annotations, voice names and instructions: preparation drops annotations longer than this.
MAX_TEXT = 40
METER_DENOMINATORS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
MAX_SCORE_VOICES = 30
# `!...!` decorations: those abc2xml reads (dynamics, hairpins, articulations, ornaments).
DECORATIONS = ("pppp", "ppp", "pp", "p", "mp", "mf", "f", "ff", "fff", "ffff", "sfz", "sf", "fp",
               "<(", "<)", ">(", ">)", "crescendo(", "crescendo)", "diminuendo(", "diminuendo)",
               "fermata", "invertedfermata", "trill", "trill(", "trill)", "turn", "mordent",
               "lowermordent", "uppermordent", "pralltriller", "accent", ">", "tenuto",
               "staccato", "wedge", "marcato", "upbow", "downbow", "open", "snap", "thumb",
               "arpeggio", "breath", "segno", "coda", "D.C.", "D.S.", "fine", "slide", "emphasis",
               "0", "1", "2", "3", "4", "5", "+", "plus", "roll", "shortphrase", "mediumphrase",
               "longphrase", "editorial", "courtesy", "ped", "ped-up", "^", "8va(", "8va)",
               "8vb(", "8vb)", "/", "//", "///")
# Content sub-contexts: an open construct of the bar.
(S_NONE, S_QUOTE, S_DECO, S_GRACE, S_FIELD_KEY, S_FIELD_TEXT, S_FIELD_METER, S_CHORD, S_PAREN,
 S_TUPLET, S_FIELD_WORD, S_FIELD_TEMPO, S_LEFT, S_LEFT_NEXT) = range(14)
# A note being read: accidentals, its pitch (octave marks may follow), numerator digits, `/`,
# denominator digits.
T_IDLE, T_ACC, T_PITCH, T_NUM, T_SLASH, T_DEN = range(6)
# A `V:` line's names and options: an item's start, its key, `=`, a quoted or plain value, a
# closed quote.
N_ITEM, N_KEY, N_EQUALS, N_QUOTE, N_VALUE, N_CLOSED = range(6)
MAX_KEY = 12
# Items after a V: line's clef (the data's most: 3) and a comment line's characters (the data's
# prompt lines: under 40); without a bound a header line could go on forever.
MAX_VOICE_ITEMS = 6
MAX_COMMENT = 80
# Barlines as abctoolkit splits them, with a volta number after; one code per spelling. (Not
# `:||`: the original's tokenizer reads it as two barlines and drops the line from its data.)
_BARLINE_CORES = ("|", "||", "|]", ":|", "|:", "::", "|]:", "||:", ":|]")
_BARLINE_SYMBOLS = {"|": 1, ":": 2, "]": 3, **{str(d): 4 + d for d in range(1, 10)}}
_BARLINE_LEN = 4
# Start repeats open at once (music21 expands nested repeats).
MAX_REPEATS = 4
# Zero-length elements (spaces, slurs, decorations, annotations, grace groups, inline fields) in a
# row: the data's longest run is 37 (a madrigal's lyrics); without a bound a bar could last forever.
MAX_MARKS = 48
# Notes in a chord or a grace group, and a note's octave marks, length characters and ties in a
# row (in every 5th of music21's corpus at most 4, 8 and 5): without a bound a note could go on
# forever.
MAX_CHORD_NOTES = 16
MAX_GRACE_NOTES = 16
MAX_RUN = 12
# The one-letter decorations abctoolkit skips when it times a bar.
DECORATION_LETTERS = "TuvMPSO"


def _table(chars: str) -> np.ndarray:
  table = np.zeros(VOCAB, bool)
  table[[ord(c) for c in chars]] = True
  return table


_PRINTABLE = np.zeros(VOCAB, bool)
_PRINTABLE[32:127] = True
# Header text (comments, tempo words) may hold tabs; not carriage returns, which abc2xml reads as
# line breaks.
_HEADER_TEXT = _PRINTABLE | _table("\t")
_DIGIT = _table("0123456789")
_PITCH = _table("ABCDEFGabcdefg")
_REST = _table("zx")
_ACCIDENTAL = _table("^_=")
_OCTAVE = _table("',")
_DECORATION = _table(DECORATION_LETTERS + ".")
_RUN = _table(",'/-0123456789")
_FIELD_LETTERS = _table("KMQI")
# Text that abctoolkit might read as a barline or a field, or pair with a decoration's `!` or a
# grace group's braces (it drops those before annotations), is kept out of annotations.
_QUOTE_TEXT = _PRINTABLE & ~_table('"|[]!{}')
# (No `[`: a header line holding `[V:` would read as a body line.)
_NAME_TEXT = _HEADER_TEXT & ~_table('"[')
_LOWER = _table("abcdefghijklmnopqrstuvwxyz")
_VALUE = _LOWER | _DIGIT | _table("ABCDEFGHIJKLMNOPQRSTUVWXYZ+-")
_INFO_TEXT = _table("abcdefghijklmnopqrstuvwxyz0123456789 ")


def _barline_tables() -> tuple[np.ndarray, np.ndarray]:
  """Whether each code is the prefix of a barline spelling, and whether it is one."""
  size = 16**_BARLINE_LEN
  prefix, complete = np.zeros(size, bool), np.zeros(size, bool)
  spellings = list(_BARLINE_CORES) + [core + str(d) for core in _BARLINE_CORES
                                       for d in range(1, 10) if len(core) < _BARLINE_LEN]
  for spelling in spellings:
    code = 0
    for ch in spelling:
      code = code * 16 + _BARLINE_SYMBOLS[ch]
      prefix[code] = True
    complete[code] = True
  return prefix, complete


_BAR_PREFIX, _BAR_COMPLETE = _barline_tables()


def _trie(words: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
  """A trie of words as tables: the next node per (node, char) (0: none; node 1 is the root),
  and whether a node ends a word."""
  following = [np.zeros(VOCAB, np.int32), np.zeros(VOCAB, np.int32)]
  final = [False, False]
  for word in words:
    node = 1
    for ch in word:
      if not following[node][ord(ch)]:
        following.append(np.zeros(VOCAB, np.int32))
        final.append(False)
        following[node][ord(ch)] = len(following) - 1
      node = following[node][ord(ch)]
    final[node] = True
  return np.stack(following), np.array(final)


_KEY_NEXT, _KEY_FINAL = _trie(KEYS + CLEFS)
_CLEF_NEXT, _CLEF_FINAL = _trie(CLEFS)
_DECO_NEXT, _DECO_FINAL = _trie(DECORATIONS)
_BAR_SYMBOL = np.zeros(VOCAB, np.int32)
for _ch, _symbol in _BARLINE_SYMBOLS.items():
  _BAR_SYMBOL[ord(_ch)] = _symbol


def _fixed_tables() -> tuple[np.ndarray, np.ndarray]:
  width = max(map(len, FIXED))
  chars = np.zeros((len(FIXED), width), np.int32)
  for i, text in enumerate(FIXED):
    chars[i, :len(text)] = [ord(c) for c in text]
  return chars, np.array([len(text) for text in FIXED], np.int32)


_FIXED_CHARS, _FIXED_LEN = _fixed_tables()


@flax.struct.dataclass
class State:
  """One row's automaton state (int32 / bool scalars; arrays of them for a batch)."""
  ctx: jax.Array
  pos: jax.Array  # position in a fixed string, a word's trie node, digits or text length read
  fixed: jax.Array  # which fixed string
  # Header.
  rank: jax.Array
  score_voices: jax.Array  # voices `%%score` names (0: no %%score line)
  score_seen: jax.Array  # bit v-1 set for each voice number `%%score` named
  voices_seen: jax.Array  # bit v-1 set for each V: line
  number: jax.Array  # the number being read (voice, meter, unit, marker)
  voices: jax.Array  # V: lines so far
  unit_den: jax.Array
  meter_num: jax.Array
  meter_den: jax.Array  # 0: free meter
  meter_part: jax.Array  # 0 numerator, 1 denominator, 2 `C`, 3 `C|` or `none` done, 4 `n..`
  # Body.
  line: jax.Array
  voice: jax.Array  # the current voice number, 0 before the line's first
  target: jax.Array  # ticks of the line's bars, -1 before the first voice's bar ends
  bar_code: jax.Array  # the barline being read, or the line's right barline once set
  right_code: jax.Array  # -1 before the first voice's barline
  left_code: jax.Array  # the first line's left barline (0: none), -1 before its first voice's
  left_here: jax.Array  # the left barline the current voice wrote on the first line (0: none)
  volta: jax.Array  # the ending the line's bars belong to (0: none)
  repeats: jax.Array  # start repeats not closed yet
  marks: jax.Array  # a bar's zero-length elements since its last note
  fresh: jax.Array  # nothing of the current voice's bar written yet
  bar_where: jax.Array  # 0 after an eos, 1 inside a patch, 2 at a patch start without eos
  # A bar's content.
  acc: jax.Array  # ticks so far
  sub: jax.Array
  tok: jax.Array
  num: jax.Array
  den: jax.Array
  after_note: jax.Array  # a tie or a broken rhythm may follow
  need_note: jax.Array  # a broken rhythm or a tuplet waits for its note
  # Notes in the open chord or grace group; in an annotation, a `:` just written; `%%score`'s
  # open brackets (a base-4 stack); in a V: line, where its names stand (N_*).
  inner: jax.Array
  in_chord_note: jax.Array  # a chord note's pitch was read (octave marks or a tie may follow)
  rest: jax.Array  # the note being read is a rest (no octave marks)
  tied: jax.Array  # the last note has its tie
  comments: jax.Array  # `%` lines of the header
  info_line: jax.Array  # the header's one `I:` line is written
  forced_at: jax.Array  # characters of a fixed header field written
  tuplet: jax.Array  # the (p:q:r field being read, 0..2, and digits as number
  tp: jax.Array
  tq: jax.Array
  tr: jax.Array
  group_left: jax.Array  # notes of the tuplet group still to come
  group_sum: jax.Array  # their ticks so far
  group_p: jax.Array
  group_q: jax.Array
  spaced: jax.Array  # the last character was a space
  run: jax.Array  # a note's octave marks, length characters and ties in a row
  items: jax.Array  # items after a V: line's clef
  dead: jax.Array


def initial() -> State:
  """The state after the bos patch: a metadata line starts."""
  flags = ("fresh", "after_note", "need_note", "in_chord_note", "rest", "tied", "info_line",
           "spaced", "dead")
  fields = {f.name: jnp.bool_(False) if f.name in flags else jnp.int32(0)
            for f in dataclasses.fields(State)}
  starts = dict(ctx=H_LINE, rank=R_START, unit_den=8, meter_num=4, meter_den=4, target=-1,
                left_code=-1, right_code=-1, sub=S_NONE, tok=T_IDLE, group_p=1, group_q=1)
  return State(**{**fields, **{k: jnp.int32(v) for k, v in starts.items()}})


def _digits(n: jax.Array) -> jax.Array:
  return 1 + (n >= 10) + (n >= 100) + (n >= 1000) + (n >= 10000)


def _digit_at(n: jax.Array, k: jax.Array) -> jax.Array:
  """The k-th decimal digit of n, from the left."""
  power = jnp.array([1, 10, 100, 1000, 10000], jnp.int32)[(_digits(n) - 1 - k).clip(0, 4)]
  return (n // power) % 10


def _note_ticks(num: jax.Array, den: jax.Array) -> jax.Array:
  """Ticks of a length `num/den` units (den a power of two up to 64)."""
  return num.clip(1) * (TICKS // den.clip(1))


def _round_group(total: jax.Array) -> jax.Array:
  """abctoolkit's rounding of a tuplet group: to the nearest unit when within 1/64 of it."""
  # (One remainder by a constant, without jnp's general floor-mod: this runs for every length.)
  below = jax.lax.rem(total, TICKS)
  below = jnp.where(below < 0, below + TICKS, below)
  return jnp.where(below <= MIN_TICKS, total - below,
                   jnp.where(below >= TICKS - MIN_TICKS, total - below + TICKS, total))


class _Next:
  """The candidate outcome of one character: ok and the fields it changes."""

  def __init__(self, state: State):
    self.state = state
    self.ok = jnp.bool_(False)

  def when(self, cond, **changes) -> None:
    """Where cond holds (and no earlier branch took the character), accept with changes."""
    take = cond & ~self.ok
    self.state = self.state.replace(**{
        k: jnp.where(take, jnp.asarray(v, getattr(self.state, k).dtype), getattr(self.state, k))
        for k, v in changes.items()})
    self.ok = self.ok | cond


def _bound(s: State) -> jax.Array:
  """Ticks the current voice's bar may still take."""
  meter = jnp.where(s.meter_den > 0,
                    BAR_LIMIT * s.meter_num.clip(1, MAX_NUM) * s.unit_den *
                    (TICKS // s.meter_den.clip(1)),
                    FREE_BAR_UNITS * TICKS)
  return jnp.where(s.target >= 0, s.target, meter) - s.acc


# Ticks a tuplet group (p:q of single digits) rounds its total up to a multiple of: MIN_TICKS *
# p / gcd(p, q), as a table (jnp.gcd is a while loop).
_GROUP_STEP = np.array([[MIN_TICKS * max(p, 1) // np.gcd(max(p, 1), max(q, 1)) for q in range(10)]
                        for p in range(10)], np.int32)


def _group_step(p: jax.Array, q: jax.Array) -> jax.Array:
  return jnp.asarray(_GROUP_STEP)[p.clip(0, 9), q.clip(0, 9)]


def _fits(s: State, ticks: jax.Array) -> jax.Array:
  """Whether a note of `ticks` fits the bar (inside a tuplet group, scaled by the group)."""
  in_group = s.group_left > 0
  # Before the group's last note, room for the notes still to come (1/64 unit each at least) and
  # for the total to be a whole number of 1/64 units (`_commit`): the sum rounded up to a multiple
  # of `step`. (The last note's own lengths: `_group_can_close`.)
  step = _group_step(s.group_p, s.group_q)
  total = s.group_sum + ticks + (s.group_left - 1).clip(0) * MIN_TICKS
  grouped = jnp.where(
      s.group_left > 1, (total + step - 1) // step * step * s.group_q <= _bound(s) * s.group_p,
      _round_group(total * s.group_q // s.group_p.clip(1)) <= _bound(s))
  return jnp.where(in_group, grouped, ticks <= _bound(s))


def _room_for_note(s: State) -> jax.Array:
  """A note can start: some length of it fits the bar (and closes its tuplet group)."""
  return _fits(s, MIN_TICKS) & _group_can_close(s, jnp.int32(0), jnp.int32(0), jnp.int32(T_PITCH))


def _group_fits(s: State, p: jax.Array, q: jax.Array, r: jax.Array) -> jax.Array:
  """A tuplet group `(p:q:r` of the shortest notes fits the bar, its total rounded up to a
  whole number of 1/64 units (`_commit`)."""
  p, q = p.clip(1), q.clip(1)
  step = _group_step(p, q)
  return (r * MIN_TICKS + step - 1) // step * step * q <= _bound(s) * p


def _pending_ticks(s: State) -> jax.Array:
  """The length of the note being read, were it to end here."""
  den = jnp.where(s.tok == T_SLASH, 2 * jnp.where(s.num > 0, 0, 1), s.den)
  return _note_ticks(jnp.where(s.num > 0, s.num, 1), jnp.where(s.tok >= T_SLASH, den, 1))


def _note_can_end(s: State) -> jax.Array:
  """A note being read is complete here (`n/` needs its denominator, a partial one its rest)."""
  den_ok = (s.den == 1) | (s.den == 2) | (s.den == 4) | (s.den == 8) | (s.den == 16) | (
      s.den == 32) | (s.den == 64)
  return jnp.select([s.tok == T_IDLE, s.tok == T_ACC, s.tok == T_PITCH, s.tok == T_NUM,
                     s.tok == T_SLASH], [True, False, True, True, s.num == 0], den_ok)


def _commit(s: State) -> tuple[State, jax.Array]:
  """Ends the note being read: its ticks go to the bar or its tuplet group. (state, ok)."""
  pending = s.tok != T_IDLE
  ticks = _pending_ticks(s)
  in_group = s.group_left > 0
  group_sum = s.group_sum + ticks
  closes = in_group & (s.group_left == 1)
  group_total = _round_group(group_sum * s.group_q // s.group_p)
  # A group's total is a whole number of 1/64 units, as every bar's end must be.
  group_ok = ~closes | ((group_total <= _bound(s)) & (group_total % MIN_TICKS == 0))
  ok = ~pending | (_note_can_end(s) & _fits(s, ticks) & group_ok)
  acc = jnp.where(in_group, jnp.where(closes, s.acc + group_total, s.acc), s.acc + ticks)
  new = s.replace(
      acc=jnp.where(pending, acc, s.acc),
      group_sum=jnp.where(pending & in_group, jnp.where(closes, 0, group_sum), s.group_sum),
      group_left=jnp.where(pending & in_group, s.group_left - 1, s.group_left),
      # (0 marks a note that closed its group: no broken rhythm may pair it with the next.)
      group_p=jnp.where(pending, jnp.where(closes, 0, jnp.where(in_group, s.group_p, 1)),
                        s.group_p),
      tok=jnp.int32(T_IDLE), num=jnp.int32(0), den=jnp.int32(0),
      after_note=s.after_note | pending, need_note=s.need_note & ~pending,
      tied=s.tied & ~pending)
  return new, ok


def _content_complete(s: State) -> jax.Array:
  """The bar may end here: nothing open, and its length right (after the pending note)."""
  closed = (s.sub == S_NONE) & ~s.need_note & (s.group_left == 0)
  # The first voice's bar is a whole number of 1/64 units, which every other voice can fill.
  length = jnp.where(s.target >= 0, s.acc == s.target, (s.acc > 0) & (s.acc % MIN_TICKS == 0))
  return closed & length


def _min_ticks(num: jax.Array, den_prefix: jax.Array, tok: jax.Array) -> jax.Array:
  """The shortest length a note being read can still get."""
  reachable = jnp.select([den_prefix == 1, den_prefix == 3, den_prefix == 6], [16, 32, 64],
                         den_prefix)
  den = jnp.where((tok == T_DEN) & (den_prefix > 0), reachable, 64)
  return _note_ticks(jnp.where(num > 0, num, 1), den)


_POWERS = np.array([1, 2, 4, 8, 16, 32, 64], np.int32)


def _group_can_close(s: State, num: jax.Array, den: jax.Array, tok: jax.Array) -> jax.Array:
  """A tuplet group's last note, spelled up to (num, den, tok), can still get a length that
  brings the group's total to a whole number of 1/64 units within the bar (`_commit`)."""
  # Its reachable lengths: numerators (the one read, or one more digit) over denominators (any
  # power of two before the `/`; after it, those the digits read can still become).
  extended = num * 10 + jnp.arange(10, dtype=jnp.int32)
  nums = jnp.concatenate([jnp.where(num > 0, num, 1)[None], extended])
  num_ok = jnp.concatenate([jnp.bool_(True)[None], ((tok == T_PITCH) | (tok == T_NUM)) &
                            (extended > 0) & (extended <= MAX_NUM)])
  dens = jnp.asarray(_POWERS)
  den_ok = jnp.select(
      [tok == T_DEN, tok == T_SLASH],
      [(dens == den) | ((den == 1) & (dens == 16)) | ((den == 3) & (dens == 32)) |
       ((den == 6) & (dens == 64)), dens > 1], jnp.ones_like(dens, bool))
  # Each length is a whole number of 1/64 units, so a multiple of p ticks: the scaled total is
  # the sum's so far plus each length's, with no division per length.
  p = s.group_p.clip(1)
  scaled = _round_group(s.group_sum * s.group_q // p +
                        nums[:, None] * ((TICKS // dens) * s.group_q // p)[None, :])
  fits = (jax.lax.rem(scaled, MIN_TICKS) == 0) & (scaled <= _bound(s))
  return (s.group_left != 1) | jnp.any(num_ok[:, None] & den_ok[None, :] & fits)


def _power_of_two_prefix(n: jax.Array) -> jax.Array:
  """n is 1 to 64 or the start of 16, 32 or 64."""
  return (n == 1) | (n == 2) | (n == 3) | (n == 4) | (n == 6) | (n == 8) | (n == 16) | (
      n == 32) | (n == 64)


def _meter_denominator(n: jax.Array) -> jax.Array:
  """A meter's denominator: powers of two, and the 3, 6 and 12 of inline meters such as 1/6."""
  return functools.reduce(jnp.logical_or, [n == d for d in METER_DENOMINATORS])


def _tempo(s: State, c: jax.Array, end: int) -> tuple[State, jax.Array, jax.Array]:
  """A tempo `n/d=bpm` up to `end`: (state, ok, ended). `meter_part` is the part being read."""
  digit = c - ord("0")
  is_digit = jnp.asarray(_DIGIT)[c]
  n = _Next(s)
  part, number = s.meter_part, s.number
  n.when((part == 0) & is_digit & ((number > 0) | (digit > 0)) & (number < 10),
         number=number * 10 + digit)
  n.when((part == 0) & (c == ord("/")) & (number > 0), meter_part=1, number=0)
  n.when((part == 1) & is_digit & _power_of_two_prefix(number * 10 + digit),
         number=number * 10 + digit)
  power_of_two = (number > 0) & (number <= 64) & ((number & (number - 1)) == 0)
  n.when((part == 1) & (c == ord("=")) & power_of_two, meter_part=2, number=0)
  n.when((part == 2) & is_digit & ((number > 0) | (digit > 0)) & (number < 100),
         number=number * 10 + digit)
  ended = (part == 2) & (c == end) & (number > 0)
  n.when(ended, meter_part=0, number=0)
  return n.state, n.ok, ended


def _word(s: State, c: jax.Array, at_end: jax.Array, following: np.ndarray,
          final: np.ndarray) -> tuple[State, jax.Array, jax.Array]:
  """A word of a trie, ended by a char where `at_end`; its node in `pos` (0 counts as the root):
  (state, ok, ended)."""
  node = jnp.where(s.pos == 0, 1, s.pos)
  nxt = jnp.asarray(following)[node, c]
  ended = at_end & jnp.asarray(final)[node]
  n = _Next(s)
  n.when(nxt > 0, pos=nxt)
  n.when(ended, pos=0)
  return n.state, n.ok, ended


def _meter(s: State, c: jax.Array, end: int) -> tuple[State, jax.Array, jax.Array]:
  """A meter's characters (`n/d`, `C`, `C|`, `none`) up to `end`: (state, ok, ended)."""
  digit = c - ord("0")
  is_digit = jnp.asarray(_DIGIT)[c]
  n = _Next(s)
  part, number = s.meter_part, s.number
  n.when((part == 0) & is_digit & ((number > 0) | (digit > 0)) & (s.pos < 2),
         number=number * 10 + digit, pos=s.pos + 1)
  n.when((part == 0) & (c == ord("/")) & (number > 0), meter_part=1, meter_num=number, number=0,
         pos=0)
  n.when((part == 1) & is_digit & _meter_denominator(number * 10 + digit),
         number=number * 10 + digit, pos=s.pos + 1)
  n.when((part == 0) & (s.pos == 0) & (c == ord("C")), meter_part=2)
  if end == ord("\n"):  # (in an inline `[M:C|]`, abctoolkit would read `|]` as a barline)
    n.when((part == 2) & (c == ord("|")), meter_part=3)
  n.when((part == 0) & (s.pos == 0) & (c == ord("n")), meter_part=4, pos=1)
  none_char = jnp.asarray(np.array([ord(ch) for ch in "none"], np.int32))[s.pos.clip(0, 3)]
  n.when((part == 4) & (s.pos < 4) & (c == none_char), pos=s.pos + 1)
  at_end = c == end
  n.when(at_end & (part == 1) & _meter_denominator(number), meter_den=number, pos=0)
  n.when(at_end & (part == 2), meter_num=4, meter_den=4, pos=0)
  n.when(at_end & (part == 3), meter_num=2, meter_den=2, pos=0)
  n.when(at_end & (part == 4) & (s.pos == 4), meter_den=0, pos=0)
  return n.state, n.ok, at_end & n.ok


def _reset_bar(s: State, **changes) -> State:
  return s.replace(acc=jnp.int32(0), sub=jnp.int32(S_NONE), left_here=jnp.int32(0),
                   fresh=jnp.bool_(True),
                   tok=jnp.int32(T_IDLE), num=jnp.int32(0), den=jnp.int32(0),
                   after_note=jnp.bool_(False), need_note=jnp.bool_(False), inner=jnp.int32(0),
                   in_chord_note=jnp.bool_(False), rest=jnp.bool_(False), tied=jnp.bool_(False),
                   group_left=jnp.int32(0), group_sum=jnp.int32(0), marks=jnp.int32(0),
                   **changes)


def _unseen(seen: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
  """Some voice number in [low, high] (up to MAX_SCORE_VOICES) is not in the `seen` bits."""
  high = jnp.minimum(high, MAX_SCORE_VOICES)
  width = (high - low + 1).clip(0, MAX_SCORE_VOICES)
  bits = jnp.left_shift(jnp.left_shift(1, width) - 1, (low - 1).clip(0, MAX_SCORE_VOICES - 1))
  return (low <= high) & (bits & ~seen != 0)


def _header(s: State, c: jax.Array, t: jax.Array) -> tuple[State, jax.Array]:
  """Metadata contexts: line starts, fixed keys, `%%score`, `L:`, `M:`, free text, `V:`."""
  del t  # metadata lines always start a patch
  cls = lambda table: jnp.asarray(table)[c]
  digit = c - ord("0")
  n = _Next(s)
  line = s.ctx == H_LINE
  rank = s.rank
  fixed = lambda which, pos=1, **kw: dict(ctx=H_FIXED, fixed=which, pos=pos, **kw)
  n.when(line & (c == ord("%")) & (rank == R_START), ctx=H_PERCENT)
  n.when(line & (c == ord("L")) & (rank < R_UNIT), **fixed(F_UNIT, rank=R_UNIT, pos=0))
  n.when(line & (c == ord("Q")) & (rank == R_UNIT), **fixed(F_TEMPO, rank=R_TEMPO, pos=0))
  n.when(line & (c == ord("M")) & ((rank == R_UNIT) | (rank == R_TEMPO)),
         **fixed(F_METER, rank=R_METER, pos=0))
  n.when(line & (c == ord("K")) & (rank == R_METER), **fixed(F_KEY, rank=R_KEY, pos=0))
  more_voices = (s.score_voices == 0) | (s.voices < s.score_voices)
  n.when(line & (c == ord("V")) & (rank >= R_KEY) & more_voices,
         **fixed(F_VOICE, rank=R_VOICES, pos=0))
  n.when(line & (c == ord("I")) & (rank >= R_UNIT) & ~s.info_line,
         **fixed(F_INFO, pos=0, info_line=True))
  voices_done = (rank == R_VOICES) & ((s.score_voices == 0) | (s.voices == s.score_voices))
  n.when(line & (c == ord("[")) & voices_done,
         ctx=B_FIXED, fixed=F_MARKER, pos=1, voice=0, target=-1, right_code=-1)
  # `%%score` or a comment.
  percent = s.ctx == H_PERCENT
  n.when(percent & (c == ord("%")) & (rank == R_START), **fixed(F_SCORE, rank=R_SCORE))
  more = s.comments < MAX_COMMENTS
  n.when(percent & more & (c == ord("\n")), ctx=EOL, comments=s.comments + 1)
  n.when(percent & more & cls(_PRINTABLE), ctx=H_TEXT, comments=s.comments + 1, pos=1)
  # Fixed strings (header keys; the body's `[r:` and `[V:` share the logic).
  in_fixed = (s.ctx == H_FIXED) | (s.ctx == B_FIXED)
  expected = jnp.asarray(_FIXED_CHARS)[s.fixed, s.pos.clip(0, _FIXED_CHARS.shape[1] - 1)]
  last = s.pos + 1 == jnp.asarray(_FIXED_LEN)[s.fixed]
  n.when(in_fixed & (c == expected) & last, ctx=jnp.asarray(_FIXED_NEXT)[s.fixed], pos=0,
         number=0, meter_part=0)
  n.when(in_fixed & (c == expected), pos=s.pos + 1)
  # `%%score`: voice numbers 1, 2, ... in order, with brackets, braces and bars around them.
  score = s.ctx == H_SCORE
  # (Groups list voices nearly in order: each number once, at most two past the voices named
  # before it, as in the training data's `{ ( 1 3 ) | 2 }`; together 1 to n.)
  bit = jnp.left_shift(1, (s.number - 1).clip(0, MAX_SCORE_VOICES - 1))
  closes_number = (s.number == 0) | ((s.number <= MAX_SCORE_VOICES) & (s.score_seen & bit == 0))
  closed = jnp.where(s.number > 0, s.score_voices + 1, s.score_voices)
  seen = jnp.where(s.number > 0, s.score_seen | bit, s.score_seen)
  number = s.number * 10 + digit
  highest = s.score_voices + 2
  n.when(score & cls(_DIGIT) & (number > 0) &
         (_unseen(s.score_seen, number, jnp.minimum(number, highest)) |
          _unseen(s.score_seen, number * 10, jnp.minimum(number * 10 + 9, highest))),
         number=number, pos=1)
  # Groups as abc2xml reads them, at most three deep: brackets hold brackets and braces, braces
  # hold parentheses (`inner` is the stack, base 4), none empty; `|` between two items outside
  # parentheses. (`pos`: 1 after an item, 2 after a `|`.)
  opener = jnp.select([c == ord("["), c == ord("{"), c == ord("(")], [1, 2, 3], 0)
  closer = jnp.select([c == ord("]"), c == ord("}"), c == ord(")")], [1, 2, 3], 0)
  top = s.inner % 4
  after_item = (s.pos == 1) | (s.number > 0)
  ends = dict(number=0, score_voices=closed, score_seen=seen)
  nests = (opener > top) | ((opener == 1) & (top == 1))
  # A group or a `|` needs an item after it: a voice not named yet.
  voice_left = closed < MAX_SCORE_VOICES
  n.when(score & nests & (s.inner < 16) & closes_number & voice_left,
         inner=s.inner * 4 + opener, pos=0, **ends)
  n.when(score & (closer > 0) & (closer == top) & after_item & closes_number, inner=s.inner // 4,
         pos=1, **ends)
  n.when(score & (c == ord("|")) & after_item & (top != 3) & closes_number & voice_left, pos=2,
         **ends)
  n.when(score & (c == ord(" ")) & closes_number, **ends)
  n.when(score & (c == ord("\n")) & closes_number & after_item & (s.inner == 0) &
         (seen == jnp.left_shift(1, closed) - 1), ctx=EOL, pos=0, **ends)
  # `L:1/d`.
  unit = s.ctx == H_UNIT
  unit2 = s.number * 10 + digit
  n.when(unit & cls(_DIGIT) & ((unit2 == 1) | (unit2 == 2) | (unit2 == 3) | (unit2 == 4) |
                               (unit2 == 8) | (unit2 == 16) | (unit2 == 32)), number=unit2)
  n.when(unit & (c == ord("\n")) & ((s.number == 2) | (s.number == 4) | (s.number == 8) |
                                     (s.number == 16) | (s.number == 32)),
         unit_den=s.number, ctx=EOL)
  # `M:`.
  metered, meter_ok, meter_end = _meter(s, c, ord("\n"))
  n.when((s.ctx == H_METER) & meter_ok,
         **{k: getattr(metered, k) for k in ("number", "pos", "meter_part", "meter_num",
                                             "meter_den")},
         ctx=jnp.where(meter_end, EOL, H_METER))
  # `Q:n/d=bpm`.
  tempo, tempo_ok, tempo_end = _tempo(s, c, ord("\n"))
  n.when((s.ctx == H_TEMPO) & tempo_ok, number=tempo.number, meter_part=tempo.meter_part,
         ctx=jnp.where(tempo_end, EOL, H_TEMPO))
  # `K:` a key (or a clef).
  key, key_ok, key_end = _word(s, c, c == ord("\n"), _KEY_NEXT, _KEY_FINAL)
  n.when((s.ctx == H_KEY) & key_ok, pos=key.pos, ctx=jnp.where(key_end, EOL, H_KEY))
  # A comment's text, or an `I:` instruction's.
  text = s.ctx == H_TEXT
  n.when(text & (c == ord("\n")), ctx=EOL, pos=0)
  n.when(text & cls(_HEADER_TEXT) & (s.pos < MAX_COMMENT), pos=s.pos + 1)
  info = s.ctx == H_INFO
  n.when(info & (c == ord("\n")) & (s.pos > 0), ctx=EOL, pos=0)
  n.when(info & cls(_INFO_TEXT) & (s.pos < MAX_TEXT), pos=s.pos + 1)
  # A voice's clef, then its names (`nm="..." snm="..."`, quotes closed).
  clef, clef_ok, clef_end = _word(s, c, (c == ord(" ")) | (c == ord("\n")), _CLEF_NEXT,
                                  _CLEF_FINAL)
  n.when((s.ctx == H_CLEF) & clef_ok, pos=jnp.where(clef_end, 0, clef.pos),
         ctx=jnp.where(clef_end, jnp.where(c == ord(" "), H_NAMES, EOL), H_CLEF), inner=0,
         items=0)
  # Names and options as abc2xml reads them: `key="text"` or `key=value`, one space apart.
  names = s.ctx == H_NAMES
  inner = s.inner
  n.when(names & ((inner == N_ITEM) | (inner == N_CLOSED) | (inner == N_VALUE)) &
         (c == ord("\n")), ctx=EOL)
  n.when(names & ((inner == N_CLOSED) | (inner == N_VALUE)) & (c == ord(" ")), inner=N_ITEM,
         pos=0)
  n.when(names & (((inner == N_ITEM) & (s.items < MAX_VOICE_ITEMS)) | (inner == N_KEY)) &
         cls(_LOWER) & (s.pos < MAX_KEY), inner=N_KEY, pos=s.pos + 1,
         items=s.items + (inner == N_ITEM))
  n.when(names & (inner == N_KEY) & (c == ord("=")), inner=N_EQUALS, pos=0)
  n.when(names & (inner == N_EQUALS) & (c == ord('"')), inner=N_QUOTE)
  n.when(names & ((inner == N_EQUALS) | (inner == N_VALUE)) & cls(_VALUE) & (s.pos < MAX_TEXT),
         inner=N_VALUE, pos=s.pos + 1)
  n.when(names & (inner == N_QUOTE) & cls(_NAME_TEXT) & (s.pos < MAX_TEXT), pos=s.pos + 1)
  n.when(names & (inner == N_QUOTE) & (c == ord('"')), inner=N_CLOSED, pos=0)
  # `V:n`: the next voice number (with `%%score`, any voice it names not declared yet, as
  # `%%score` orders them), then its clef and names.
  voice = s.ctx == H_VOICE
  wanted = s.voices + 1
  scored = s.score_voices > 0
  unavailable = s.voices_seen | ~s.score_seen
  number = s.number * 10 + digit
  next_digit = (s.pos < _digits(wanted)) & (digit == _digit_at(wanted, s.pos))
  scored_digit = (number > 0) & (number <= MAX_SCORE_VOICES) & (
      _unseen(unavailable, number, number) | _unseen(unavailable, number * 10, number * 10 + 9))
  n.when(voice & cls(_DIGIT) & jnp.where(scored, scored_digit, next_digit), pos=s.pos + 1,
         number=number)
  complete = voice & jnp.where(scored, (s.number > 0) & _unseen(unavailable, s.number, s.number),
                               s.pos == _digits(wanted))
  declared = dict(voices=wanted, pos=0, number=0, voices_seen=s.voices_seen | jnp.left_shift(
      1, (s.number - 1).clip(0, MAX_SCORE_VOICES - 1)))
  n.when(complete & (c == ord(" ")), ctx=H_CLEF, **declared)
  n.when(complete & (c == ord("\n")), ctx=EOL, **declared)
  return n.state, n.ok


def _line_end(s: State, c: jax.Array, t: jax.Array) -> tuple[State, jax.Array]:
  """Within the patch of a line's `\\n`: eos closes it (a full patch starts the next line, which
  `step` reads from the line's start)."""
  start = jnp.where(s.line > 0, B_LINE, H_LINE)
  return s.replace(ctx=start), (c == tokenizer.EOS) & (t > 0)


def _body_start(s: State, c: jax.Array, t: jax.Array) -> tuple[State, jax.Array]:
  """A body line's start: `[r:` or, after a complete line, the bos-eos end."""
  del t
  n = _Next(s)
  n.when(c == ord("["), ctx=B_FIXED, fixed=F_MARKER, pos=1)
  n.when((c == tokenizer.BOS) & (s.line > 0) & (s.volta == 0), ctx=END)
  return n.state, n.ok


def _marker_and_voice(s: State, c: jax.Array, t: jax.Array) -> tuple[State, jax.Array]:
  """`[r:i/j]` with i the line's index, and `[V:n]` with n a later voice of the header."""
  del t
  cls = lambda table: jnp.asarray(table)[c]
  digit = c - ord("0")
  n = _Next(s)
  index = s.ctx == B_INDEX
  n.when(index & cls(_DIGIT) & (s.pos < _digits(s.line)) & (digit == _digit_at(s.line, s.pos)),
         pos=s.pos + 1)
  n.when(index & (c == ord("/")) & (s.pos == _digits(s.line)), ctx=B_REMAIN, pos=0, number=0)
  remain = s.ctx == B_REMAIN
  n.when(remain & cls(_DIGIT) & (s.pos == 0), pos=1, number=digit)
  n.when(remain & cls(_DIGIT) & (s.number > 0) & (s.pos < 4), pos=s.pos + 1,
         number=s.number * 10 + digit)
  n.when(remain & (c == ord("]")) & (s.pos > 0), ctx=B_FIXED, fixed=F_VTAG, pos=0)
  voice = s.ctx == B_VOICE
  number = s.number * 10 + digit
  can_be = ((number > s.voice) & (number <= s.voices)) | (
      (number * 10 <= s.voices) & (number * 10 + 9 > s.voice))
  n.when(voice & cls(_DIGIT) & (number > 0) & can_be, number=number)
  bar = _reset_bar(s, ctx=jnp.int32(CONTENT), voice=s.number, number=jnp.int32(0))
  n.when(voice & (c == ord("]")) & (s.number > s.voice) & (s.number <= s.voices),
         **{k: getattr(bar, k) for k in ("ctx", "voice", "number", "acc", "sub", "tok", "left_here",
                                         "fresh",
                                         "num", "den", "after_note", "need_note", "inner",
                                         "in_chord_note", "rest", "tied", "group_left",
                                         "group_sum")})
  return n.state, n.ok


def _select(cond: jax.Array, a: State, b: State) -> State:
  return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def _content(s: State, c: jax.Array, t: jax.Array,
             tabulate: bool = False) -> tuple[State, jax.Array]:
  """A character of a voice's bar: open constructs first, then the note being read, then a new
  element, the bar's end (eos or barline) included. `tabulate`: see `step`."""
  cls = lambda table: jnp.asarray(table)[c]
  digit = c - ord("0")
  n = _Next(s)
  # 1. Inside an open construct.
  sub = s.sub
  # (`inner` marks a `:` just written: `::` would be a barline to abctoolkit.)
  n.when((sub == S_QUOTE) & (c == ord('"')), sub=S_NONE, pos=0, inner=0)
  n.when((sub == S_QUOTE) & cls(_QUOTE_TEXT) & (s.pos < MAX_TEXT) & ~((c == ord(":")) &
                                                                      (s.inner == 1)),
         pos=s.pos + 1, inner=(c == ord(":")).astype(jnp.int32))
  deco, deco_ok, deco_end = _word(s, c, c == ord("!"), _DECO_NEXT, _DECO_FINAL)
  n.when((sub == S_DECO) & deco_ok, pos=deco.pos, sub=jnp.where(deco_end, S_NONE, S_DECO))
  # Grace notes: `{`, an optional `/`, then notes (accidentals, pitch, octave marks, length).
  grace = sub == S_GRACE
  # (`num` counts a grace or chord note's accidentals, the first in `fixed`: one, `^^` or `__`;
  # `pos` marks the leading `/`.)
  doubled = cls(_ACCIDENTAL) & ~s.in_chord_note & (s.num == 1) & (c == s.fixed) & (c != ord("="))
  # A note's octave marks are all `,` or all `'` (the first in `fixed`).
  octave = cls(_OCTAVE) & ((c == s.fixed) | ~jnp.asarray(_OCTAVE)[s.fixed.clip(0, VOCAB - 1)])
  n.when(grace & (c == ord("}")) & (s.inner > 0) & (s.num == 0) & (s.den != 2), sub=S_NONE,
         inner=0, in_chord_note=False, pos=0, den=0)
  grace_room = s.inner < MAX_GRACE_NOTES  # (for a next note, with what comes before it)
  n.when(grace & cls(_PITCH) & grace_room, inner=s.inner + 1, in_chord_note=True, num=0,
         fixed=0, den=0)
  n.when(grace & cls(_ACCIDENTAL) & ~s.in_chord_note & (s.num == 0) & grace_room, num=1,
         fixed=c)
  n.when(grace & doubled, num=2)
  # (`den`: 1 once a grace note's length has begun, its octave marks before it; 2 after a
  # decoration, which a note must follow.)
  n.when(grace & s.in_chord_note & octave & (s.den == 0), fixed=c)
  n.when(grace & s.in_chord_note & (cls(_DIGIT) | (c == ord("/")) | (c == ord("-"))), den=1)
  n.when(grace & (c == ord("/")) & (s.inner == 0) & (s.pos == 0) & (s.num == 0), pos=1)
  # (No slurs: abc2xml cannot read them in a grace group.)
  n.when(grace & cls(_DECORATION) & (s.num == 0) & grace_room, in_chord_note=False, den=2)
  n.when(grace & cls(_ACCIDENTAL) & s.in_chord_note & grace_room, in_chord_note=False, num=1,
         fixed=c)
  field_sub = jnp.select([s.fixed == ord("M"), s.fixed == ord("K"), s.fixed == ord("Q")],
                         [S_FIELD_METER, S_FIELD_WORD, S_FIELD_TEMPO], S_FIELD_TEXT)
  n.when((sub == S_FIELD_KEY) & (s.fixed > 0) & (c == ord(":")), sub=field_sub, meter_part=0,
         number=0, pos=0)
  word, word_ok, word_end = _word(s, c, c == ord("]"), _KEY_NEXT, _KEY_FINAL)
  n.when((sub == S_FIELD_WORD) & word_ok, pos=word.pos,
         sub=jnp.where(word_end, S_NONE, S_FIELD_WORD))
  tempo, tempo_ok, tempo_end = _tempo(s, c, ord("]"))
  n.when((sub == S_FIELD_TEMPO) & tempo_ok, number=tempo.number, meter_part=tempo.meter_part,
         sub=jnp.where(tempo_end, S_NONE, S_FIELD_TEMPO))
  metered, meter_ok, meter_end = _meter(s, c, ord("]"))
  n.when((sub == S_FIELD_METER) & meter_ok,
         **{k: getattr(metered, k) for k in ("number", "pos", "meter_part", "meter_num",
                                             "meter_den")},
         sub=jnp.where(meter_end, S_NONE, S_FIELD_METER))
  n.when((sub == S_FIELD_TEXT) & (c == ord("]")) & (s.pos > 0), sub=S_NONE, pos=0)
  n.when((sub == S_FIELD_TEXT) & cls(_INFO_TEXT) & (s.pos < MAX_TEXT), pos=s.pos + 1)
  room = _room_for_note(s)  # (one evaluation for the chord's `]` and a chord's first note)
  chord = sub == S_CHORD
  chord_room = s.inner < MAX_CHORD_NOTES  # (for a next note, with its accidental)
  n.when(chord & cls(_ACCIDENTAL) & ~s.in_chord_note & (s.num == 0) & chord_room, num=1,
         fixed=c)
  n.when(chord & doubled, num=2)
  n.when(chord & cls(_PITCH) & chord_room, inner=s.inner + 1, in_chord_note=True, num=0,
         fixed=0)
  n.when(chord & octave & s.in_chord_note, fixed=c)
  n.when(chord & (c == ord("-")) & s.in_chord_note)
  n.when(chord & cls(_ACCIDENTAL) & s.in_chord_note & chord_room, in_chord_note=False, num=1,
         fixed=c)
  # A chord is one note: its length follows the `]`.
  n.when(chord & (c == ord("]")) & (s.inner > 0) & (s.num == 0) & room,
         sub=S_NONE, inner=0, in_chord_note=False, tok=T_PITCH, rest=True)
  # `[`: an inline field (`[K:`, `[M:`, `[Q:`, `[I:`) or a chord.
  bracket = sub == S_FIELD_KEY
  # (A meter changes where a bar starts: the bar read so far keeps its bound.)
  n.when(bracket & (s.fixed == 0) & cls(_FIELD_LETTERS) & ((c != ord("M")) | (s.acc == 0)) &
         (s.marks < MAX_MARKS), fixed=c, marks=s.marks + 1)
  n.when(bracket & (s.fixed == 0) & (cls(_PITCH) | cls(_ACCIDENTAL)) & room,
         sub=S_CHORD, inner=cls(_PITCH).astype(jnp.int32), in_chord_note=cls(_PITCH), tied=False,
         num=cls(_ACCIDENTAL).astype(jnp.int32), fixed=c, marks=0)
  # Tuplet specs: `(3`, or `(p:q:r` with single digits.
  tup = sub == S_TUPLET
  field_value = jnp.stack([s.tp, s.tq, s.tr])[s.tuplet.clip(0, 2)]
  # (Each digit leaves room in the bar for the shortest group the spec can still become.)
  n.when(tup & (c == ord(":")) & (s.tuplet < 2) & (field_value > 0), tuplet=s.tuplet + 1)
  tq = jnp.where(s.tuplet == 1, digit, s.tq)
  tr = jnp.where(s.tuplet == 2, digit, jnp.int32(1))
  n.when(tup & cls(_DIGIT) & (digit > 0) & (field_value == 0) & _group_fits(s, s.tp, tq, tr),
         tq=tq, tr=jnp.where(s.tuplet == 2, digit, s.tr))
  # (Not right after a broken rhythm, which abctoolkit would apply to the spec.)
  n.when((sub == S_PAREN) & cls(_DIGIT) & (digit > 0) & (s.group_left == 0) & ~s.need_note &
         _group_fits(s, digit, jnp.int32(1), jnp.int32(1)),
         sub=S_TUPLET, tuplet=0, tp=digit, tq=0, tr=0)
  # The spec ends at its first other character; `(` without a digit opens a slur.
  triplet = (s.tuplet == 0) & (s.tp == 3) & _group_fits(s, s.tp, jnp.int32(2), jnp.int32(3))
  spec_done = tup & (triplet | ((s.tuplet == 2) & (s.tr > 0)))
  # The first line's bars may open with a barline (`|:`), the same for every voice.
  symbol = jnp.asarray(_BAR_SYMBOL)[c]
  left = sub == S_LEFT
  code = s.bar_code * 16 + symbol
  # (No volta number: abctoolkit cannot split a voice whose left barline has one.)
  n.when(left & (symbol > 0) & (symbol < _BARLINE_SYMBOLS["1"]) &
         (s.bar_code < 16**(_BARLINE_LEN - 1)) &
         jnp.asarray(_BAR_PREFIX)[code.clip(0, 16**_BARLINE_LEN - 1)] &
         _may_become(code, s.left_code), bar_code=code)
  left_done = left & jnp.asarray(_BAR_COMPLETE)[s.bar_code] & (
      (s.left_code < 0) | (s.left_code == s.bar_code))
  # (The tokenizer cuts the bar before a left barline: an eos, then a patch opening with it.)
  n.when((sub == S_NONE) & s.fresh & (s.line == 0) & (s.left_code != 0) &
         (c == tokenizer.EOS) & (t > 0), sub=S_LEFT_NEXT)
  left_opens = (t == 0) & (symbol > 0) & (symbol <= 2) & _may_become(symbol, s.left_code)
  n.when(((sub == S_LEFT_NEXT) | ((sub == S_NONE) & s.fresh & (s.line == 0))) & left_opens,
         sub=S_LEFT, bar_code=symbol, fresh=False)
  # (On the first line, a voice after one that opened with a barline opens with it too.)
  awaits_left = (sub == S_NONE) & s.fresh & (s.line == 0) & (s.left_code > 0)
  free = ~n.ok & ~awaits_left & ((sub == S_NONE) | spec_done | (sub == S_PAREN) | left_done)
  # The state a free character starts from does not depend on the character (only whether it is
  # free does): what follows, the lengths' room above all, is computed once per state and not for
  # each of the 128 candidates.
  s = s.replace(
      sub=jnp.int32(S_NONE),
      group_left=jnp.where(spec_done, jnp.where(s.tuplet == 0, 3, s.tr), s.group_left),
      group_p=jnp.where(spec_done, s.tp, s.group_p),
      group_q=jnp.where(spec_done, jnp.where(s.tuplet == 0, 2, s.tq), s.group_q),
      group_sum=jnp.where(spec_done, 0, s.group_sum), need_note=s.need_note | spec_done,
      left_here=jnp.where(left_done, s.bar_code, s.left_here),
      bar_code=jnp.where(left_done, 0, s.bar_code), fresh=jnp.bool_(False))
  n.state = _select(free, s, n.state)
  # 2. The note being read takes length characters.
  reading = free & (s.tok != T_IDLE)
  fits_min = lambda num, den, tok: _fits(s, _min_ticks(num, den, tok)) & _group_can_close(
      s, num, den, tok)
  # A digit extends the numerator before the `/` and the denominator after it: one room check.
  numeric = (s.tok == T_PITCH) | (s.tok == T_NUM)
  digit_fits = lambda d: fits_min(
      jnp.where(numeric, s.num * 10 + d, s.num),
      jnp.where(numeric, 0, jnp.where(s.tok == T_SLASH, d, s.den * 10 + d)),
      jnp.where(numeric, T_NUM, T_DEN))
  # (Over many candidates of one state, tabulated once for the ten digits.)
  length_fits = (jax.vmap(digit_fits)(jnp.arange(10, dtype=jnp.int32))[digit.clip(0, 9)]
                 if tabulate else digit_fits(digit))
  n.when(reading & (s.tok == T_ACC) & (c == s.fixed) & (s.pos == 1) & (c != ord("=")), pos=2)
  n.when(reading & (s.tok == T_ACC) & cls(_PITCH), tok=T_PITCH, rest=False, fixed=0)
  n.when(reading & octave & (s.tok == T_PITCH) & ~s.rest, fixed=c)
  num2 = s.num * 10 + digit
  n.when(reading & cls(_DIGIT) & ((s.tok == T_PITCH) | (s.tok == T_NUM)) & (num2 > 0) &
         (num2 <= MAX_NUM) & length_fits, tok=T_NUM, num=num2)
  n.when(reading & (c == ord("/")) & ((s.tok == T_PITCH) | (s.tok == T_NUM)) &
         fits_min(s.num, jnp.int32(0), jnp.int32(T_SLASH)), tok=T_SLASH)
  den2 = jnp.where(s.tok == T_SLASH, digit, s.den * 10 + digit)
  den_prefix = (den2 == 1) | (den2 == 2) | (den2 == 3) | (den2 == 4) | (den2 == 6) | (
      den2 == 8) | (den2 == 16) | (den2 == 32) | (den2 == 64)
  n.when(reading & cls(_DIGIT) & ((s.tok == T_SLASH) | (s.tok == T_DEN)) & den_prefix &
         length_fits, tok=T_DEN, den=den2)
  # 3. Anything else first ends the note being read, then starts an element or ends the bar.
  committed, commit_ok = _commit(s)
  free = free & ~n.ok & commit_ok
  s = committed
  n.state = _select(free, s, n.state)
  room = _room_for_note(s)  # after the pending note: for a note, a `[` and a broken rhythm
  note_ok = free & room
  n.when(note_ok & (cls(_PITCH) | cls(_REST)), tok=T_PITCH, rest=cls(_REST), after_note=False,
         tied=False, fixed=0, marks=0)
  n.when(note_ok & cls(_ACCIDENTAL), tok=T_ACC, fixed=c, pos=1, after_note=False, marks=0)
  # (`[` opens a chord or an inline field: one of them must still be possible.)
  mark_ok = s.marks < MAX_MARKS
  mark = s.marks + 1
  n.when(free & (c == ord("[")) & (mark_ok | room), sub=S_FIELD_KEY, fixed=0,
         after_note=False)
  n.when(free & mark_ok & (c == ord("(")), sub=S_PAREN, after_note=False, marks=mark)
  n.when(free & mark_ok & (c == ord(")")), marks=mark)
  n.when(free & (c == ord("-")) & s.after_note & ~s.tied, tied=True)
  n.when(free & ((c == ord(">")) | (c == ord("<"))) & s.after_note & (s.group_left == 0) &
         (s.group_p > 0) & room,
         after_note=False, need_note=True)
  n.when(free & mark_ok & (c == ord(" ")), after_note=False, marks=mark)
  n.when(free & mark_ok & (c == ord('"')), sub=S_QUOTE, pos=0, inner=0, after_note=False,
         marks=mark)
  n.when(free & mark_ok & (c == ord("!")), sub=S_DECO, pos=0, after_note=False, marks=mark)
  n.when(free & mark_ok & (c == ord("{")) & ~s.need_note, sub=S_GRACE, inner=0, pos=0, num=0,
         in_chord_note=False, after_note=False, marks=mark)
  n.when(free & mark_ok & cls(_DECORATION), after_note=False, marks=mark)
  # The bar ends: an eos before the barline that opens the next voice's patch, or the barline.
  left_ok = (s.line > 0) | (s.left_code < 0) | (s.left_code == s.left_here)
  complete = free & _content_complete(s) & left_ok
  target = jnp.where(s.target >= 0, s.target, s.acc)
  ends = dict(target=target, after_note=False,
              left_code=jnp.where(s.line == 0, s.left_here, s.left_code))
  n.when(complete & (c == tokenizer.EOS) & (t > 0) & (s.voice < s.voices),
         ctx=BARLINE, bar_code=0, bar_where=0, **ends)
  symbol = jnp.asarray(_BAR_SYMBOL)[c]
  opens = complete & (symbol > 0) & (symbol <= 2) & _may_become(symbol, s.right_code)
  n.when(opens & (t > 0), ctx=BARLINE, bar_code=symbol, bar_where=1, **ends)
  n.when(opens & (t == 0), ctx=BARLINE, bar_code=symbol, bar_where=2, **ends)
  return n.state, n.ok


def _may_become(code: jax.Array, right: jax.Array) -> jax.Array:
  """A barline read so far (`code`) can still become the line's barline (`right`; -1: any)."""
  shifted = jnp.right_shift(right, 4 * jnp.arange(_BARLINE_LEN, dtype=jnp.int32))
  return (right < 0) | jnp.any(shifted == code)


def _barline(s: State, c: jax.Array, t: jax.Array) -> tuple[State, jax.Array]:
  """A barline and its volta number, then the next voice's `[V:` or the line's `\\n`."""
  del t
  n = _Next(s)
  symbol = jnp.asarray(_BAR_SYMBOL)[c]
  code = s.bar_code * 16 + symbol
  # Endings as music21 can expand them: the first after a plain or double barline, each next one
  # on the repeat that closes the one before (`|1 ... :|2`).
  ending = symbol - (_BARLINE_SYMBOLS["1"] - 1)
  repeat_closes = _leading_symbol(s.bar_code) == _BARLINE_SYMBOLS[":"]
  ending_ok = jnp.where(s.volta == 0, (ending == 1) & _goes_on(s.bar_code),
                        (ending == s.volta + 1) & repeat_closes)
  # (Not on a first line whose voices open with a barline: abctoolkit cannot split a voice that
  # opens with one and ends with a volta number. A piece never ends on one, and a stopped piece is
  # cut before it: `sampling.whole_lines`.)
  volta_ok = (ending < 1) | (((s.line > 0) | (s.left_code <= 0)) & ending_ok)
  # (A first ending goes on past a plain or double barline, or ends on a closing repeat.)
  first_ok = (s.volta != 1) | (ending >= 1) | _goes_on(code) | (
      _leading_symbol(code) == _BARLINE_SYMBOLS[":"])
  # (A `:` after a barline's first symbol that is not one opens a start repeat.)
  open_repeats = _repeats_at_line_end(s, jnp.int32(0))
  starts = (symbol == _BARLINE_SYMBOLS[":"]) & (s.bar_code > 0) & (
      _leading_symbol(s.bar_code) != _BARLINE_SYMBOLS[":"])
  repeats_ok = ~starts | (open_repeats < MAX_REPEATS)
  n.when((symbol > 0) & volta_ok & first_ok & repeats_ok & (s.bar_code < 16**(_BARLINE_LEN - 1)) &
         jnp.asarray(_BAR_PREFIX)[code.clip(0, 16**_BARLINE_LEN - 1)] &
         _may_become(code, s.right_code), bar_code=code)
  # The barline is complete: every voice of a line closes with the same one. Inside a first
  # ending, a plain barline goes on with it, and a closing repeat opens the next.
  numbered = s.bar_code % 16 >= _BARLINE_SYMBOLS["1"]
  in_first = (s.volta == 1) & ~numbered & ~_goes_on(s.bar_code)
  ended = ~n.ok & jnp.asarray(_BAR_COMPLETE)[s.bar_code] & ~in_first & (
      (s.right_code < 0) | (s.right_code == s.bar_code))
  next_voice = ended & (c == ord("[")) & (s.bar_where != 1) & (s.voice < s.voices)
  n.when(next_voice, ctx=B_FIXED, fixed=F_VTAG, pos=1, right_code=s.bar_code, number=0)
  volta = jnp.where(numbered, s.bar_code % 16 - (_BARLINE_SYMBOLS["1"] - 1),
                    jnp.where(s.volta == 1, 1, 0))
  n.when(ended & (c == ord("\n")) & (s.bar_where != 0), ctx=EOL, line=s.line + 1, voice=0,
         target=-1, right_code=-1, volta=volta, repeats=_repeats_at_line_end(s, s.bar_code))
  return n.state, n.ok


def _repeats_after(code: jax.Array, open_repeats: jax.Array) -> jax.Array:
  """Start repeats open after a barline, as music21 counts them: one that closes with none open
  closes the piece's start."""
  core = jnp.where(code % 16 >= _BARLINE_SYMBOLS["1"], code // 16, code)
  colon = _BARLINE_SYMBOLS[":"]
  ends = _leading_symbol(core) == colon
  starts = (core >= 16) & (core % 16 == colon)
  return jnp.maximum(open_repeats - ends, 0) + starts


def _repeats_at_line_end(s: State, right: jax.Array) -> jax.Array:
  """Start repeats open after the line's right barline `right` (and the first line's left)."""
  left = jnp.where((s.line == 0) & (s.left_code > 0),
                   _repeats_after(s.left_code.clip(0), s.repeats), s.repeats)
  return _repeats_after(right, left)


def _goes_on(code: jax.Array) -> jax.Array:
  """The barline is `|` or `||`, which an ending goes on past."""
  bar = _BARLINE_SYMBOLS["|"]
  return (code == bar) | (code == bar * 16 + bar)


def _leading_symbol(code: jax.Array) -> jax.Array:
  """The first symbol of a barline code."""
  return jnp.where(code >= 16**2, code // 16**2, jnp.where(code >= 16, code // 16, code))


def _end(s: State, c: jax.Array, t: jax.Array) -> tuple[State, jax.Array]:
  del t
  return s.replace(ctx=jnp.int32(DONE)), c == tokenizer.EOS


def _done(s: State, c: jax.Array, t: jax.Array) -> tuple[State, jax.Array]:
  del c, t
  return s, jnp.bool_(True)


_HANDLERS = {
    H_LINE: _header, H_PERCENT: _header, H_FIXED: _header, H_SCORE: _header, H_UNIT: _header,
    H_METER: _header, H_TEXT: _header, H_VOICE: _header, H_KEY: _header, H_TEMPO: _header,
    H_CLEF: _header, H_NAMES: _header, H_INFO: _header, EOL: _line_end, B_LINE: _body_start,
    B_FIXED: _header, B_INDEX: _marker_and_voice, B_REMAIN: _marker_and_voice,
    B_VOICE: _marker_and_voice, CONTENT: _content, BARLINE: _barline, END: _end, DONE: _done,
}


# Header fields a user can fix, in the context that reads each one's value.
FIELD_CONTEXTS = {"unit": H_UNIT, "tempo": H_TEMPO, "meter": H_METER, "key": H_KEY}
_FIELD_PATTERNS = {
    "unit": r"1/(2|4|8|16|32)", "tempo": r"[1-9]\d?/(1|2|4|8|16|32|64)=[1-9]\d{0,2}",
    "meter": r"[1-9]\d?/(1|2|4|8|16|32|64)|C\|?|none", "key": "|".join(map(re.escape, KEYS))}
_FIELD_WIDTH = 16


@dataclasses.dataclass(frozen=True)
class Header:
  """Header lines fixed by the user (None: the model's choice): `M:`, `K:`, `L:`, `Q:` values as
  the training data writes them ("3/4", "Eb", "1/8", "1/4=100") and how many voices."""
  meter: str | None = None
  key: str | None = None
  unit: str | None = None
  tempo: str | None = None
  voices: int | None = None

  def __post_init__(self):
    for field, pattern in _FIELD_PATTERNS.items():
      value = getattr(self, field)
      if value is not None and not re.fullmatch(pattern, value):
        raise ValueError(f"{field} {value!r} is not a {field} as ABC headers write it "
                         f"(e.g. {_EXAMPLES[field]})")
    if self.voices is not None and not 1 <= self.voices <= 99:
      raise ValueError(f"voices must be 1 to 99, got {self.voices}")


_EXAMPLES = {"unit": "1/8", "tempo": "1/4=100", "meter": "3/4, C, C| or none",
             "key": "C, Eb, F#min, Ddor or none"}


@flax.struct.dataclass
class Fixed:
  """A Header as arrays: each field's forced characters [F, W] and length [F] (0: free), and the
  number of voices (0: free)."""
  chars: jax.Array
  lengths: jax.Array
  voices: jax.Array


def fixed(header: Header | None = None) -> Fixed:
  header = header or Header()
  chars = np.zeros((len(FIELD_CONTEXTS), _FIELD_WIDTH), np.int32)
  lengths = np.zeros(len(FIELD_CONTEXTS), np.int32)
  for i, field in enumerate(FIELD_CONTEXTS):
    value = getattr(header, field)
    if field == "unit" and value is not None:
      value = value[2:]  # `L:1/` is read as a fixed key; the denominator is the value
    if value:
      chars[i, :len(value)] = [ord(ch) for ch in value]
      lengths[i] = len(value)
  return Fixed(jnp.asarray(chars), jnp.asarray(lengths), jnp.int32(header.voices or 0))


def _force(s: State, new: State, ok: jax.Array, c: jax.Array,
           header: Fixed) -> tuple[State, jax.Array]:
  """Narrows a transition to the fixed header: each fixed field's value, the fields it makes
  necessary (a fixed tempo's `Q:` line), and the number of voices."""
  field = jnp.select([s.ctx == context for context in FIELD_CONTEXTS.values()],
                     list(range(len(FIELD_CONTEXTS))), -1)
  length = header.lengths[field.clip(0)]
  value_char = header.chars[field.clip(0), s.forced_at.clip(0, _FIELD_WIDTH - 1)]
  in_value = (field >= 0) & (length > 0)
  value_ok = jnp.where(s.forced_at < length, c == value_char, c == ord("\n"))
  ok = ok & (~in_value | value_ok)
  tempo_fixed = header.lengths[list(FIELD_CONTEXTS).index("tempo")] > 0
  ok = ok & ~((s.ctx == H_LINE) & (c == ord("M")) & (s.rank == R_UNIT) & tempo_fixed)
  voices = header.voices
  ok = ok & ~((s.ctx == H_LINE) & (c == ord("V")) & (voices > 0) & (s.voices >= voices))
  ok = ok & ~((s.ctx == H_LINE) & (c == ord("[")) & (voices > 0) & (s.voices != voices))
  score_total = s.score_voices + (s.number > 0)
  ok = ok & ~((s.ctx == H_SCORE) & (c == ord("\n")) & (voices > 0) & (score_total != voices))
  # With the voices fixed, `%%score` names 1 to that many, and opens a group or a `|` only while
  # one of them is left for it.
  in_score = (voices > 0) & (s.ctx == H_SCORE)
  number = new.number
  completes = _unseen(s.score_seen, number, jnp.minimum(number, voices)) | _unseen(
      s.score_seen, number * 10, jnp.minimum(number * 10 + 9, voices))
  ok = ok & ~(in_score & (number > 0) & ~completes)
  ok = ok & ~((s.ctx == H_PERCENT) & (c == ord("%")) & (voices > MAX_SCORE_VOICES))
  needs_item = (c == ord("|")) | (c == ord("[")) | (c == ord("{")) | (c == ord("("))
  ok = ok & ~(in_score & needs_item & (score_total >= voices))
  forced_at = jnp.where((field >= 0) & (new.ctx == s.ctx), s.forced_at + 1, 0)
  return new.replace(forced_at=forced_at), ok


def step(s: State, c: jax.Array, t: jax.Array, header: Fixed | None = None, *,
         tabulate: bool = False) -> tuple[State, jax.Array]:
  """One character c at position t of its patch: (the next state, whether c is admissible).

  `tabulate` (for a step vmapped over many characters of one state, as `admissible`'s): what
  depends on c only through its digit is computed for the ten digits, once per state, and looked
  up; otherwise for c alone.
  """
  # A patch that starts after a line's `\n` starts the next line.
  line_start = jnp.where(s.line > 0, B_LINE, H_LINE)
  s = s.replace(ctx=jnp.where((s.ctx == EOL) & (t == 0), line_start, s.ctx))
  handlers = sorted(set(_HANDLERS.values()), key=lambda f: f.__name__)
  outcomes = [_content(s, c, t, tabulate) if handler is _content else handler(s, c, t)
              for handler in handlers]
  which = jnp.asarray(np.array([handlers.index(_HANDLERS[ctx]) for ctx in range(len(_HANDLERS))],
                               np.int32))[s.ctx]
  state = jax.tree.map(lambda *xs: jnp.stack(xs)[which], *[o[0] for o in outcomes])
  ok = jnp.stack([o[1] for o in outcomes])[which] & ~s.dead
  # One space at a time between a bar's elements and `%%score`'s items, as the training data
  # writes them (a second one adds nothing but length).
  spacing = (s.ctx == H_SCORE) | ((s.ctx == CONTENT) & (s.sub == S_NONE))
  ok = ok & ~(spacing & s.spaced & (c == ord(" ")))
  in_notes = (s.ctx == CONTENT) & ((s.sub == S_NONE) | (s.sub == S_CHORD) | (s.sub == S_GRACE))
  running = in_notes & jnp.asarray(_RUN)[c]
  ok = ok & ~(running & (s.run >= MAX_RUN))
  state = state.replace(spaced=c == ord(" "), run=jnp.where(running, s.run + 1, 0))
  if header is not None:
    state, ok = _force(s, state, ok, c, header)
  return state, ok


def admissible(states: State, t: jax.Array,
               header: Fixed | None = None) -> tuple[State, jax.Array]:
  """For a batch of states [B] at patch position t: every character's next state [B, V] and
  whether it is admissible [B, V]."""
  chars = jnp.arange(VOCAB, dtype=jnp.int32)
  per_row = lambda s: jax.vmap(functools.partial(step, tabulate=True), (None, 0, None, None))(
      s, chars, t, header)
  return jax.vmap(per_row)(states)


def batch(states: list[State]) -> State:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


@jax.jit
def _advance(s: State, chars: jax.Array, positions: jax.Array, real: jax.Array,
             header: Fixed | None = None) -> tuple[State, jax.Array]:
  def body(s, x):
    c, t, keep = x
    new, ok = step(s, c, t, header)
    return _select(keep, new, s), jnp.where(keep, ok, True)
  return jax.lax.scan(body, s, (chars, positions, real))


def advance(s: State, patches: np.ndarray, prefix: np.ndarray,
            header: Fixed | None = None) -> State:
  """The state after whole patches [n, P] (the bos patch first) and an open patch's prefix.

  Raises ValueError naming the first character the automaton does not admit.
  """
  chars, positions = patch_chars(patches[1:])  # the bos patch is where `initial` stands
  chars += [int(c) for c in prefix]
  positions += list(range(len(prefix)))
  size = max(64, 1 << (len(chars) - 1).bit_length()) if chars else 64
  padded = lambda xs: np.asarray(xs + [0] * (size - len(xs)), np.int32)
  real = np.arange(size) < len(chars)
  state, ok = _advance(s, jnp.asarray(padded(chars)), jnp.asarray(padded(positions)),
                       jnp.asarray(real), header)
  ok = np.asarray(ok)
  if not ok.all():
    i = int(np.argmin(ok))
    text = "".join(chr(c) if c > 2 else "." for c in chars)
    raise ValueError(f"not well-formed at character {i}: {text[max(0, i - 40):i]!r} then "
                     f"{text[i]!r}")
  return state


def patch_chars(patches: np.ndarray) -> tuple[list[int], list[int]]:
  """The characters of patches [n, P] as the automaton reads them, with their patch positions:
  each patch up to its eos."""
  chars, positions = [], []
  for patch in patches:
    for t, c in enumerate(patch):
      chars.append(int(c))
      positions.append(t)
      if c == tokenizer.EOS:
        break
  return chars, positions


_advance_rows = jax.jit(jax.vmap(_advance))


def first_rejections(pieces: list[list[list[int]]]) -> list[int | None]:
  """For pieces given as patches (lists of ids, the bos patch first), the index of the first
  character the automaton does not admit in each (None: admitted), all rows at once."""
  rows = [patch_chars(patches[1:]) for patches in pieces]
  size = 1 << (max(len(chars) for chars, _ in rows) - 1).bit_length()
  chars = np.zeros((len(rows), size), np.int32)
  positions = np.zeros_like(chars)
  for i, (row_chars, row_positions) in enumerate(rows):
    chars[i, :len(row_chars)], positions[i, :len(row_chars)] = row_chars, row_positions
  real = np.arange(size)[None] < np.array([len(c) for c, _ in rows])[:, None]
  _, ok = _advance_rows(batch([initial()] * len(rows)), jnp.asarray(chars),
                        jnp.asarray(positions), jnp.asarray(real))
  ok = np.asarray(ok)
  return [None if row.all() else int(np.argmin(row)) for row in ok]
