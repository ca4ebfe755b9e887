"""Per-request timing of the coordinator's worker links, for the benchmark only.

The bridge's own telemetry gives each hop's compute and queue time (measured by the worker)
and the bytes each way. What it cannot see from one side is the round trip: the probe wraps
`WorkerLink.request` in this (coordinator) process and stamps the moment a WORK frame starts
to be sent, the moment `send` returns, and the moment the reply's callback runs (after the
reader thread parsed the frame). It also times the coordinator's activation encoding. It is
installed only by the benchmark's child process; nothing else ever imports it.

    probe = HopProbe().install()
    with probe.recording():
      backend.step(...)
    probe.records, probe.encode_s  # one dict per WORK request; coordinator encode times
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any


class HopProbe:
  """Records one dict per WORK request while `recording()` is active."""

  def __init__(self):
    self.records: list[dict[str, Any]] = []
    self.encode_s: list[float] = []
    self._on = False
    self._lock = threading.Lock()
    self._installed = False

  def install(self) -> "HopProbe":
    from ds4jax.bridge import links, tensors
    if self._installed:
      return self
    self._installed = True
    probe = self
    orig_request, orig_encode = links.WorkerLink.request, tensors.encode

    def request(link, header, payload, callback):
      rec: dict[str, Any] = {"layers": str(link.layers), "n": int(header.get("n", 0)),
                             "want": header.get("w"), "t_start": time.perf_counter()}

      def on_reply(f, err):
        rec["t_reply"] = time.perf_counter()
        if f is not None:
          rec["bytes_out"] = int(f.nbytes)
          tel = f.header.get("t")  # [compute_us, queue_us] (protocol v2)
          if isinstance(tel, list) and len(tel) == 2:
            rec["compute_s"], rec["queue_s"] = tel[0] * 1e-6, tel[1] * 1e-6
        callback(f, err)

      n = orig_request(link, header, payload, on_reply)
      rec["t_sent"] = time.perf_counter()
      rec["bytes_in"] = int(n)
      probe._add(rec)
      return n

    def encode(x, dtype="f32"):
      t0 = time.perf_counter()
      out = orig_encode(x, dtype)
      probe._add_encode(time.perf_counter() - t0)
      return out

    links.WorkerLink.request = request
    tensors.encode = encode
    return self

  def _add(self, rec: dict[str, Any]) -> None:
    with self._lock:
      if self._on:
        self.records.append(rec)

  def _add_encode(self, dt: float) -> None:
    with self._lock:
      if self._on:
        self.encode_s.append(dt)

  @contextlib.contextmanager
  def recording(self):
    """Starts fresh `records`/`encode_s` lists that fill while the block runs."""
    with self._lock:
      self.records, self.encode_s, self._on = [], [], True
    try:
      yield self
    finally:
      with self._lock:
        self._on = False
