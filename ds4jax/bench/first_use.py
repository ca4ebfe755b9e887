"""First-use costs in front of users (issue 20 item 8), measured from outside, on any tree.

Every figure comes from a fresh process started from a repository root (`root`), through
public interfaces only, so the same code measures this tree and an older checkout (A/B):

  generate   `scripts/generate.py` without --warmup: the decode tok/s it reports;
  step       the model's own step: `ds4jax.load_model(...).session()`, a prefill, then
             `decode` timed after one untimed call (its steady state);
  server     `scripts/serve.py`: `warm` single requests, then `n_requests` requests one at a
             time, then `bursts` bursts of `n_requests` concurrent ones; the completion tok/s
             of each, and the seconds from start to its "serving" line (ready).

generate and step run in alternating rounds (same load for both, the order flips every
round); the ratio of a round is generate / step of that round. `run` does it all for one or
more trees (`scripts/bench.py --first_use`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Sequence

import numpy as np

# The model's own step, through the notebook API every tree has: prints {"decode_tok_s": x}.
_STEP = r"""
import json, sys, time
import ds4jax
from ds4jax import cli
gguf, ids, n, cache = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cli.enable_compilation_cache(cache)
s = ds4jax.load_model(gguf).session()
logits = s.prefill(ids)
tok = int(logits[-1].argmax())
tok = int(s.decode(tok).argmax())  # untimed: the decode step's first call
t0 = time.perf_counter()
for _ in range(n):
  tok = int(s.decode(tok).argmax())
print(json.dumps({"decode_tok_s": n / (time.perf_counter() - t0)}))
"""


def _env(root: str, cache_dir: str) -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=root, DS4JAX_CACHE=cache_dir, JAX_PLATFORMS="cpu")


def model_step(root: str, gguf: str, ids: Sequence[int], n_decode: int,
               cache_dir: str) -> dict[str, Any]:
  """The model's own steady decode tok/s (`load_model(...).session().decode`)."""
  out = subprocess.run([sys.executable, "-c", _STEP, gguf, json.dumps(list(ids)),
                        str(n_decode), cache_dir], env=_env(root, cache_dir), cwd=root,
                       capture_output=True, text=True, timeout=1800)
  if out.returncode:
    raise RuntimeError(f"model step run failed: {out.stderr.strip()[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def generate(root: str, gguf: str, ids: Sequence[int], n_decode: int,
             cache_dir: str) -> dict[str, Any]:
  """What `scripts/generate.py` reports (no --warmup), and its wall time (load included)."""
  with tempfile.TemporaryDirectory() as d:
    out_json = pathlib.Path(d) / "out.json"
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "scripts/generate.py", f"--gguf={gguf}", f"--cache_dir={cache_dir}",
         "--prompt_tokens=" + ",".join(map(str, ids)), f"--max_new_tokens={n_decode + 1}",
         "--nochat", "--nostream", f"--output_json={out_json}"],
        env=_env(root, cache_dir), cwd=root, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if out.returncode:
      raise RuntimeError(f"generate.py failed: {out.stderr.strip()[-2000:]}")
    res = json.loads(out_json.read_text())
  return {"decode_tok_s": res["decode_tok_s"], "prefill_tok_s": res["prefill_tok_s"],
          "wall_s": wall}


def paired_round(root: str, gguf: str, ids: Sequence[int], n_decode: int, cache_dir: str,
                 step_first: bool = False) -> dict[str, Any]:
  """generate.py and the model's step one after the other: {generate, step, ratio}."""
  row = {}
  for what in (("step", "generate") if step_first else ("generate", "step")):
    run_one = generate if what == "generate" else model_step
    row[what] = run_one(root, gguf, ids, n_decode, cache_dir)
  row["ratio"] = row["generate"]["decode_tok_s"] / row["step"]["decode_tok_s"]
  return row


# ---------------------------------------------------------------------------------- server
def _post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
  req = urllib.request.Request(url, json.dumps(body).encode(),
                               {"content-type": "application/json"})
  with urllib.request.urlopen(req, timeout=timeout) as r:
    return json.loads(r.read())


def _requests(url: str, prompts: Sequence[Sequence[int]], max_tokens: int,
              at_once: bool) -> dict[str, Any]:
  """The prompts as /v1/completions requests (greedy), all at once or one at a time."""
  body = lambda p: {"prompt": list(p), "max_tokens": max_tokens, "temperature": 0.0}
  t0 = time.perf_counter()
  if at_once:
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as ex:
      outs = list(ex.map(lambda p: _post(url, body(p), 1800), prompts))
  else:
    outs = [_post(url, body(p), 1800) for p in prompts]
  wall = time.perf_counter() - t0
  tokens = sum(o["usage"]["completion_tokens"] for o in outs)
  return {"wall_s": wall, "completion_tokens": tokens, "tok_s": tokens / wall}


@contextlib.contextmanager
def serving(root: str, gguf: str, cache_dir: str, flags: Sequence[str] = ()):
  """`scripts/serve.py` of the tree at root on a free port: yields (base url, seconds from
  start to its "serving" line), and stops it afterwards."""
  cmd = [sys.executable, "scripts/serve.py", f"--gguf={gguf}", f"--cache_dir={cache_dir}",
         "--http=127.0.0.1:0", *flags]
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, env=_env(root, cache_dir), cwd=root, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, start_new_session=True)
  try:
    line = proc.stdout.readline()
    if not line.startswith("serving "):
      raise RuntimeError(f"serve.py did not start (exit {proc.wait()})")
    yield line.split()[1], time.perf_counter() - t0
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()


def server_bursts(root: str, gguf: str, vocab_size: int, cache_dir: str, *,
                  n_requests: int = 8, prompt_len: int = 16, max_tokens: int = 32,
                  bursts: int = 3, warm: int = 2) -> dict[str, Any]:
  """serve.py with `--max_sessions` and `--max_concurrency` = n_requests: `warm` single
  requests, then `n_requests` requests one at a time, then `bursts` bursts of `n_requests`
  concurrent requests (fresh random prompts each: no prefix is reused)."""
  from ds4jax.bench.concurrency import stream_prompts
  prompts = stream_prompts(vocab_size, warm + n_requests * (1 + bursts), prompt_len, seed=7)
  batches = [prompts[warm + k * n_requests:warm + (k + 1) * n_requests]
             for k in range(1 + bursts)]
  with serving(root, gguf, cache_dir, [f"--max_sessions={n_requests}",
                                       f"--max_concurrency={n_requests}"]) as (url, ready_s):
    url += "/v1/completions"
    _requests(url, prompts[:warm], max_tokens, at_once=False)
    out: dict[str, Any] = {"ready_s": ready_s,
                           "sequential": _requests(url, batches[0], max_tokens, at_once=False),
                           "bursts": [_requests(url, b, max_tokens, at_once=True)
                                      for b in batches[1:]]}
  rates = [b["tok_s"] for b in out["bursts"]]
  later = float(np.median(rates[1:])) if len(rates) > 1 else None
  out.update(first_burst_over_later=rates[0] / later if later else None,
             first_burst_over_sequential=rates[0] / out["sequential"]["tok_s"],
             later_over_sequential=later / out["sequential"]["tok_s"] if later else None)
  return out


def server_ready(root: str, gguf: str, cache_dir: str) -> float:
  """Seconds from starting serve.py (defaults: --max_sessions=8) to its "serving" line."""
  with serving(root, gguf, cache_dir) as (_, ready_s):
    return ready_s


def run(trees: Sequence[str], gguf: str, vocab_size: int, work_dir: str, *, rounds: int = 3,
        prompt_len: int = 16, decode_tokens: int = 64, bursts: int = 3) -> dict[str, Any]:
  """Every measurement above for each tree (a repository root), each tree with its own
  compilation cache under work_dir: one untimed generate.py run fills it, then `rounds`
  alternating rounds (tree by tree) of generate.py and the model's step, then the server's
  bursts, then serve.py's time to ready with an empty cache and again with that one full."""
  ids = np.random.default_rng(3).integers(2, vocab_size, prompt_len).tolist()
  caches = {t: os.path.join(work_dir, f"cache{k}") for k, t in enumerate(trees)}
  out: dict[str, Any] = {t: {"rounds": []} for t in trees}
  for t in trees:
    _say(f"{t}: filling its compilation cache")
    generate(t, gguf, ids, 2, caches[t])
  for r in range(rounds):
    for t in trees:
      _say(f"{t}: round {r + 1}/{rounds} (generate.py and the model's step)")
      out[t]["rounds"].append(paired_round(t, gguf, ids, decode_tokens, caches[t], r % 2 == 1))
  for k, t in enumerate(trees):
    rows = out[t]["rounds"]
    med = lambda key, k: float(np.median([x[key][k] for x in rows]))
    out[t].update(generate_decode_tok_s=med("generate", "decode_tok_s"),
                  step_decode_tok_s=med("step", "decode_tok_s"),
                  ratio=float(np.median([x["ratio"] for x in rows])),
                  generate_wall_s=med("generate", "wall_s"))
    _say(f"{t}: the server's bursts")
    out[t]["server"] = server_bursts(t, gguf, vocab_size, caches[t], bursts=bursts,
                                     prompt_len=prompt_len)
    cold = os.path.join(work_dir, f"cold{k}")
    _say(f"{t}: serve.py's time to ready, empty cache then full")
    out[t]["ready_cold_s"] = server_ready(t, gguf, cold)
    out[t]["ready_warm_s"] = server_ready(t, gguf, cold)
  return out


def _say(msg: str) -> None:
  print(f"bench: {msg}", file=sys.stderr, flush=True)


def to_markdown(results: dict[str, Any], names: dict[str, str] | None = None) -> str:
  """Two tables: generate.py against the model's step, and the server's bursts and restarts."""
  names = names or {}
  f = lambda x, nd=1: "n/a" if x is None else f"{x:.{nd}f}"
  out = ["| tree | generate.py decode tok/s | model step decode tok/s | generate / step | "
         "generate.py wall s |", "|---|---:|---:|---:|---:|"]
  for t, r in results.items():
    out.append(f"| {names.get(t, t)} | {f(r['generate_decode_tok_s'])} | "
               f"{f(r['step_decode_tok_s'])} | {f(r['ratio'], 2)} | {f(r['generate_wall_s'])} |")
  out += ["", "| tree | 8 one at a time tok/s | burst 1 tok/s | later bursts tok/s | "
          "burst 1 / later | ready s, empty cache | ready s, full cache |",
          "|---|---:|---:|---:|---:|---:|---:|"]
  for t, r in results.items():
    s = r["server"]
    later = [b["tok_s"] for b in s["bursts"][1:]]
    out.append(f"| {names.get(t, t)} | {f(s['sequential']['tok_s'])} | "
               f"{f(s['bursts'][0]['tok_s'])} | {', '.join(f(x) for x in later)} | "
               f"{f(s['first_burst_over_later'], 2)} | {f(r['ready_cold_s'])} | "
               f"{f(r['ready_warm_s'])} |")
  return "\n".join(out) + "\n"


__all__ = ["generate", "model_step", "paired_round", "run", "server_bursts",
           "server_ready", "serving", "to_markdown"]
