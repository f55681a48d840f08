"""The local demo page: linked prompt choices, an optional score to continue, header fields to
fix (meter, key), a live log, the engraved piece with a player, and its files to download.

Standard-library HTTP, one page with its script inline. Generation runs in a thread, one piece at
a time (the model takes the machine); the page polls its job for the log and, once done, the
piece as `report` shows it. Every file a job writes lies under the output folder, served as is.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import http.server
import json
import mimetypes
import threading
import time
import urllib.parse
from typing import Any, Iterable, Mapping

from etils import epath

from notagen_jax import constraint
from notagen_jax import generation
from notagen_jax import model as model_lib
from notagen_jax import report
from notagen_jax import sampling
from notagen_jax import storage

# The form's numbers: the sampling settings, the seed, and the bars of a score to continue.
FIELDS = {"seed": int, "temperature": float, "top_k": int, "top_p": float, "max_patches": int,
          "bars": int}
# The header lines the form can fix (empty: the model's choice), as `generate --meter --key`.
HEADER_FIELDS = ("meter", "key")


@dataclasses.dataclass
class Job:
  log: list[str] = dataclasses.field(default_factory=list)
  done: bool = False
  html: str = ""


# The prompts a model knows, or each with its number of pieces (`generation.known_combinations`).
Known = Iterable[generation.Combination] | Mapping[generation.Combination, int]


def choices(combinations: Known) -> dict[str, dict[str, list[str]]]:
  """period -> composer -> instrumentations: each menu offers only what the ones before allow.

  Given pieces per combination (`generation.known_combinations`), each menu lists the choice with
  the most pieces first, so the page opens on the prompt the model saw most; else alphabetically.
  """
  counts = combinations if isinstance(combinations, Mapping) else dict.fromkeys(combinations, 1)
  pieces: collections.Counter[tuple[str, ...]] = collections.Counter()  # under each menu's choice
  for combination, n in counts.items():
    for depth in (1, 2, 3):
      pieces[combination[:depth]] += n

  def rank(combination):
    return [(-pieces[combination[:depth]], combination[depth - 1]) for depth in (1, 2, 3)]

  tree: dict[str, dict[str, list[str]]] = {}
  for period, composer, instrumentation in sorted(counts, key=rank):
    tree.setdefault(period, {}).setdefault(composer, []).append(instrumentation)
  return tree


class Demo:
  """Generation jobs of one model into `out_dir`, prompts limited to `combinations`."""

  def __init__(self, model: model_lib.NotaGen, out_dir: epath.PathLike,
               combinations: Known, weights_dtype: str | None = None):
    self.model, self.weights_dtype = model, weights_dtype
    self.out = storage.path(out_dir)
    self.out.mkdir(parents=True, exist_ok=True)
    self.known = combinations if isinstance(combinations, Mapping) else set(combinations)
    self.jobs: dict[int, Job] = {}
    self._generating = threading.Lock()

  def start(self, request: dict[str, Any]) -> int:
    """Queues a job for a request (the page's form as JSON); returns its id."""
    number = len(self.jobs)
    self.jobs[number] = job = Job()
    threading.Thread(target=self._run, args=(job, number, request), daemon=True).start()
    return number

  def _run(self, job: Job, number: int, request: dict[str, Any]) -> None:
    start = time.perf_counter()
    counting = False  # whether the log's last line is the progress line

    def log(line: str, progress: bool = False):
      nonlocal counting
      entry = f"[{time.perf_counter() - start:6.1f} s] {line}"
      if progress and counting:  # the progress line counts up in place
        job.log[-1] = entry
      else:
        job.log.append(entry)
      counting = progress

    def on_patches(pieces: list[sampling.Piece]):
      for piece in pieces:  # one piece at a time
        log(f"drawing: {piece.patches} patches, {piece.chars} characters so far", progress=True)

    try:
      values = {k: kind(request[k]) for k, kind in FIELDS.items()
                if str(request.get(k, "")).strip()}
      fixed = {k: str(request[k]).strip() for k in HEADER_FIELDS
               if str(request.get(k, "")).strip()}
      header = constraint.Header(**fixed) if fixed else None
      combination = tuple(request[f] for f in ("period", "composer", "instrumentation"))
      prompt = generation.prompt_text(*combination, self.known)
      folder = self.out / f"job_{number}"
      folder.mkdir(exist_ok=True)
      if request.get("upload"):
        path = folder / epath.Path(request["upload"]["name"]).name
        path.write_bytes(base64.b64decode(request["upload"]["data"]))
        prompt = generation.continuation_prompt(path, head=prompt, bars=values.get("bars", 0))
        log(f"continuing {path.name}: a prompt of {len(prompt)} characters")
        if header:
          conflicts = generation.header_conflicts(prompt, header)
          if conflicts:
            raise ValueError("; ".join(f"{field} {fixed[field]}: {path.name} has {written}"
                                       for field, written in conflicts))
      settings = sampling.Settings(constrained=True, **{k: v for k, v in values.items()
                                                        if k not in ("seed", "bars")})
      with self._generating:
        log(f"generating {' / '.join(combination)}: top-k {settings.top_k}, top-p "
            f"{settings.top_p}, temperature {settings.temperature}, seed {values.get('seed', 0)}"
            + "".join(f", {k} {v}" for k, v in fixed.items()))
        written = generation.generate(self.model, [prompt], folder, settings=settings, batch=1,
                                      seed=values.get("seed", 0), progress=False,
                                      weights_dtype=self.weights_dtype, header=header,
                                      on_patches=on_patches)[0]
      log(f"written: {written.chars} characters, {written.patches} patches in {written.seconds} s")
      piece = report.written_piece(written, self.out, prompt)
      log(f"engraved: {len(piece.pages)} pages" + (f"; failed: {'; '.join(piece.failures)}"
                                                   if piece.failures else ""))
      job.html = report.piece_html(piece)
    except Exception as error:  # the page shows any failure; the server goes on
      log(f"failed: {type(error).__name__}: {error}")
    job.done = True

  def page(self) -> str:
    tree = json.dumps(choices(self.known)).replace("</", "<\\/")
    defaults = sampling.Settings()
    inputs = "\n".join(
        f'<label>{name} <input id="{name}" size="6" value="{value}"></label>'
        for name, value in (("seed", 0), ("temperature", defaults.temperature),
                            ("top_k", defaults.top_k), ("top_p", defaults.top_p),
                            ("max_patches", defaults.max_patches), ("bars", 0)))
    header = "\n".join(
        f'<label>{name} <input id="{name}" size="6" placeholder="{hint}"></label>'
        for name, hint in (("meter", "3/4"), ("key", "Eb")))
    body = PAGE.replace("{inputs}", inputs).replace("{header}", header).replace("{tree}", tree)
    return report.document("NotaGen (JAX) demo", body)


PAGE = """
<form id="form" onsubmit="return false">
<p><label>period <select id="period"></select></label>
<label>composer <select id="composer"></select></label>
<label>instrumentation <select id="instrumentation"></select></label></p>
<p><label>continue a score (MusicXML, ABC, Humdrum; optional)
<input type="file" id="upload" accept=".xml,.musicxml,.mxl,.abc,.krn"></label></p>
<p>header (empty: the model's choice) {header}</p>
<p>{inputs}</p>
<p><button id="generate">Generate</button></p>
</form>
<h2>Log</h2><pre id="log"></pre>
<div id="piece"></div>
<script>
const tree = {tree};
const $ = id => document.getElementById(id);
function fill(select, options) {
  select.innerHTML = "";
  for (const option of options) select.add(new Option(option, option));
  select.dispatchEvent(new Event("change"));
}
$("period").onchange = () => fill($("composer"), Object.keys(tree[$("period").value] || {}));
$("composer").onchange = () =>
  fill($("instrumentation"), (tree[$("period").value] || {})[$("composer").value] || []);
fill($("period"), Object.keys(tree));
function read(file) {
  return new Promise(done => {
    if (!file) return done(null);
    const reader = new FileReader();
    reader.onload = () => done({name: file.name, data: reader.result.split(",")[1]});
    reader.readAsDataURL(file);
  });
}
$("generate").onclick = async () => {
  $("generate").disabled = true;
  $("piece").innerHTML = "";
  const request = {upload: await read($("upload").files[0])};
  for (const id of ["period", "composer", "instrumentation", "meter", "key", "seed",
                    "temperature", "top_k", "top_p", "max_patches", "bars"]) {
    request[id] = $(id).value;
  }
  const job = await (await fetch("/jobs", {method: "POST", body: JSON.stringify(request)})).json();
  const poll = async () => {
    const state = await (await fetch("/jobs/" + job.id)).json();
    $("log").textContent = state.log.join("\\n");
    if (!state.done) return setTimeout(poll, 500);
    $("piece").innerHTML = state.html;
    $("generate").disabled = false;
  };
  poll();
};
</script>
"""


def server(demo: Demo, host: str = "127.0.0.1", port: int = 7860) -> http.server.HTTPServer:
  """The demo's HTTP server (not yet serving): the page, its jobs, and the files they wrote."""

  class Handler(http.server.BaseHTTPRequestHandler):

    def _send(self, status: int, body: bytes, kind: str):
      self.send_response(status)
      self.send_header("Content-Type", kind)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def do_GET(self):  # pylint: disable=invalid-name
      path = urllib.parse.unquote(self.path.split("?")[0])
      if path == "/":
        return self._send(200, demo.page().encode(), "text/html; charset=utf-8")
      if path.startswith("/jobs/") and path[6:].isdigit() and int(path[6:]) in demo.jobs:
        job = demo.jobs[int(path[6:])]
        return self._send(200, json.dumps(dataclasses.asdict(job)).encode(), "application/json")
      file = demo.out / path.lstrip("/")
      # Only files the jobs wrote: nothing outside the output folder.
      if ".." not in path.split("/") and file.is_file():
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        return self._send(200, file.read_bytes(), kind)
      return self._send(404, b"not found", "text/plain")

    def do_POST(self):  # pylint: disable=invalid-name
      if self.path != "/jobs":
        return self._send(404, b"not found", "text/plain")
      request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      return self._send(200, json.dumps({"id": demo.start(request)}).encode(), "application/json")

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      del format, args  # the page polls twice a second: no line per request

  return http.server.ThreadingHTTPServer((host, port), Handler)
