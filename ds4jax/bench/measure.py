"""Timing a `Backend` (local or split) the same way, and its peak memory in MiB.

Everything goes through the public `Backend.step` with the whole transcript, exactly as the
generation loop and the server drive it, so the local and the split numbers are comparable.

  warm-up    first prefill of one chunk and first decode step (compilations on every stage),
             then the same two calls again: compile_s = first call - steady call.
  prefill    one fresh session per prompt length L: tok/s = L / wall time of one step.
  decode     continue the first prompt length greedily for N steps: tok/s = N / wall time.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from ds4jax.local_cluster import peak_rss_bytes
from ds4jax.runtime.sampling import SamplingParams

GREEDY = SamplingParams()


def peak_rss_mb(pid: int | str = "self") -> float | None:
  """`local_cluster.peak_rss_bytes` in MiB (None where it cannot tell)."""
  n = peak_rss_bytes(pid)
  return None if n is None else n / 2**20


def median_call_s(f: Callable, *args, reps: int = 7) -> float:
  """Median seconds of `f(*args)` (a jitted function) over `reps` calls after one warm-up,
  each waited for (`jax.block_until_ready`)."""
  import jax  # deferred: the bench's process-level helpers import no JAX
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def prompt_ids(vocab_size: int, n: int, seed: int = 0) -> list[int]:
  """Deterministic random token ids (the same prompt for every configuration)."""
  return np.random.default_rng(seed).integers(2, vocab_size, n).tolist()


def bench_backend(backend, ids: Sequence[int], *, prompt_lens: Sequence[int],
                  decode_tokens: int, warm_len: int,
                  on_decode_step: Callable[[int, Any, float], None] | None = None,
                  decode_context: Callable[[], Any] | None = None,
                  keep_logits: bool = False) -> dict[str, Any]:
  """Measures warm-up, prefill per prompt length and decode on `backend`.

  Args:
    ids: at least max(prompt_lens) token ids.
    warm_len: prompt length of the warm-up (one full prefill chunk).
    on_decode_step(i, StepResult, seconds): called after each timed decode step.
    decode_context: a context manager factory wrapped around the timed decode loop.
    keep_logits: also return each prompt's last logits row (`out["logits"][str(L)]`).
  """
  def timed(sid, transcript, step, logits=False):
    t0 = time.perf_counter()
    res = backend.step(sid, transcript, GREEDY, step, return_logits=logits)
    return res, time.perf_counter() - t0

  out: dict[str, Any] = {}
  first, steady = [], []
  for times in (first, steady):
    sid = backend.new_session()
    res, dt_p = timed(sid, ids[:warm_len], 0)
    _, dt_d = timed(sid, list(ids[:warm_len]) + [res.token], 1)
    times += [dt_p, dt_d]
    backend.close_session(sid)
  out["warmup"] = {
      "prefill_first_s": first[0], "prefill_steady_s": steady[0],
      "decode_first_s": first[1], "decode_steady_s": steady[1],
      "compile_s": max(0.0, first[0] - steady[0]) + max(0.0, first[1] - steady[1]),
  }

  # Prompt lengths that are not a multiple of the chunk end in a smaller bucket: compile it
  # now so the timed prefill does not pay for it.
  for r in sorted({n % warm_len for n in prompt_lens} - {0}):
    sid = backend.new_session()
    timed(sid, ids[:warm_len + r], 0)
    backend.close_session(sid)
  out["prefill"], out["logits"] = {}, {}
  keep = None
  for i, n in enumerate(prompt_lens):
    sid = backend.new_session()
    res, dt = timed(sid, ids[:n], 0, keep_logits)
    if keep_logits:
      out["logits"][str(n)] = np.asarray(res.logits_V, np.float32)
    out["prefill"][str(n)] = {"tokens": int(n), "seconds": dt, "tok_s": n / dt,
                              "first_token": int(res.token)}
    if i == 0:
      keep = (sid, list(ids[:n]) + [res.token])
    else:
      backend.close_session(sid)

  sid, transcript = keep
  steps = []
  ctx = decode_context() if decode_context else _null()
  with ctx:
    for i in range(decode_tokens):
      res, dt = timed(sid, transcript, i + 1)
      transcript.append(res.token)
      steps.append(dt)
      if on_decode_step:
        on_decode_step(i, res, dt)
  backend.close_session(sid)
  total = float(np.sum(steps))
  out["decode"] = {"tokens": len(steps), "context": len(transcript) - len(steps),
                   "seconds": total, "tok_s": len(steps) / total if total else 0.0,
                   "ms_per_token_median": 1e3 * float(np.median(steps)) if steps else 0.0,
                   "tokens_out": transcript[-len(steps):] if steps else []}
  return out


class _null:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def summarize_hops(records: list[dict[str, Any]], encode_s: list[float], n_steps: int,
                   stage_order: Sequence[str]) -> list[dict[str, Any]]:
  """Per hop, per decode token: medians of the probe's request records (see probe.py).

  wire_s is the round trip minus what the worker reports (queue, compute, serialize): TCP
  both ways plus frame building/parsing and thread hand-offs. The coordinator's activation
  encoding is charged to the first hop (it is the only one the coordinator encodes for).
  """
  enc = float(np.sum(encode_s)) / max(n_steps, 1)
  out = []
  for k, layers in enumerate(stage_order):
    recs = [r for r in records if r["layers"] == layers and "t_reply" in r]
    if not recs:
      continue

    def med(f):
      return float(np.median([f(r) for r in recs]))

    rtt = med(lambda r: r["t_reply"] - r["t_start"])
    compute = med(lambda r: r.get("compute_s", 0.0))
    queue = med(lambda r: r.get("queue_s", 0.0))
    wser = med(lambda r: r.get("serialize_s", 0.0))
    ser = wser + (enc if k == 0 else 0.0)
    out.append({
        "layers": layers, "requests": len(recs),
        "rtt_s": rtt, "compute_s": compute, "queue_s": queue, "serialize_s": ser,
        "worker_serialize_reported": all("serialize_s" in r for r in recs),
        "send_s": med(lambda r: r["t_sent"] - r["t_start"]),
        "wire_s": max(0.0, rtt - compute - queue - wser),
        "added_s": max(0.0, rtt - compute) + (enc if k == 0 else 0.0),
        "bytes_in": int(np.median([r["bytes_in"] for r in recs])),
        "bytes_out": int(np.median([r.get("bytes_out", 0) for r in recs])),
    })
  return out


def env_info() -> dict[str, Any]:
  """Load average and CPU count at the time of the run (a shared machine is noisy)."""
  try:
    load = os.getloadavg()
  except OSError:
    load = (float("nan"),) * 3
  return {"loadavg": [round(x, 2) for x in load], "cpus": os.cpu_count()}


def paired_decode(split, local, ids: Sequence[int], *, prompt_len: int, rounds: int,
                  steps: int) -> dict[str, Any]:
  """Split vs one-process decode measured in alternating rounds in the same process.

  On a shared machine the load drifts over the minutes between two configurations; rounds of
  `steps` decode steps alternating between the two backends see the same load, so their ratio
  is far less noisy than the ratio of two separate runs.
  """
  sess = []
  for b in (split, local):
    sid = b.new_session()
    tr = list(ids[:prompt_len])
    res = b.step(sid, tr, GREEDY, 0)
    tr.append(res.token)
    res = b.step(sid, tr, GREEDY, 1)  # one untimed decode step (first-call effects)
    tr.append(res.token)
    sess.append([b, sid, tr])
  times: list[list[float]] = [[], []]
  for _ in range(rounds):
    for k, (b, sid, tr) in enumerate(sess):
      for _ in range(steps):
        t0 = time.perf_counter()
        res = b.step(sid, tr, GREEDY, len(tr))
        times[k].append(time.perf_counter() - t0)
        tr.append(res.token)
  for b, sid, _ in sess:
    b.close_session(sid)
  split_ms, local_ms = (1e3 * float(np.median(t)) for t in times)
  return {"rounds": rounds, "steps_per_round": steps, "split_ms_per_token": split_ms,
          "single_ms_per_token": local_ms, "ratio_decode": local_ms / split_ms,
          "same_tokens": sess[0][2] == sess[1][2]}
