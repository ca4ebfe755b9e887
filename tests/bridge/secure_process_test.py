"""Auth across processes: worker processes (a fake stage, so no JAX) dial a keyed
coordinator over loopback. The right key from a file or the environment generates exactly;
a wrong key and no key are refused, with the reason in the coordinator's log and in the
worker process's stderr; the key never appears on the worker's command line."""

import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
from ds4jax.config import LayerRange
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.fake_stage import FakeConfig, FakeRunner, full_logits

pytestmark = pytest.mark.e2e
CFG = FakeConfig()
CTX = 32
KEY = b"process-test-key-0123456789"

WORKER = r"""
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
from ds4jax.wire import auth
from ds4jax.bridge.worker.worker import Worker, WorkerOptions
from ds4jax.config import LayerRange
from ds4jax.testing.fake_stage import FakeConfig, FakeRunner

cfg, rng = FakeConfig(), LayerRange(2, 3, True)
port, key_file = int(sys.argv[1]), (sys.argv[2] or None)
Worker(("127.0.0.1", port), fingerprint=cfg.fingerprint(), n_layers=cfg.n_layers,
       vocab_size=cfg.vocab_size, layers=rng, load=lambda: FakeRunner(cfg, rng, ctx_size=32),
       options=WorkerOptions(ctx=32, key=auth.load_key(key_file), backoff_min=0.1,
                             backoff_max=0.3)).run()
"""


@pytest.fixture
def coord():
  c = Coordinator(FakeRunner(CFG, LayerRange(0, 1, False), ctx_size=CTX),
                  CoordinatorOptions(key=KEY, heartbeat_s=0.2, handshake_timeout=2.0,
                                     route_timeout=10))
  yield c
  c.close()


@pytest.fixture
def spawn(coord):
  procs = []

  def start(key_file="", env_key=None):
    env = {k: v for k, v in os.environ.items() if k != "DS4JAX_KEY"}
    if env_key is not None:
      env["DS4JAX_KEY"] = env_key
    p = subprocess.Popen([sys.executable, "-c", WORKER, str(coord.address[1]), key_file],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    return p

  yield start
  for p in procs:
    p.kill()
    p.wait(10)


def exit_and_read(p) -> str:
  """A rejected key is final: the worker process exits by itself, with status 1 (this
  script does not map HandshakeRefused to scripts/worker.py's 2), printing the reason."""
  err = p.communicate(timeout=60)[1]
  assert p.returncode == 1, (p.returncode, err[-2000:])
  return err


def wait_logged(caplog, text, timeout=60.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(text in r.getMessage() for r in caplog.records):
      return
    time.sleep(0.05)
  raise AssertionError(f"the coordinator never logged {text!r}")


def generates_exactly(coord):
  """Three greedy steps through the keyed route equal the one-process reference."""
  sid, toks = coord.new_session(), [3, 5, 7]
  for k in range(3):
    res = coord.step(sid, toks, SamplingParams(), k)
    assert res.token == int(np.argmax(full_logits(CFG, toks)[-1]))
    toks.append(res.token)


def test_right_key_from_file_generates_and_stays_off_the_command_line(coord, spawn, tmp_path):
  key_file = tmp_path / "bridge.key"
  key_file.write_bytes(KEY + b"\n")
  p = spawn(str(key_file))
  coord.wait_route(60)
  with open(f"/proc/{p.pid}/cmdline", "rb") as f:
    assert KEY not in f.read()
  generates_exactly(coord)


def test_right_key_from_environment_generates(coord, spawn):
  spawn(env_key=KEY.decode())
  coord.wait_route(60)
  generates_exactly(coord)


def test_wrong_key_process_refused_and_logged_on_both_sides(coord, spawn, caplog):
  caplog.set_level(logging.WARNING, logger="ds4jax.bridge")
  p = spawn(env_key="another-key-another-key")
  wait_logged(caplog, "wrong key")
  err = exit_and_read(p)
  assert "auth failed: wrong key" in err, err[-2000:]
  assert coord.route_info()["workers"] == []


def test_keyless_process_refused_and_logged_on_both_sides(coord, spawn, caplog):
  caplog.set_level(logging.WARNING, logger="ds4jax.bridge")
  p = spawn()
  wait_logged(caplog, "peer sent no auth")
  err = exit_and_read(p)
  assert "expects a pre-shared key handshake" in err, err[-2000:]
  assert coord.route_info()["workers"] == []
