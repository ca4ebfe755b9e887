"""Auth and TLS on real coordinator <-> worker links over loopback (issue 6, item 5).

A wrong key, no key and a replayed handshake are refused, with the reason logged by the
coordinator and by the other side; a keyed (and a TLS) link generates exactly.
"""

import logging
import socket
import threading
import time

import numpy as np
import pytest

from ds4jax.wire import auth
from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
from ds4jax.wire.errors import HandshakeRefused
from ds4jax.bridge.worker.worker import Worker, WorkerOptions
from ds4jax.config import LayerRange
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.certs import make_self_signed
from ds4jax.testing.fake_stage import FakeConfig, FakeRunner, full_logits

CFG = FakeConfig()
CTX = 32
LOCAL = LayerRange(0, 1, False)
REMOTE = LayerRange(2, 3, True)
KEY = b"correct horse battery staple"
WRONG = b"incorrect horse battery staple"


class Recorder:
  """A transport `wrap` hook: a passive eavesdropper on everything the worker sends."""

  def __init__(self):
    self.sent = bytearray()

  def __call__(self, sock):
    rec = self

    class Tap:
      def sendall(self, data):
        rec.sent += bytes(data)
        return sock.sendall(data)

      def __getattr__(self, name):
        return getattr(sock, name)

    return Tap()


@pytest.fixture
def cluster():
  """Starts a coordinator and workers on demand; stops everything afterwards."""
  made = []

  def coordinator(**opts):
    o = CoordinatorOptions(**dict(dict(handshake_timeout=1.0, heartbeat_s=0.2,
                                       route_timeout=5, request_timeout=5), **opts))
    c = Coordinator(FakeRunner(CFG, LOCAL, ctx_size=CTX), o)
    made.append(c)
    return c

  def worker(coord, **opts):
    o = WorkerOptions(**dict(dict(ctx=CTX, connect_timeout=1.0, backoff_min=0.05,
                                  backoff_max=0.2), **opts))
    w = Worker(coord.address, fingerprint=CFG.fingerprint(), n_layers=CFG.n_layers,
               vocab_size=CFG.vocab_size, layers=REMOTE,
               load=lambda: FakeRunner(CFG, REMOTE, ctx_size=CTX), options=o)
    w.refusal = None

    def run():
      try:
        w.run()
      except HandshakeRefused as e:  # final: a rejected key or certificate stops the worker
        w.refusal = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    w.thread = t
    made.append((w, t))
    return w

  yield coordinator, worker
  for m in reversed(made):
    if isinstance(m, tuple):
      m[0].stop()
      m[1].join(5)
    else:
      m.close()


def generate_checks(coord, n=3):
  sid, toks = coord.new_session(), [2, 7, 1]
  for k in range(n):
    res = coord.step(sid, toks, SamplingParams(), k)
    assert res.token == int(np.argmax(full_logits(CFG, toks)[-1]))
    toks.append(res.token)


def wait_logged(caplog, logger, text, timeout=5.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    for r in caplog.records:
      if r.name == logger and text in r.getMessage():
        return r.getMessage()
    time.sleep(0.02)
  raise AssertionError(f"{logger} never logged {text!r}; got "
                       f"{[(r.name, r.getMessage()) for r in caplog.records][-8:]}")


def test_keyed_link_generates(cluster):
  coordinator, worker = cluster
  coord = coordinator(key=KEY)
  worker(coord, key=KEY)
  coord.wait_route(5)
  generate_checks(coord)


def test_wrong_key_refused_and_logged_on_both_sides(cluster, caplog):
  caplog.set_level(logging.INFO, logger="ds4jax.bridge")
  coordinator, worker = cluster
  coord = coordinator(key=KEY)
  w = worker(coord, key=WRONG)
  msg = wait_logged(caplog, "ds4jax.bridge.coordinator", "wrong key")
  assert "rejected connection from 127.0.0.1:" in msg
  wait_logged(caplog, "ds4jax.bridge.worker", "auth failed: wrong key")
  w.thread.join(5)  # redialing cannot fix a wrong key: the worker stops with the reason
  assert "wrong key" in str(w.refusal)
  assert not coord.route_ready()[0] and coord.route_info()["workers"] == []


def test_missing_key_refused_and_logged_on_both_sides(cluster, caplog):
  caplog.set_level(logging.INFO, logger="ds4jax.bridge")
  coordinator, worker = cluster
  coord = coordinator(key=KEY)
  w = worker(coord)  # no key: it sends HELLO straight away
  wait_logged(caplog, "ds4jax.bridge.coordinator", "peer sent no auth")
  wait_logged(caplog, "ds4jax.bridge.worker", "expects a pre-shared key handshake")
  w.thread.join(5)
  assert "expects a pre-shared key handshake" in str(w.refusal)
  assert coord.route_info()["workers"] == []


def test_keyed_worker_against_keyless_coordinator_fails_clearly(cluster, caplog):
  caplog.set_level(logging.INFO, logger="ds4jax.bridge")
  coordinator, worker = cluster
  coord = coordinator()
  worker(coord, key=KEY)
  wait_logged(caplog, "ds4jax.bridge.coordinator", "expects a pre-shared key handshake")
  wait_logged(caplog, "ds4jax.bridge.worker", "does the server have a key configured")
  assert coord.route_info()["workers"] == []


def test_replayed_handshake_refused_and_logged(cluster, caplog):
  caplog.set_level(logging.INFO, logger="ds4jax.bridge")
  coordinator, worker = cluster
  coord = coordinator(key=KEY)
  tap = Recorder()
  w = worker(coord, key=KEY, wrap=tap)
  coord.wait_route(5)
  w.stop()
  # The eavesdropper saw HELLO(40) + PROOF(72) + OK(8) + the protocol HELLO frame.
  captured = bytes(tap.sent)
  assert captured[:4] == auth.MAGIC and captured[112:116] == auth.MAGIC
  s = socket.create_connection(coord.address, timeout=5)
  try:
    s.sendall(captured[:40])
    assert s.recv(40)[:4] == auth.MAGIC  # a fresh challenge
    s.sendall(captured[40:])
    reply = s.recv(8)
  finally:
    s.close()
  _, _, mtype, code = auth._PREFIX.unpack(reply)
  assert mtype == auth.FAIL and auth._CODE_REASONS[code] == auth.REPLAY  # the replayer is told
  msg = wait_logged(caplog, "ds4jax.bridge.coordinator", "replayed/stale")
  assert "rejected connection from 127.0.0.1:" in msg
  assert len(coord.route_info()["workers"]) <= 1  # only the real worker ever got in


def test_tls_with_key_generates_and_untrusted_cert_is_refused(cluster, caplog, tmp_path):
  caplog.set_level(logging.INFO, logger="ds4jax.bridge")
  certfile, keyfile = make_self_signed(str(tmp_path), "coord")
  other, _ = make_self_signed(str(tmp_path), "other")
  coordinator, worker = cluster
  coord = coordinator(key=KEY, tls=auth.server_ssl_context(certfile, keyfile))
  worker(coord, key=KEY, tls=auth.client_ssl_context(certfile))
  links = coord.wait_route(5)
  assert links[0].ch.sock.version().startswith("TLSv1.")
  generate_checks(coord)

  worker(coord, key=KEY, tls=auth.client_ssl_context(other))  # does not trust coord's cert
  wait_logged(caplog, "ds4jax.bridge.worker", "certificate verify failed")
  wait_logged(caplog, "ds4jax.bridge.coordinator", "TLS failed")
  assert len(coord.route_info()["workers"]) == 1


def test_coordinator_warns_when_exposed_without_a_key(cluster, caplog):
  caplog.set_level(logging.WARNING, logger="ds4jax.bridge")
  coordinator, _ = cluster
  assert coordinator().bind_warning is None  # default: loopback
  assert coordinator(host="0.0.0.0", key=KEY).bind_warning is None
  exposed = coordinator(host="0.0.0.0")
  assert "every interface without a key" in exposed.bind_warning
  assert any("without a key" in r.getMessage() for r in caplog.records)


def test_replayed_coordinator_handshake_refused_by_the_worker(cluster, caplog):
  """An impostor coordinator replays what the real one sent: the worker refuses, logs why,
  and tells the impostor (FAIL with the replay code)."""
  caplog.set_level(logging.INFO, logger="ds4jax.bridge")
  coordinator, worker = cluster
  tap = Recorder()
  coord = coordinator(key=KEY, wrap=tap)
  worker(coord, key=KEY)
  coord.wait_route(5)
  captured = bytes(tap.sent)  # CHALLENGE(40) + WELCOME(72) + ACCEPT frame ...
  assert captured[40:44] == auth.MAGIC
  impostor = socket.create_server(("127.0.0.1", 0))
  impostor.settimeout(5)

  class Addr:  # the worker fixture dials coord.address
    address = impostor.getsockname()[:2]

  worker(Addr, key=KEY)
  s, _ = impostor.accept()
  try:
    s.settimeout(5)
    s.recv(40)  # the worker's fresh HELLO
    s.sendall(captured[:40])
    s.recv(72)  # its PROOF for the replayed challenge
    s.sendall(captured[40:112])
    reply = s.recv(8)
  finally:
    s.close()
    impostor.close()
  _, _, mtype, code = auth._PREFIX.unpack(reply)
  assert mtype == auth.FAIL and auth._CODE_REASONS[code] == auth.REPLAY
  wait_logged(caplog, "ds4jax.bridge.worker", "replayed/stale")
