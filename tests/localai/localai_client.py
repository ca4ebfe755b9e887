"""Helpers for the LocalAI backend tests: a real `scripts/localai_backend.py` process and a
gRPC client built from our backend.proto, everything on loopback."""

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def backend_env(cache_dir, **extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", DS4JAX_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
  for k in ("LOCALAI_GRPC_AUTH_TOKEN", "DS4JAX_KEY"):
    env.pop(k, None)
  env.update(extra)
  return env


class Backend:
  """A LocalAI backend process (started as LocalAI does: `--addr HOST:PORT`) and its stub."""

  def __init__(self, env, log_path, *, argv=None, one_token=False, cwd=REPO):
    import grpc

    from ds4jax.local_cluster import free_port
    from ds4jax.localai import backend_pb2_grpc
    self.port = free_port()
    addr = f"127.0.0.1:{self.port}"
    argv = argv or [sys.executable, str(REPO / "scripts" / "localai_backend.py")]
    argv = argv + ([f"--addr={addr}"] if one_token else ["--addr", addr])
    self.log = open(log_path, "w")
    self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self.log,
                                 stderr=subprocess.STDOUT)
    self.channel = grpc.insecure_channel(addr)
    try:
      grpc.channel_ready_future(self.channel).result(timeout=60)
    except grpc.FutureTimeoutError:
      self.stop()
      raise RuntimeError(f"the backend did not start; see {log_path}") from None
    self.stub = backend_pb2_grpc.BackendStub(self.channel)

  def stop(self):
    self.channel.close()
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(20)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(5)
    self.log.close()
    return self.proc.returncode


class Prober:
  """Calls Health (and Status) every 50 ms in a thread; `health_ms` holds the latencies."""

  def __init__(self, stub, status=False):
    from ds4jax.localai import backend_pb2 as pb
    self.stub, self.pb, self.status = stub, pb, status
    self.health_ms: list[float] = []
    self.states: list[int] = []
    self.replies: set[bytes] = set()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      t0 = time.perf_counter()
      reply = self.stub.Health(self.pb.HealthMessage(), timeout=10)
      self.health_ms.append(1e3 * (time.perf_counter() - t0))
      self.replies.add(reply.message)
      if self.status:
        self.states.append(self.stub.Status(self.pb.HealthMessage(), timeout=10).state)
      self._stop.wait(0.05)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join(15)
