"""The decode hot path crosses no thread boundary (docs/protocol.md §3, "Who reads"):
the coordinator's stepping thread reads its own replies, and a worker computes on the
thread that read the WORK while the other one keeps answering heartbeats."""

import threading

import numpy as np
import pytest

from ds4jax.bridge.coordinator import links
from ds4jax.runtime import step as step_lib
from ds4jax.wire.protocol import MsgType
from bridge_fake_test import CFG, GREEDY, PROMPT, coordinator, full_logits, workers


@pytest.fixture
def dispatches(monkeypatch):
  """(thread name, frame type) of every frame a worker link dispatches."""
  seen = []
  orig = links.WorkerLink._dispatch

  def spy(self, f):
    seen.append((threading.current_thread().name, f.type))
    return orig(self, f)

  monkeypatch.setattr(links.WorkerLink, "_dispatch", spy)
  return seen


def test_decode_replies_are_read_and_relayed_on_the_stepping_thread(dispatches):
  with coordinator(prefill_chunk=3) as coord, workers(coord.address,
                                                      ["1:1", "2:2", "3:output"]):
    coord.wait_route(5)
    sid = coord.new_session()
    toks = list(PROMPT)
    r = coord.step(sid, toks, GREEDY, 0)  # 10 tokens in chunks of 3: pipelined prefill
    prefill = [d for d in dispatches if d[1] == MsgType.RESULT]
    dispatches.clear()
    for step in range(1, 6):
      toks.append(r.token)
      r = coord.step(sid, toks, GREEDY, step, return_logits=True)
      np.testing.assert_array_equal(r.logits_V, full_logits(CFG, toks)[-1])
    decode = [d for d in dispatches if d[1] == MsgType.RESULT]
  me = threading.current_thread().name
  # Prefill overlaps local compute with the hops: the links' reader threads relay there.
  assert {name for name, _ in prefill} - {me}
  # Each decode token: three RESULTs (one per hop), all read, relayed and handed over here.
  assert len(decode) == 15 and {name for name, _ in decode} == {me}


@pytest.mark.parametrize("n", [1, 3])  # a decode token (takeover within 0.1 s), a chunk
def test_a_long_compute_still_answers_heartbeats(n):
  """The worker runs WORK on the thread that read it; the other thread takes over reading,
  so a 1.3 s forward outlives the coordinator's 1 s liveness deadline without a drop."""
  with coordinator(heartbeat_s=0.2, request_timeout=10) as coord, \
      workers(coord.address, ["1:output"], delay_s=1.3, warmup=False) as (_, errors):
    coord.wait_route(10)
    assert coord.dead_after == 1.0
    sid = coord.new_session()
    r = coord.step(sid, PROMPT[:n], GREEDY, 0, return_logits=True)  # one WORK: 1.3 s
    np.testing.assert_array_equal(r.logits_V, full_logits(CFG, PROMPT[:n])[-1])
    assert not errors
    assert not [e for e in coord.events if "lost" in e or "rebuilt" in e], coord.events


def test_a_failed_direct_send_releases_the_links():
  """A decode step that claimed its links and then failed to send leaves them claimable (a
  leaked claim would park the link's reader thread for good)."""
  import socket

  from ds4jax.bridge.coordinator import pipeline
  from ds4jax.wire import transport
  from ds4jax.config import LayerRange
  a, b = socket.socketpair()
  link = links.WorkerLink(1, transport.Channel(a, "test"), {"ctx": 64}, LayerRange(1, 3, True),
                          heartbeat_s=1.0, dead_after=3.0, request_timeout=5.0,
                          on_change=lambda *_: None)
  try:
    def boom(*args, **kw):
      raise RuntimeError("boom")

    link.ch.send = boom
    ps = pipeline.Pass("s1", [link], window=2, extra={}, out_dtype="f32",
                       on_done=lambda *_: None, direct=True)
    assert ps.acquire()
    chunk = step_lib.chunks_of([5], 0, 0, 4, "out")[0]
    with pytest.raises(RuntimeError, match="boom"):
      ps.submit(chunk, None, b"")
    assert link._claims == 0 and link.try_claim()
    link.unclaim()
  finally:
    link.close_wakeup()
    a.close()
    b.close()
