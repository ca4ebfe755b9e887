"""Capture and interventions across a route (issue 22): one process, an in-process split and
a coordinator with two threaded workers (real StageRunners, loopback sockets) capture the
same arrays and edit the same way; a step that captures nothing is today's step (no
compilation, the protocol-v3 bytes, the same tokens); bad requests fail in one line before
any compute and the session goes on.

Route: coordinator 0:0 | worker 1:1 | worker 2:output at the suite's standard shapes (a
20-token prompt is two prefill chunks: the lens inputs and the captured rows cross both).
"""

import threading

import numpy as np
import pytest

from ds4jax import build
from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
from ds4jax.bridge.worker.worker import Worker, WorkerOptions
from ds4jax.config import LAYER_POINTS
from ds4jax.research import Lab
from ds4jax.runtime.capture import Captured, CaptureError, CaptureSpec
from ds4jax.runtime.edits import Edit, EditError, Interventions
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.runtime.step import StepRequest
from ds4jax.testing.suite import CHUNK, CTX
from ds4jax.wire import protocol

PROMPT = [7, 300, 42, 9, 1, 77, 256, 3, 18, 99, 5, 61, 404, 2, 33, 120, 8, 71, 250, 14]
P = len(PROMPT)
N_NEW = 4
GREEDY = SamplingParams()
ALL = CaptureSpec.parse("attn_out,ffn_out,hc_out,router_ids,router_weights,router_scores,"
                        "lens,logits")


def generate(backend, spec, n=N_NEW, prompt=PROMPT):
  """Greedy steps with `spec` on each; -> (tokens, Captured of all steps, results)."""
  sid, tr, results = backend.new_session(), list(prompt), []
  for i in range(n):
    results.append(backend.step(sid, tr, GREEDY, i, capture=spec))
    tr.append(results[-1].token)
  backend.close_session(sid)
  return tr[len(prompt):], Captured.concat([r.captured for r in results]), results


@pytest.fixture(scope="module")
def one(tiny_gguf):
  b = build.local_backend(tiny_gguf, ctx_size=CTX, prefill_chunk=CHUNK)
  yield b
  b.close()


@pytest.fixture(scope="module")
def reference(one):
  return generate(one, ALL)


@pytest.fixture(scope="module")
def route(tiny_gguf):
  """A coordinator (0:0) and threaded workers (1:1, 2:output)."""
  mk = lambda spec: build.load_runner(tiny_gguf, spec, ctx_size=CTX,  # noqa: E731
                                     prefill_chunk=CHUNK)
  coord = Coordinator(mk("0:0"), CoordinatorOptions(
      port=0, route_timeout=60.0, prefill_chunk=CHUNK, heartbeat_s=2.0, dead_after=60.0,
      max_sessions=8))
  workers, threads = [], []
  for spec in ("1:1", "2:output"):
    r = mk(spec)
    w = Worker(coord.address, fingerprint=r.fingerprint, n_layers=r.cfg.n_layers,
               vocab_size=r.cfg.vocab_size, layers=r.layers, load=lambda r=r: r,
               options=WorkerOptions(ctx=CTX, backoff_min=0.01, backoff_max=0.1,
                                     connect_timeout=2.0))
    t = threading.Thread(target=w.run, daemon=True, name=f"test-worker-{spec}")
    t.start()
    workers.append(w)
    threads.append(t)
  coord.wait_route(60.0)
  yield coord, workers
  for w in workers:
    w.stop()
  coord.close()
  for t in threads:
    t.join(timeout=10)


def _max_diff(a, b):
  assert set(a.keys()) == set(b.keys())
  np.testing.assert_array_equal(a.positions, b.positions)
  return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a.keys())


def test_rows_cover_the_prompt_then_each_token_fed_back(reference):
  toks, cap, results = reference
  n_rows = P + N_NEW - 1
  assert cap.positions.tolist() == list(range(n_rows))
  assert [r.captured.positions.tolist() for r in results[1:]] == [[P], [P + 1], [P + 2]]
  assert cap["hc_out.2"].shape == (n_rows, 4, 256) and cap["router_ids.0"].dtype == np.int32
  assert cap["lens.1"].shape == cap["logits"].shape == (n_rows, 512)
  np.testing.assert_array_equal(cap["lens.3"], cap["logits"])


def test_in_process_split_captures_what_one_process_does(tiny_gguf, reference):
  with build.local_backend(tiny_gguf, ranges=("0:1", "2:output"), ctx_size=CTX,
                           prefill_chunk=CHUNK) as split:
    toks, cap, _ = generate(split, ALL)
  assert toks == reference[0]
  assert _max_diff(cap, reference[1]) <= 1e-6


def test_coordinator_and_workers_capture_what_one_process_does(route, reference):
  coord, _ = route
  toks, cap, results = generate(coord, ALL)
  assert toks == reference[0]
  assert _max_diff(cap, reference[1]) <= 1e-6
  # the workers' captured arrays travelled back with the replies (bytes beyond the plain step)
  assert results[-1].telemetry[1].bytes_out > 4096 + 100


def _plain_decode_bytes(sid: str, hops) -> list[tuple[int, int]]:
  """Protocol v3 bytes of one plain decode token (docs/protocol.md §1): 16-byte frame header,
  binary WORK (44 + sid + range) + 4 token bytes + f32 activations; RESULT hidden (38 + sid +
  a 14-byte descriptor) + activations, or the head's token (38 + sid)."""
  x = 4 * 4 * 256  # [1, C, D] f32
  out = []
  for layers in hops:
    work = protocol.HEADER.size + 44 + 1 + len(sid) + 1 + len(layers) + 4 + x
    res = protocol.HEADER.size + 38 + 1 + len(sid) + (0 if "output" in layers else 14 + x)
    out.append((work, res))
  return out


def test_no_capture_is_todays_step(route, reference):
  """Same tokens, no compilation on any stage, not one byte more on the wire."""
  coord, workers = route
  runners = [coord.runners[0]] + [w.runner for w in workers]
  generate(coord, None, n=2)  # compiles the plain programs of these shapes, if not yet
  generate(coord, ALL, n=2)
  traces = [r.n_traces for r in runners]
  toks, cap, results = generate(coord, None)
  assert [r.n_traces for r in runners] == traces
  assert toks == reference[0] and all(r.captured is None for r in results)
  sid_len = 16
  want = _plain_decode_bytes("x" * sid_len, ["1:1", "2:output"])
  for res in results[1:]:
    got = [(t.bytes_in, t.bytes_out) for t in res.telemetry[1:]]
    assert got == want


def _batched_pair(coord, first: dict, second: dict):
  """Two sessions stepped together N_NEW times through `step_many`, with the StepRequest
  keywords `first` and `second` -> (their generated tokens, each step's two results)."""
  sids, trs, steps = [coord.new_session(), coord.new_session()], [list(PROMPT), list(PROMPT)], []
  for i in range(N_NEW):
    res = coord.step_many([StepRequest(sids[0], trs[0], GREEDY, i, **first),
                           StepRequest(sids[1], trs[1], GREEDY, i, **second)])
    for tr, r in zip(trs, res):
      assert not isinstance(r, BaseException), r
      tr.append(r.token)
    steps.append(res)
  for sid in sids:
    coord.close_session(sid)
  return [tr[len(PROMPT):] for tr in trs], steps


def test_sessions_capturing_and_not_batch_together(route, reference):
  coord, _ = route
  toks, steps = _batched_pair(coord, {"capture": ALL}, {})
  assert all(res[1].captured is None for res in steps)
  assert toks[0] == toks[1] == reference[0]
  assert _max_diff(Captured.concat([res[0].captured for res in steps]), reference[1]) <= 1e-6


def test_positions_and_keys_select_what_travels(route, one, reference):
  coord, _ = route
  spec = CaptureSpec.of_keys(["ffn_out.1", "lens.0", "router_ids.3", "logits"],
                             positions=[2, 17, P + 1])
  for b in (one, coord):
    _, cap, results = generate(b, spec)
    assert sorted(cap.keys()) == ["ffn_out.1", "lens.0", "logits", "router_ids.3"]
    assert cap.positions.tolist() == [2, 17, P + 1]
    for k in cap.keys():  # another set of points is another program: float rounding apart
      np.testing.assert_allclose(cap[k], reference[1][k][[2, 17, P + 1]], rtol=1e-5, atol=1e-5)
  _, cap, _ = generate(coord, CaptureSpec.parse("router_ids", "2", positions="last"), n=2)
  assert cap.positions.tolist() == [P - 1, P]


@pytest.mark.parametrize("spec, message", [
    (lambda: CaptureSpec(("attn_out", "nope")), "unknown capture point 'nope'"),
    (lambda: CaptureSpec.parse("ffn_out", "2:7"), "capture layer 4 is out of range"),
    (lambda: CaptureSpec.parse("lens", max_bytes=1000), "over the limit of 1000"),
])
def test_bad_requests_fail_before_compute_and_the_session_survives(route, spec, message):
  coord, workers = route
  runners = [coord.runners[0]] + [w.runner for w in workers]
  sid = coord.new_session()
  first = coord.step(sid, PROMPT, GREEDY, 0).token
  traces = [r.n_traces for r in runners]
  with pytest.raises(CaptureError, match=message) as e:
    coord.step(sid, PROMPT + [first], GREEDY, 1, capture=spec())
  assert "\n" not in str(e.value)
  assert [r.n_traces for r in runners] == traces and coord.session_tokens(sid) == PROMPT
  res = coord.step(sid, PROMPT + [first], GREEDY, 1)
  assert res.n_computed == 1
  coord.close_session(sid)


def test_the_notebook_api_is_the_same_on_a_route(route, reference):
  """`research.Lab` traces through the coordinator as through one process (every point on
  every layer: the programs the other tests compiled)."""
  coord, _ = route
  lab = Lab(coord)
  with lab.trace(PROMPT) as t:
    saved = {p: getattr(t.layers.all, p).save() for p in LAYER_POINTS}
    one = t.layers[2].output.save()  # nnsight's name for hc_out
    logits = t.logits.save()
    with pytest.raises(RuntimeError, match="has not run yet"):
      one.value
  assert t.next_token == reference[0][0] and t.captured.positions.tolist() == list(range(P))
  for p, s in saved.items():
    assert s.value.shape[:2] == (4, P)
    for il in range(4):
      np.testing.assert_array_equal(s.value[il], reference[1][f"{p}.{il}"][:P])
  np.testing.assert_array_equal(one.value, reference[1]["hc_out.2"][:P])
  np.testing.assert_array_equal(logits.value, reference[1]["logits"][:P])
  with pytest.raises(CaptureError, match="nothing is saved"):
    with lab.trace(PROMPT):
      pass
  with pytest.raises(IndexError, match="layer 4 is out of range"):
    t.layers[4]
  with pytest.raises(AttributeError, match="no point 'mlp'"):
    t.layers[0].mlp


# ------------------------------------------------------------- interventions on workers


@pytest.fixture(scope="module")
def edits(one):
  """Each hop edits its own layers: ds4-style steering of every layer's ffn_out, a patch of
  attn_out on worker 1:1 at two prompt positions, an expert banned on the head's layer 3."""
  cfg, rng = one.cfg, np.random.default_rng(1)
  d = rng.standard_normal(cfg.d_model).astype(np.float32)
  rows = 3 * rng.standard_normal((2, cfg.d_model)).astype(np.float32)
  ban = Interventions.experts(3, cfg, ban=[0, 1, 2]).edits
  return Interventions([Edit("project", "ffn_out", il, d, 1.5) for il in range(cfg.n_layers)]
                       + [Edit("set", "attn_out", 1, rows, positions=(3, 12)), *ban]
                       ).resolve(cfg)


def _edited(backend, edits, sid=None, n=N_NEW, between=None):
  """Greedy steps under `edits` -> (tokens, [logits_V per step], results); `between(i, sid)`
  runs before step i."""
  sid, tr, out = sid or backend.new_session(), list(PROMPT), []
  for i in range(n):
    if between is not None:
      between(i, sid)
    out.append(backend.step(sid, tr, GREEDY, i, return_logits=True, edits=edits))
    tr.append(out[-1].token)
  backend.close_session(sid)
  return tr[len(PROMPT):], [r.logits_V for r in out], out


@pytest.fixture(scope="module")
def edited_one(one, edits):
  return _edited(one, edits)


def test_workers_apply_the_edits_of_their_layers_as_one_process(route, edited_one, reference,
                                                                 edits):
  coord, _ = route
  toks, logits, results = _edited(coord, edits)
  assert toks == edited_one[0]
  assert max(float(np.abs(a - b).max()) for a, b in zip(logits, edited_one[1])) <= 1e-6
  plain = generate(coord, CaptureSpec.parse("logits", positions="last"), n=1)[1]["logits"][0]
  assert float(np.abs(plain - logits[0]).max()) > 1e-2  # the edits changed the model
  # Worker 1:1 got its edits (the patch rows, the direction) once; later steps name the key.
  first, later = results[0].telemetry[1].bytes_in, results[-1].telemetry[1].bytes_in
  plain_work = _plain_decode_bytes("x" * 16, ["1:1"])[0][0]
  assert first > (3 * 256) * 4 and plain_work < later <= plain_work + 64


def test_a_worker_that_lost_the_edits_gets_them_again(route, edited_one, edits):
  """A worker that evicted the session, or holds it under other edits, answers
  PrefixMismatch; the coordinator replays that hop with the edits in full."""
  coord, workers = route

  def lose(i, sid):
    if i == 1:
      workers[0].sessions.drop(sid)
    if i == 2:
      workers[1].sessions.get(sid).edits_key = "stale"

  toks, logits, _ = _edited(coord, edits, between=lose)
  assert toks == edited_one[0]
  assert max(float(np.abs(a - b).max()) for a, b in zip(logits, edited_one[1])) <= 1e-6


def test_steered_and_plain_sessions_batch_together_on_workers(route, edited_one, reference,
                                                               edits):
  coord, _ = route
  toks, _ = _batched_pair(coord, {"edits": edits}, {})
  assert toks[0] == edited_one[0] and toks[1] == reference[0]


def test_a_worker_that_cannot_edit_refuses_before_compute(route, edits, monkeypatch):
  coord, _ = route
  hop = coord.wait_route()[-1]
  monkeypatch.setitem(hop.hello, "caps", [c for c in hop.hello["caps"] if c != "edits"])
  sid = coord.new_session()
  with pytest.raises(EditError, match="cannot take interventions") as e:
    coord.step(sid, PROMPT, GREEDY, 0, edits=edits)
  assert "\n" not in str(e.value) and coord.session_tokens(sid) == []
  coord.close_session(sid)
