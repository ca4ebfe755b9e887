"""Session snapshots: save after a prefill on one route, restore on another route (other split
points, other worker count) and in one process; the continuation equals the uninterrupted run.

Route A: coordinator 0:0, workers 1:1 and 2:output. Route B: coordinator 0:1, worker 2:output
(split points {1, 2} vs {2}). Single process: LocalBackend over 0:3. Workers run in threads
with real StageRunners (restored from the orbax checkpoint, shared across tests so each
range compiles once).
"""

import threading

import numpy as np
import pytest

from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
from ds4jax.bridge.worker.worker import Worker, WorkerOptions
from ds4jax.checkpoints import snapshots
from ds4jax.runtime.local import LocalBackend
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.suite import CTX

GREEDY = SamplingParams()
N_CONT = 6
# 30 tokens: two 16-token prefill chunks (one compiled shape), and compressor windows of both
# ratios (4, 16) left incomplete at the snapshot.
PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, 500, size=30)]


class Route:
  """A listening coordinator for `local` plus one threaded worker per remote range."""

  def __init__(self, make_runner, local: str, remote: list[str], ctx: int = CTX):
    self.coord = Coordinator(make_runner(local, ctx), CoordinatorOptions(
        port=0, route_timeout=60.0, prefill_chunk=16, heartbeat_s=2.0, dead_after=60.0))
    self.workers, self.threads = [], []
    for spec in remote:
      runner = make_runner(spec, ctx)
      w = Worker(self.coord.address, fingerprint=runner.fingerprint, n_layers=runner.cfg.n_layers,
                 vocab_size=runner.cfg.vocab_size, layers=runner.layers,
                 load=lambda r=runner: r, options=WorkerOptions(
                     ctx=ctx, backoff_min=0.01, backoff_max=0.1, connect_timeout=2.0))
      t = threading.Thread(target=w.run, daemon=True, name=f"test-worker-{spec}")
      t.start()
      self.workers.append(w)
      self.threads.append(t)
    self.coord.wait_route(60.0)

  def close(self):
    for w in self.workers:
      w.stop()
    self.coord.close()
    for t in self.threads:
      t.join(timeout=10)


def continue_greedy(backend, sid, transcript, k):
  """k greedy steps from `transcript`; returns (tokens, n_computed of the first step)."""
  tr, out, first = list(transcript), [], None
  for i in range(k):
    res = backend.step(sid, tr, GREEDY, i)
    first = res.n_computed if first is None else first
    out.append(res.token)
    tr.append(res.token)
  return out, first


@pytest.fixture(scope="module")
def saved_on_route_a(make_runner, tmp_path_factory):
  """(snapshot dir, transcript, uninterrupted continuation) from route A."""
  route = Route(make_runner, "0:0", ["1:1", "2:output"])
  try:
    sid = route.coord.new_session()
    t0 = route.coord.step(sid, PROMPT, GREEDY, 0).token
    d = tmp_path_factory.mktemp("snap") / "route-a"
    m = snapshots.save_session(route.coord, sid, d, transcript=PROMPT + [t0])
    assert m["n_kv"] == len(PROMPT) and m["tokens"] == PROMPT + [t0]
    ref, _ = continue_greedy(route.coord, sid, PROMPT + [t0], N_CONT)
  finally:
    route.close()
  return str(d), PROMPT + [t0], ref


def test_restore_on_route_b_continues_identically(saved_on_route_a, make_runner):
  d, transcript, ref = saved_on_route_a
  route = Route(make_runner, "0:1", ["2:output"])
  try:
    sid = route.coord.new_session()
    tr = snapshots.load_session(route.coord, sid, d)
    assert tr == transcript
    got, first = continue_greedy(route.coord, sid, tr, N_CONT)
  finally:
    route.close()
  assert first == 1  # only the token after the snapshot was computed: the KV came from disk
  assert got == ref


def test_restore_in_one_process_continues_identically(saved_on_route_a, make_runner):
  d, transcript, ref = saved_on_route_a
  backend = LocalBackend([make_runner("all")], prefill_chunk=16)
  sid = backend.new_session()
  tr = snapshots.load_session(backend, sid, d)
  assert backend.session_tokens(sid) == transcript[:-1]
  got, first = continue_greedy(backend, sid, tr, N_CONT)
  assert first == 1
  assert got == ref


def test_restored_state_is_what_drives_the_continuation(saved_on_route_a, make_runner, tmp_path):
  """Sensitivity: the same transcript over a snapshot of *another* prompt's state gives other
  logits, so the equality above is not an artefact of recomputation."""
  d, transcript, _ = saved_on_route_a
  backend = LocalBackend([make_runner("all")], prefill_chunk=16)
  other = [int(t) for t in np.random.default_rng(8).integers(3, 500, size=len(PROMPT))]
  sid = backend.new_session()
  backend.step(sid, other, GREEDY, 0)
  snapshots.save_session(backend, sid, tmp_path / "other")
  m = snapshots.read_manifest(tmp_path / "other")
  # Graft the other state under this transcript (a consistent manifest, wrong KV).
  good = backend.new_session()
  snapshots.load_session(backend, good, d)
  ref = backend.step(good, transcript, GREEDY, 0, return_logits=True).logits_V
  blobs = snapshots.read_layers(tmp_path / "other", m, range(m["n_layers"]))
  snapshots.write_snapshot(tmp_path / "graft", cfg=backend.cfg, fingerprint=None,
                           tokens=transcript, n_kv=len(PROMPT), blobs=blobs)
  bad = backend.new_session()
  snapshots.load_session(backend, bad, tmp_path / "graft")
  res = backend.step(bad, transcript, GREEDY, 0, return_logits=True)
  assert res.n_computed == 1
  assert not np.allclose(res.logits_V, ref, atol=1e-3)


def test_save_in_one_process_restore_on_a_split(make_runner, tmp_path):
  backend = LocalBackend([make_runner("0:1"), make_runner("2:output")], prefill_chunk=16)
  sid = backend.new_session()
  prompt = PROMPT[:14] + PROMPT[:13]
  t0 = backend.step(sid, prompt, GREEDY, 0).token
  snapshots.save_session(backend, sid, tmp_path / "s", transcript=prompt + [t0])
  ref, _ = continue_greedy(backend, sid, prompt + [t0], 4)
  route = Route(make_runner, "0:0", ["1:1", "2:output"])
  try:
    sid = route.coord.new_session()
    tr = snapshots.load_session(route.coord, sid, tmp_path / "s")
    got, first = continue_greedy(route.coord, sid, tr, 4)
    # A rewind below the restored length works too (the worker timelines were restored).
    again = route.coord.step(sid, tr[:10], GREEDY, 0)
  finally:
    route.close()
  assert first == 1 and got == ref
  assert again.n_computed == 1
