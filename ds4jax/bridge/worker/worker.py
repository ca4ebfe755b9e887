"""The worker: dial the coordinator (with backoff), say HELLO, load and compile its slice,
then serve the connection; when the coordinator goes away (EOF, error, or no frame for
`dead_after`), drop every session and dial again: coordinator restarts need no worker restart.

Every session's state is a slot of one `runtime.batching.StageBatcher` pool, whose compute
thread runs the one-token WORK of all sessions that are pending together as ONE
`forward_batch` call (docs/design.md §11). Frames stay per session on the wire; a worker
batches what is queued (docs/protocol.md §3). The connection's serving threads are in
`connection.py`, a WORK frame's handling in `work.py`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import random
import socket
import threading
import time
from typing import Any, Callable

from ds4jax.wire import protocol, tensors, transport
from ds4jax.wire.errors import HandshakeRefused, LinkLost, ProtocolError
from ds4jax.wire.protocol import MsgType, field
from ds4jax.bridge.worker.connection import Connection
from ds4jax.bridge.worker.sessions import SessionStore
from ds4jax.bridge.worker.work import run_work
from ds4jax.config import LayerRange
from ds4jax.runtime.batching import StageBatcher, warmup_batched

log = logging.getLogger("ds4jax.bridge.worker")
CAPABILITIES = ("sample", "logits", "rewind", "ack_only", "telemetry", "batch", "capture",
                "edits")


@dataclasses.dataclass
class WorkerOptions:
  ctx: int = 4096
  max_sessions: int = 8
  key: bytes | None = None
  tls: Any = None  # ssl.SSLContext (auth.client_ssl_context)
  tls_server_name: str | None = None  # checked against the certificate; default: the host
  wrap: Callable | None = None
  connect_timeout: float = 5.0
  # Give up (ConnectionError) once the coordinator has been unreachable this long, counted
  # from the start or the last lost link; None: redial forever, as a service should.
  dial_timeout: float | None = None
  backoff_min: float = 0.2
  backoff_max: float = 5.0
  frame_timeout: float = 30.0
  # Used until ACCEPT tells the coordinator's heartbeat; dead after this long without a frame.
  dead_after: float = 10.0
  protocol_version: int = protocol.PROTOCOL_VERSION  # tests speak other versions
  # Compile the decode and prefill-chunk shapes before READY, so first requests do not pay
  # for compilation against their deadlines.
  warmup: bool = True
  # Decode batch sizes compiled by the warm-up (others compile on first use; buckets are
  # powers of two up to the runner's max_batch).
  warm_batches: tuple[int, ...] = (1,)


class Worker:
  """Serves `layers` of one model for one coordinator at a time.

  Args:
    coordinator: (host, port) to dial.
    fingerprint, n_layers, vocab_size: the model this worker holds (sent in HELLO).
    layers: the requested range as given by the user (validated by the coordinator).
    load: returns the StageRunner; called once: after the first ACCEPT, or with `refit`
      at `run()`, while the worker dials (a route then forms in max(load, connect)).
    refit: after ACCEPT, fits the preloaded runner to what the coordinator named
      (`prefill_chunk`); returns the runner to serve.
  """

  def __init__(self, coordinator: tuple[str, int], *, fingerprint: str, n_layers: int,
               vocab_size: int, layers: LayerRange, load: Callable[[], Any],
               options: WorkerOptions | None = None,
               refit: Callable[[Any], Any] | None = None):
    self.addr = coordinator
    self.fingerprint = fingerprint
    self.n_layers = n_layers
    self.vocab_size = vocab_size
    self.layers = layers
    self._load, self._refit = load, refit
    self._preload: concurrent.futures.Future | None = None
    self.opt = options or WorkerOptions()
    self.runner = None
    self.batcher: StageBatcher | None = None  # the pool of session states (after the load)
    self._transfers = None  # session snapshot exchanges in progress (worker/snapshots.py)
    self.sessions = SessionStore(self.opt.max_sessions)
    self.host = socket.gethostname()
    self._stop = threading.Event()
    self.connections = 0  # successful ACCEPTs, for tests and logs
    self._ch = None
    self._chunk = 0
    self._fatal: BaseException | None = None

  def stop(self) -> None:
    self._stop.set()

  def abort(self) -> None:
    """Stops and drops the live connection at once, like a crash (tests)."""
    self._stop.set()
    ch = self._ch
    if ch is not None:
      ch.close()

  # ------------------------------------------------------------------------------ dial loop
  def run(self) -> None:
    """Serves until stop(); raises HandshakeRefused when the coordinator refuses this worker
    or the key/certificate check fails (final: redialing cannot fix it; see final_reason).
    The session pool's compute thread stops when it returns."""
    if self._refit is not None and self.runner is None and self._preload is None:
      self._preload = concurrent.futures.Future()
      threading.Thread(target=self._preload_runner, daemon=True, name="worker-load").start()
    try:
      self._dial_loop()
    finally:
      b, self.batcher = self.batcher, None
      if b is not None:
        self.sessions.clear()
        b.close()

  def _dial_loop(self) -> None:
    delay = self.opt.backoff_min
    since = time.monotonic()  # unreachable since
    while not self._stop.is_set():
      try:
        sock = transport.connect(*self.addr, timeout=self.opt.connect_timeout, wrap=self.opt.wrap)
      except OSError as e:
        waited = time.monotonic() - since
        if self.opt.dial_timeout is not None and waited >= self.opt.dial_timeout:
          raise ConnectionError(f"coordinator {self.addr[0]}:{self.addr[1]} not reachable for "
                                f"{waited:.0f}s (--connect_timeout): {e}") from None
        log.info("coordinator %s:%d not reachable (%s); retrying in %.1fs", *self.addr, e, delay)
        self._stop.wait(delay * (0.5 + random.random()))
        delay = min(delay * 2, self.opt.backoff_max)
        continue
      accepted = False
      try:
        sock = transport.secure_client(sock, key=self.opt.key, tls=self.opt.tls,
                                       server_hostname=self.opt.tls_server_name or self.addr[0],
                                       timeout=self.opt.connect_timeout)
        ch = transport.Channel(sock, f"{self.addr[0]}:{self.addr[1]}",
                               frame_timeout=self.opt.frame_timeout)
        hb = self._handshake(ch)
        accepted = True
        delay = self.opt.backoff_min
        self._serve(ch, hb)
      except HandshakeRefused:
        raise
      except Exception as e:  # auth failures, lost links and the like
        # Only a failure to get in is final: later, a broken stream is a lost link.
        reason = None if accepted else final_reason(e)
        if reason is not None:  # redialing cannot fix a wrong key or certificate: stop
          log.error("coordinator %s:%d rejected this worker: %s", *self.addr, reason)
          raise HandshakeRefused(reason) from None
        if isinstance(e, (OSError, EOFError, ProtocolError, LinkLost)):
          log.warning("link to coordinator lost: %s", e)
        else:  # log, back off, redial
          log.warning("connection to coordinator failed: %s: %s", type(e).__name__, e)
      finally:
        try:
          sock.close()
        except OSError:
          pass
      since = time.monotonic()
      n = self.sessions.clear()
      if self._fatal is not None:
        raise self._fatal
      if not self._stop.is_set():
        log.warning("dropped %d session(s); redialing %s:%d", n, *self.addr)
        self._stop.wait(delay * (0.5 + random.random()))
        delay = min(delay * 2, self.opt.backoff_max)

  def hello(self) -> dict[str, Any]:
    return {
        "protocol": self.opt.protocol_version, "fingerprint": self.fingerprint,
        "n_layers": self.n_layers, "start": self.layers.start, "end": self.layers.end,
        "has_output": self.layers.has_output, "ctx": self.opt.ctx,
        "dtypes": list(tensors.WIRE_DTYPES), "caps": list(CAPABILITIES), "host": self.host,
        "max_sessions": self.opt.max_sessions,
    }

  def _handshake(self, ch: transport.Channel) -> float:
    ch.send(MsgType.HELLO, self.hello(), version=self.opt.protocol_version)
    ch.max_payload, cap = 0, ch.max_payload  # ACCEPT/REFUSE carry no payload
    # Any version: a coordinator of another protocol version refuses us in its own frames.
    f = ch.recv(idle_timeout=self.opt.connect_timeout + 5, any_version=True)
    ch.max_payload = cap
    if f.version != self.opt.protocol_version and f.type != MsgType.REFUSE:
      raise HandshakeRefused(f"protocol version mismatch: the coordinator speaks version "
                             f"{f.version}, this worker {self.opt.protocol_version}")
    if f.type == MsgType.REFUSE:
      reason = str(f.header.get("reason", "no reason given"))
      log.error("coordinator refused this worker: %s", reason)
      raise HandshakeRefused(reason)
    if f.type != MsgType.ACCEPT:
      raise ProtocolError(f"expected ACCEPT or REFUSE, got {f.type.name}")
    hb = field(f.header, "heartbeat_s", float)
    if not 0.0 <= hb <= 300.0:  # a huge value would switch off our dead-coordinator check
      raise ProtocolError(f"ACCEPT heartbeat_s={hb} is outside [0, 300]")
    self.connections += 1
    self._chunk = field(f.header, "prefill_chunk", int, default=0, lo=0, hi=1 << 20)
    return hb

  @property
  def loaded(self) -> bool:
    """True once the slice is loaded and compiled (while dialing, or after ACCEPT)."""
    p = self._preload
    return self.runner is not None or (p is not None and p.done() and p.exception() is None)

  @property
  def chunk(self) -> int:
    """The coordinator's prefill chunk (ACCEPT names it; 0 until then, or if it did not)."""
    return self._chunk

  @property
  def warm_sizes(self) -> tuple[int, ...]:
    """The chunk sizes the warm-up runs (known once ACCEPT named the prefill chunk)."""
    return (1, self._chunk) if self.opt.warmup else ()

  def _preload_runner(self) -> None:
    t0 = time.monotonic()
    try:
      runner = self._load()
    except BaseException as e:  # raised again on the serving thread that waits for it
      self._preload.set_exception(e)
      return
    log.info("loaded layers %s in %.1fs", self.layers.describe(), time.monotonic() - t0)
    self._preload.set_result(runner)

  def _prepare(self, ch: transport.Channel) -> None:
    """Loads the slice and builds its session pool (once), compiles its shapes, then says
    READY. Runs on a serving thread, so the reader keeps answering heartbeats meanwhile."""
    if self.runner is None and self._preload is not None:
      self.runner = self._refit(self._preload.result())
    elif self.runner is None:
      t0 = time.monotonic()
      self.runner = self._load()
      log.info("loaded layers %s in %.1fs", self.layers.describe(), time.monotonic() - t0)
    if self.batcher is None:
      self.use_runner(self.runner)
    if self.opt.warmup:
      t0 = time.monotonic()
      warmup_batched(self.runner, self.opt.warm_batches, self.warm_sizes, self.opt.max_sessions)
      log.info("compiled chunk shapes in %.1fs", time.monotonic() - t0)
    ch.send(MsgType.READY, {})
    log.info("serving layers %s for coordinator %s", self.layers.describe(), ch.peer)

  def use_runner(self, runner) -> None:
    """Serves `runner`: its pool of max_sessions session states and the compute thread
    that batches them (`_prepare` calls it after the load; tests that drive `_work`
    directly call it themselves)."""
    self.runner = runner
    self.batcher = StageBatcher(runner, n_slots=self.opt.max_sessions,
                                name=f"worker {self.layers}")
    self.sessions.bind(self.batcher)

  def batch_stats(self) -> dict[str, Any]:
    """The session pool's batching counters (calls, decode rows, largest batch, ...)."""
    b = self.batcher
    return {} if b is None else dataclasses.asdict(b.stats)

  # ----------------------------------------------------------------------------- serving
  def _serve(self, ch: transport.Channel, hb: float) -> None:
    """Serves one connection (`connection.Connection`) until it ends."""
    owners = max(self.opt.max_sessions, 1) + 1  # + 1: a DROP/snapshot lane of an evictee
    conn = Connection(self, ch, max(3 * hb, 1.0) if hb > 0 else self.opt.dead_after,
                      min(hb, 1.0) if hb > 0 else 1.0, owners)
    self._ch = ch
    conn.serve()

  def _snapshot(self, f: protocol.Frame) -> tuple[dict[str, Any], bytes]:
    """Session snapshot save/load parts (in order with WORK, on the compute thread)."""
    if self._transfers is None:
      from ds4jax.bridge.worker.snapshots import SnapshotTransfers  # only snapshots need it
      self._transfers = SnapshotTransfers(self)
    return self._transfers.handle(f)

  def _work(self, f: protocol.Frame, t_recv: float) -> tuple[dict[str, Any], bytes]:
    """One WORK frame -> the RESULT header and payload (`work.run_work`)."""
    return run_work(self, f, t_recv)


_COORD_TLS = ("the coordinator uses TLS and this worker does not: give the worker --tls_ca "
              "(its certificate) or --tls")


def final_reason(e: BaseException) -> str | None:
  """The reason when a failed connection attempt cannot succeed by redialing (a key or
  certificate the coordinator rejects, or the reverse), else None (refused connection,
  coordinator restarting, a broken link: keep redialing with backoff)."""
  from ds4jax.wire import auth  # stdlib only
  if isinstance(e, ProtocolError) and protocol.TLS_PEER in str(e):
    return _COORD_TLS
  if isinstance(e, auth.AuthError):
    if e.reason in (auth.WRONG_KEY, auth.NO_AUTH, auth.VERSION_MISMATCH):
      return str(e)
    text = str(e).upper().replace(" ", "_")
    if e.reason == "TLS failed" and "CERTIFICATE_VERIFY_FAILED" in text:
      return str(e)
    if e.reason == "TLS failed" and "WRONG_VERSION_NUMBER" in text:
      # The answer to our ClientHello was plain text: no TLS on the other side.
      return ("the coordinator does not use TLS (it answered the TLS handshake in plain "
              "text): dial it without --tls/--tls_ca, or start it with --tls_cert/--tls_key")
    return None
  if isinstance(e, ProtocolError) and "expects a pre-shared key handshake" in str(e):
    return f"auth failed: {e}"  # we have no key, the coordinator wants one
  return None


__all__ = ["CAPABILITIES", "Worker", "WorkerOptions", "final_reason"]
