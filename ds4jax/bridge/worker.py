"""The worker: dial the coordinator (with backoff), say HELLO, serve a StageRunner.

Threads per connection: two, trading roles (`_serve`): one reads frames (answers PING at
once, so a busy worker still looks alive); WORK that finds the worker idle runs on the
thread that read it while the other takes over reading; WORK that finds it busy queues, in
arrival order. When the
coordinator goes away (EOF, error, or no frame for `dead_after`), the worker drops every
session and dials again: coordinator restarts need no worker restart.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import random
import socket
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

from ds4jax.bridge import protocol, tensors, transport
from ds4jax.bridge.errors import (HandshakeRefused, LinkLost, PrefixMismatch, ProtocolError)
from ds4jax.bridge.protocol import MsgType, field
from ds4jax.bridge.sessions import SessionStore
from ds4jax.config import LayerRange

log = logging.getLogger("ds4jax.bridge.worker")
CAPABILITIES = ("sample", "logits", "rewind", "ack_only", "telemetry")
# Frames that run in arrival order on the computing thread.
_QUEUED = (MsgType.WORK, MsgType.DROP, MsgType.SNAPSHOT_SAVE, MsgType.SNAPSHOT_LOAD)
# The waiting thread checks this often whether a compute left the reader role free: a decode
# token does not wake it (a wake-up on the hot path costs more than the token's bookkeeping),
# so a long one is covered within this time (far below the 1 s minimum liveness deadline).
_TAKEOVER_S = 0.1


class _Conn:
  """The two serving threads' shared state for one connection (guarded by `cv`).

  Invariant: `queue` is non-empty only while `busy` (a thread computes); so a WORK read
  while not busy may run at once on the reading thread.
  """

  def __init__(self, ch: transport.Channel, dead_after: float, idle: float):
    self.ch = ch
    self.dead_after = dead_after
    self.idle = idle
    self.cv = threading.Condition()
    self.queue: collections.deque = collections.deque()
    self.busy = True  # the helper loads and compiles first
    self.reader_free = True
    self.done = False
    self.error: BaseException | None = None

  def end(self, err: BaseException | None) -> None:
    with self.cv:
      if not self.done:
        self.done, self.error = True, err
      self.cv.notify_all()
    if err is not None:
      self.ch.close()  # wakes a thread blocked reading


@dataclasses.dataclass
class WorkerOptions:
  ctx: int = 4096
  max_sessions: int = 8
  key: bytes | None = None
  tls: Any = None  # ssl.SSLContext (auth.client_ssl_context)
  tls_server_name: str | None = None  # checked against the certificate; default: the host
  wrap: Callable | None = None
  connect_timeout: float = 5.0
  backoff_min: float = 0.2
  backoff_max: float = 5.0
  frame_timeout: float = 30.0
  # Used until ACCEPT tells the coordinator's heartbeat; dead after this long without a frame.
  dead_after: float = 10.0
  protocol_version: int = protocol.PROTOCOL_VERSION  # tests speak other versions
  # Compile the decode and prefill-chunk shapes before READY, so first requests do not pay
  # for compilation against their deadlines.
  warmup: bool = True


class Worker:
  """Serves `layers` of one model for one coordinator at a time.

  Args:
    coordinator: (host, port) to dial.
    fingerprint, n_layers, vocab_size: the model this worker holds (sent in HELLO).
    layers: the requested range as given by the user (validated by the coordinator).
    load: returns the StageRunner; called once, after the first ACCEPT.
  """

  def __init__(self, coordinator: tuple[str, int], *, fingerprint: str, n_layers: int,
               vocab_size: int, layers: LayerRange, load: Callable[[], Any],
               options: WorkerOptions | None = None):
    self.addr = coordinator
    self.fingerprint = fingerprint
    self.n_layers = n_layers
    self.vocab_size = vocab_size
    self.layers = layers
    self._load = load
    self.opt = options or WorkerOptions()
    self.runner = None
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
    or the key/certificate check fails (final: redialing cannot fix it; see final_reason)."""
    delay = self.opt.backoff_min
    while not self._stop.is_set():
      try:
        sock = transport.connect(*self.addr, timeout=self.opt.connect_timeout, wrap=self.opt.wrap)
      except OSError as e:
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
  def warm_sizes(self) -> tuple[int, ...]:
    """The chunk sizes the warm-up runs (known once ACCEPT named the prefill chunk)."""
    return (1, self._chunk) if self.opt.warmup else ()

  def _prepare(self, ch: transport.Channel) -> None:
    """Loads the slice (once) and compiles its shapes, then says READY. Runs on the compute
    thread, so the reader keeps answering heartbeats meanwhile."""
    if self.runner is None:
      t0 = time.monotonic()
      self.runner = self._load()
      log.info("loaded layers %s in %.1fs", self.layers.describe(), time.monotonic() - t0)
    if self.opt.warmup:
      t0 = time.monotonic()
      warmup(self.runner, self.warm_sizes)
      log.info("compiled chunk shapes in %.1fs", time.monotonic() - t0)
    ch.send(MsgType.READY, {})
    log.info("serving layers %s for coordinator %s", self.layers.describe(), ch.peer)

  # ----------------------------------------------------------------------------- serving
  def _serve(self, ch: transport.Channel, hb: float) -> None:
    """Serves one connection with two threads (this one and a helper) that trade roles.

    Exactly one thread reads frames at a time (it answers PING at once, so a busy worker
    still looks alive); at most one computes. A WORK that arrives while nothing computes
    runs on the thread that read it, with no hand-off (the decode hot path), and the other
    thread takes over reading meanwhile (woken at once for a prefill chunk, or by itself
    within _TAKEOVER_S while a decode token computes); frames that arrive during a compute
    queue up and run in arrival order.
    """
    conn = _Conn(ch, max(3 * hb, 1.0) if hb > 0 else self.opt.dead_after,
                 min(hb, 1.0) if hb > 0 else 1.0)
    self._ch = ch
    helper = threading.Thread(target=self._helper, args=(conn,), daemon=True,
                              name="ds4jax-worker-compute")
    helper.start()
    try:
      self._roles(conn)
    finally:
      conn.end(None)
      ch.close()
      helper.join(timeout=30)
    if conn.error is not None:
      raise conn.error

  def _helper(self, conn: "_Conn") -> None:
    """Loads and compiles (the reader answers heartbeats meanwhile), then trades roles."""
    try:
      self._prepare(conn.ch)
    except LinkLost:
      conn.end(None)
      return
    except Exception as e:  # a slice that cannot load: say why, drop the link, stop
      log.error("cannot serve layers %s: %s: %s", self.layers.describe(), type(e).__name__, e)
      self._fatal = e
      self._stop.set()
      conn.end(None)
      conn.ch.close()
      return
    try:
      self._roles(conn, computing=True)
    except BaseException as e:  # never leave the connection without a thread
      conn.end(e)

  def _roles(self, conn: "_Conn", computing: bool = False) -> None:
    """One thread's life on a connection: compute queued work, else read, else wait."""
    while True:
      with conn.cv:
        if conn.done:
          return
        if computing:  # just finished an item (or the warm-up)
          computing = bool(conn.queue)
          conn.busy = computing
        while not computing:
          if conn.done:
            return
          if conn.reader_free:
            conn.reader_free = False
            break
          conn.cv.wait(_TAKEOVER_S)
        item = conn.queue.popleft() if computing else None
      if item is None:
        item = self._read(conn)  # returns with the reader role handed over, or None
        if item is None:
          return
      if not self._process(conn.ch, *item):
        conn.end(None)
        return
      computing = True

  def _read(self, conn: "_Conn"):
    """Reads frames until one must run on this thread (returned, reader role released)."""
    ch = conn.ch
    try:
      while not self._stop.is_set() and not conn.done:
        try:
          f = ch.recv(idle_timeout=conn.idle)
        except protocol.IdleTimeout:
          if ch.silent_for(time.monotonic()) > conn.dead_after:
            raise LinkLost(f"no frame from the coordinator for {conn.dead_after:.1f}s") from None
          continue
        if f.type == MsgType.PING:
          ch.send(MsgType.PONG, {"t": f.header.get("t", 0)})
        elif f.type in _QUEUED:
          item = (f, time.monotonic())
          with conn.cv:
            if conn.busy:
              conn.queue.append(item)
              continue
            conn.busy, conn.reader_free = True, True
            if not (f.type == MsgType.DROP or f.type == MsgType.WORK and f.header.get("n") == 1):
              conn.cv.notify()  # a chunk or snapshot part: the other thread reads meanwhile
          return item
        else:
          raise ProtocolError(f"unexpected {f.type.name} frame from the coordinator")
    except BaseException as e:
      conn.end(e)
      return None
    conn.end(None)
    return None

  def _process(self, ch: transport.Channel, f: protocol.Frame, t_recv: float) -> bool:
    """Runs one queued frame and sends its reply; False once the link is lost."""
    if f.type == MsgType.DROP:
      self.sessions.drop(str(f.header.get("sid", "")))
      return True
    req = f.header.get("req", -1)
    try:
      if f.type in (MsgType.SNAPSHOT_SAVE, MsgType.SNAPSHOT_LOAD):
        header, payload = self._snapshot(f)
      else:
        header, payload = self._work(f, t_recv)
      ch.send(MsgType.RESULT, header, payload)
    except LinkLost:
      return False
    except Exception as e:
      tb = "" if isinstance(e, (PrefixMismatch, ProtocolError)) else traceback.format_exc()
      if not isinstance(e, PrefixMismatch):
        log.warning("work %s failed: %s: %s", req, type(e).__name__, e)
      try:
        ch.send(MsgType.ERROR, {"req": req, "etype": type(e).__name__,
                                "message": str(e), "traceback": tb})
      except LinkLost:
        return False
    return True

  def _snapshot(self, f: protocol.Frame) -> tuple[dict[str, Any], bytes]:
    """Session snapshot save/load parts (in order with WORK, on the compute thread)."""
    from ds4jax.checkpoints import snapshot_bridge  # deferred: only snapshots need it
    return snapshot_bridge.handle_worker_frame(self, f)

  def _work(self, f: protocol.Frame, t_recv: float) -> tuple[dict[str, Any], bytes]:
    t0 = time.monotonic()
    h = f.header
    req = field(h, "req", int, lo=0)
    sid = field(h, "sid", str)
    if not 0 < len(sid) <= 64:
      raise ProtocolError("session id must be 1..64 characters")
    pos0 = field(h, "p", int, lo=0)
    n = field(h, "n", int, lo=1, hi=self.opt.ctx)
    if pos0 + n > self.opt.ctx:
      raise ProtocolError(f"positions {pos0}..{pos0 + n} exceed this worker's ctx {self.opt.ctx}")
    want = field(h, "w", str, default="out")
    if want not in ("ack", "out"):
      raise ProtocolError(f"unknown want {want!r}")
    layers = field(h, "L", str)
    if layers != str(self.layers):
      raise ProtocolError(f"this worker serves {self.layers} but work asks for {layers}")
    hb_ = protocol.parse_hash(h.get("hb"), "hb")
    ha = protocol.parse_hash(h.get("ha"), "ha")
    tokens = protocol.tokens_from_bytes(f.payload, n)
    toks = tokens.tolist()
    if not 0 <= min(toks) <= max(toks) < self.vocab_size:  # ids >= 2**31 read as negative
      bad = max(toks) if max(toks) >= self.vocab_size else min(toks) & 0xFFFFFFFF
      raise ProtocolError(f"token id {bad} is outside the vocab [0, {self.vocab_size})")
    hashes = protocol.fnv1a64_steps(toks, hb_)  # kept for the session: hashed once
    if hashes[-1] != ha:
      raise ProtocolError("work token prefix hash metadata mismatch")
    x = None
    if not self.layers.embeds:
      # WORK names only the wire dtype; the shape is this stage's input shape for n tokens
      # (check_desc checks the dtype, decode the payload length).
      desc = {"dtype": field(h, "x", str),
              "shape": [n, self.runner.cfg.n_hc, self.runner.cfg.d_model]}
      tensors.check_desc(desc)
      x = tensors.decode(desc, memoryview(f.payload)[4 * n:])
    elif len(f.payload) != 4 * n:
      raise ProtocolError("an embedding stage takes token ids only")
    # The prefix check (and any rewind) happens before computing.
    s, evicted = self.sessions.prepare(sid, pos0, hb_, self.runner)
    for old in evicted:
      log.info("evicted session %s (limit %d)", old, self.sessions.limit)
    t1 = time.monotonic()
    try:
      out, state = self.runner.forward(s.state, tokens, x, pos0)
      out = np.asarray(out, np.float32)
    except Exception:
      self.sessions.drop(sid)  # the state may be half-updated
      raise
    self.sessions.commit(s, toks, state, hashes)
    t2 = time.monotonic()
    res: dict[str, Any] = {"req": req, "sid": sid, "ha": protocol.hash_hex(ha)}
    payload = b""
    if want == "ack":
      res["kind"] = "ack"
    elif self.layers.has_output:
      res.update(sample_result(out[-1], h))
      if field(h, "rl", bool, default=False):
        res["logits"], payload = tensors.encode(out[-1], "f32")
    else:
      res["kind"] = "hidden"
      res["x"], payload = tensors.encode(out, field(h, "od", str, default="f32"))
    # [compute_us, queue_us]: the coordinator knows the hop, bytes and positions already.
    res["t"] = [round((t2 - t1) * 1e6), max(0, round((t0 - t_recv) * 1e6))]
    return res, payload


_COORD_TLS = ("the coordinator uses TLS and this worker does not: give the worker --tls_ca "
              "(its certificate) or --tls")


def final_reason(e: BaseException) -> str | None:
  """The reason when a failed connection attempt cannot succeed by redialing (a key or
  certificate the coordinator rejects, or the reverse), else None (refused connection,
  coordinator restarting, a broken link: keep redialing with backoff)."""
  from ds4jax.bridge import auth  # stdlib only
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


def warmup(runner, sizes) -> None:
  """Runs each chunk size once on a scratch state (compiles its shapes; state discarded)."""
  for t in sorted(set(min(int(s), runner.ctx_size) for s in sizes if s)):
    hc = None
    if not runner.layers.embeds:
      hc = np.zeros((t, runner.cfg.n_hc, runner.cfg.d_model), np.float32)
    runner.forward(runner.init_state(), np.zeros((t,), np.int32), hc, 0)


@functools.cache
def _greedy():
  from ds4jax.generate import sampling
  return sampling.SamplingParams()


def sample_result(logits_V: np.ndarray, h: dict[str, Any]) -> dict[str, Any]:
  """Samples the head stage's last logits row with the coordinator's parameters."""
  from ds4jax.generate import sampling  # numpy only; imported lazily to keep bridge light
  s = field(h, "s", dict, default=None)
  try:  # absent: greedy, the default parameters (built once)
    params = _greedy() if s is None else sampling.SamplingParams.from_dict(s)
  except (TypeError, ValueError) as e:  # wrong types from the wire, not a compute error
    raise ProtocolError(f"bad sampling parameters: {e}") from None
  step = field(h, "st", int, default=0, lo=0)
  k = field(h, "k", int, default=0, lo=0, hi=64)
  # "kind" is omitted for a token (its default): a decode reply's common case.
  res: dict[str, Any] = {"token": sampling.sample_token(logits_V, params, step)}
  if k:
    res["logprobs"] = [[i, lp] for i, lp in sampling.top_logprobs(logits_V, k)]
  return res
