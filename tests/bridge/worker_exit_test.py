"""scripts/worker.py as a process: a rejected key or a HELLO refusal is final (exit 2 with one
line naming the reason), while an absent coordinator is transient (it keeps redialing)."""

import logging
import os
import subprocess
import sys
import threading

import pytest

from ds4jax.bridge.coordinator.coordinator import Coordinator, CoordinatorOptions
from ds4jax.config import LayerRange
from ds4jax.testing.fake_stage import FakeConfig, FakeRunner

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY = b"worker-exit-test-key-0123456789"


def start_worker(gguf, port, cache, *extra, env_key=None):
  env = {k: v for k, v in os.environ.items() if k != "DS4JAX_KEY"}
  env["JAX_PLATFORMS"] = "cpu"
  if env_key is not None:
    env["DS4JAX_KEY"] = env_key
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "worker.py"), f"--gguf={gguf}",
         "--layers=1:output", f"--coordinator=127.0.0.1:{port}", "--ctx_size=32",
         "--backoff_min=0.1", "--backoff_max=0.3", f"--cache_dir={cache}",
         "--exit_with_parent", *extra]
  return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=ROOT)


def coordinator(port=0, key=None):
  return Coordinator(FakeRunner(FakeConfig(), LayerRange(0, 0), 32),
                     CoordinatorOptions(port=port, key=key, heartbeat_s=0.2,
                                        handshake_timeout=5.0))


def finish(p, timeout=60):
  try:
    err = p.communicate(timeout=timeout)[1]
  except subprocess.TimeoutExpired:
    p.kill()
    err = p.communicate()[1]
    raise AssertionError(f"the worker is still running (redialing?):\n{err[-2000:]}")
  return p.returncode, err.strip().splitlines()[-1], err


def test_rejected_key_exits_with_the_reason(tiny_gguf, tiny_cache_dir, caplog):
  caplog.set_level(logging.WARNING, logger="ds4jax.bridge")
  with coordinator(key=KEY) as coord:
    p = start_worker(tiny_gguf, coord.address[1], tiny_cache_dir,
                     env_key="a-different-key-a-different-key")
    rc, last, err = finish(p)
  assert rc == 2, err[-2000:]
  assert last.startswith("error: ") and "auth failed: wrong key" in last, err[-2000:]
  assert "Traceback" not in err
  assert coord.route_info()["workers"] == []
  assert any("wrong key" in r.getMessage() for r in caplog.records)  # logged on both sides


def test_absent_coordinator_is_redialed_then_a_refusal_is_final(tiny_gguf, tiny_cache_dir):
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  p = start_worker(tiny_gguf, port, tiny_cache_dir)
  lines, redials = [], threading.Semaphore(0)

  def pump():
    for line in p.stderr:
      lines.append(line)
      if "not reachable" in line:
        redials.release()

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  try:
    # It dials a port nobody listens on, and keeps redialing (twice seen is enough).
    for _ in range(2):
      assert redials.acquire(timeout=120), "".join(lines)[-2000:]
    assert p.poll() is None, "".join(lines)[-2000:]
    # The coordinator comes up (another model: the fake stage) and refuses the HELLO.
    with coordinator(port=port) as coord:
      rc = p.wait(timeout=120)
    reader.join(30)
  finally:
    if p.poll() is None:
      p.kill()
      p.wait()
  err = "".join(lines)
  last = err.strip().splitlines()[-1]
  assert rc == 2 and last.startswith("error: refused by coordinator: model mismatch"), err[-2000:]
  assert any("model mismatch" in e for e in coord.events)
