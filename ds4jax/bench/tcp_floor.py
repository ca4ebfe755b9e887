"""The physical floor: a raw stdlib TCP round trip of a given request/reply size on loopback.

An echo server runs in its own process (as a worker would), the client sends `n_in` bytes and
waits for `n_out` bytes back, with TCP_NODELAY on both ends and preallocated buffers. Nothing
else happens per message: no framing, no JSON, no numpy, so the bridge's per-hop overhead can
be compared against it.

    floors = measure_floor([(8300, 8250), (8300, 180)], rounds=200)

Run as `python -m ds4jax.bench.tcp_floor` it serves, printing its port on stdout.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from typing import Sequence

import numpy as np

_REQ = struct.Struct("!II")  # n_in, n_out


def _recv_exact(sock: socket.socket, view: memoryview, n: int) -> None:
  got = 0
  while got < n:
    k = sock.recv_into(view[got:n])
    if not k:
      raise EOFError
    got += k


def serve() -> None:
  """Echo loop: one connection at a time; each request says how many bytes to send back."""
  lsock = socket.socket()
  lsock.bind(("127.0.0.1", 0))
  lsock.listen(1)
  print(lsock.getsockname()[1], flush=True)
  buf = bytearray(64 << 20)
  view = memoryview(buf)
  while True:
    conn, _ = lsock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
      while True:
        _recv_exact(conn, view, _REQ.size)
        n_in, n_out = _REQ.unpack_from(buf)
        _recv_exact(conn, view, n_in)
        conn.sendall(view[:n_out])
    except (EOFError, OSError):
      conn.close()


def measure_floor(sizes: Sequence[tuple[int, int]], *, rounds: int = 200, warmup: int = 20,
                  gaps_s: Sequence[float] | None = None) -> list[dict]:
  """Median (and p10/p90) round trip in seconds for each (request bytes, reply bytes).

  Back to back, both processes stay on a CPU. With `gaps_s` (one per size) each size is
  measured again with the client idle for that long between round trips, as a decode hop is
  (the peer sleeps in recv while the other stages compute): `rtt_s_median_after_gap`.
  """
  proc = subprocess.Popen([sys.executable, "-m", "ds4jax.bench.tcp_floor"],
                          stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
  try:
    port = int(proc.stdout.readline())
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    for k, (n_in, n_out) in enumerate(sizes):
      n_in, n_out = max(0, int(n_in) - _REQ.size), int(n_out)
      msg = _REQ.pack(n_in, n_out) + bytes(n_in)
      buf = bytearray(max(n_out, 1))
      view = memoryview(buf)

      def trips(n, gap):
        rtt = []
        for i in range(warmup + n):
          if gap:
            time.sleep(gap)
          t0 = time.perf_counter()
          sock.sendall(msg)
          _recv_exact(sock, view, n_out)
          if i >= warmup:
            rtt.append(time.perf_counter() - t0)
        return rtt

      rtt = trips(rounds, 0.0)
      row = {"bytes_in": n_in + _REQ.size, "bytes_out": n_out, "rounds": rounds,
             "rtt_s_median": float(np.median(rtt)),
             "rtt_s_p10": float(np.percentile(rtt, 10)),
             "rtt_s_p90": float(np.percentile(rtt, 90))}
      if gaps_s:
        gap = float(gaps_s[k])
        # Bounded: at most ~2 s of sleeping per size.
        n = max(10, min(rounds, int(2.0 / max(gap, 1e-3))))
        row.update(gap_s=gap, rtt_s_median_after_gap=float(np.median(trips(n, gap))))
      out.append(row)
    sock.close()
    return out
  finally:
    proc.kill()
    proc.wait()


if __name__ == "__main__":
  serve()
