"""The worker: dial the coordinator (with backoff), say HELLO, serve a StageRunner.

Threads per connection: this one reads frames (answers PING at once, so a busy worker still
looks alive) and queues WORK/DROP in arrival order; one compute thread runs them. When the
coordinator goes away (EOF, error, or no frame for `dead_after`), the worker drops every
session and dials again: coordinator restarts need no worker restart.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
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
      try:
        sock = transport.secure_client(sock, key=self.opt.key, tls=self.opt.tls,
                                       server_hostname=self.opt.tls_server_name or self.addr[0],
                                       timeout=self.opt.connect_timeout)
        ch = transport.Channel(sock, f"{self.addr[0]}:{self.addr[1]}",
                               frame_timeout=self.opt.frame_timeout)
        hb = self._handshake(ch)
        delay = self.opt.backoff_min
        self._serve(ch, hb)
      except HandshakeRefused:
        raise
      except Exception as e:  # auth failures, lost links and the like
        reason = final_reason(e)
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
    f = ch.recv(idle_timeout=self.opt.connect_timeout + 5)
    ch.max_payload = cap
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

  def _prepare(self, ch: transport.Channel) -> None:
    """Loads the slice (once) and compiles its shapes, then says READY. Runs on the compute
    thread, so the reader keeps answering heartbeats meanwhile."""
    if self.runner is None:
      t0 = time.monotonic()
      self.runner = self._load()
      log.info("loaded layers %s in %.1fs", self.layers.describe(), time.monotonic() - t0)
    if self.opt.warmup:
      t0 = time.monotonic()
      warmup(self.runner, (1, self._chunk))
      log.info("compiled chunk shapes in %.1fs", time.monotonic() - t0)
    ch.send(MsgType.READY, {})
    log.info("serving layers %s for coordinator %s", self.layers.describe(), ch.peer)

  # ----------------------------------------------------------------------------- serving
  def _serve(self, ch: transport.Channel, hb: float) -> None:
    dead_after = max(3 * hb, 1.0) if hb > 0 else self.opt.dead_after
    self._ch = ch
    work: queue.Queue = queue.Queue()
    compute = threading.Thread(target=self._compute_loop, args=(ch, work), daemon=True,
                               name="ds4jax-worker-compute")
    compute.start()
    try:
      while not self._stop.is_set():
        try:
          f = ch.recv(idle_timeout=min(hb, 1.0) if hb > 0 else 1.0)
        except protocol.IdleTimeout:
          if ch.silent_for(time.monotonic()) > dead_after:
            raise LinkLost(f"no frame from the coordinator for {dead_after:.1f}s") from None
          continue
        if f.type == MsgType.PING:
          ch.send(MsgType.PONG, {"t": f.header.get("t", 0)})
        elif f.type in (MsgType.WORK, MsgType.DROP, MsgType.SNAPSHOT_SAVE,
                        MsgType.SNAPSHOT_LOAD):
          work.put((f, time.monotonic()))
        else:
          raise ProtocolError(f"unexpected {f.type.name} frame from the coordinator")
    finally:
      work.put(None)
      ch.close()
      compute.join(timeout=30)

  def _compute_loop(self, ch: transport.Channel, work: queue.Queue) -> None:
    try:
      self._prepare(ch)
    except LinkLost:
      return
    except Exception as e:  # a slice that cannot load: say why, drop the link, stop
      log.error("cannot serve layers %s: %s: %s", self.layers.describe(), type(e).__name__, e)
      self._fatal = e
      self._stop.set()
      ch.close()
      return
    while True:
      item = work.get()
      if item is None:
        return
      f, t_recv = item
      if f.type == MsgType.DROP:
        self.sessions.drop(str(f.header.get("sid", "")))
        continue
      req = f.header.get("req", -1)
      try:
        if f.type in (MsgType.SNAPSHOT_SAVE, MsgType.SNAPSHOT_LOAD):
          header, payload = self._snapshot(f)
        else:
          header, payload = self._work(f, t_recv)
        ch.send(MsgType.RESULT, header, payload)
      except LinkLost:
        return
      except Exception as e:
        tb = "" if isinstance(e, (PrefixMismatch, ProtocolError)) else traceback.format_exc()
        if not isinstance(e, PrefixMismatch):
          log.warning("work %s failed: %s: %s", req, type(e).__name__, e)
        try:
          ch.send(MsgType.ERROR, {"req": req, "etype": type(e).__name__,
                                  "message": str(e), "traceback": tb})
        except LinkLost:
          return

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
    if int(tokens.max(initial=0)) >= self.vocab_size:
      raise ProtocolError(f"token id {int(tokens.max())} >= vocab {self.vocab_size}")
    if protocol.fnv1a64(tokens.tolist(), hb_) != ha:
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
    self.sessions.commit(s, tokens.tolist(), state)
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


def final_reason(e: BaseException) -> str | None:
  """The reason when a failed connection attempt cannot succeed by redialing (a key or
  certificate the coordinator rejects, or the reverse), else None (refused connection,
  coordinator restarting, a broken link: keep redialing with backoff)."""
  from ds4jax.bridge import auth  # stdlib only
  if isinstance(e, auth.AuthError):
    if e.reason in (auth.WRONG_KEY, auth.NO_AUTH, auth.VERSION_MISMATCH):
      return str(e)
    if e.reason == "TLS failed" and "CERTIFICATE_VERIFY_FAILED" in str(e).upper().replace(
        " ", "_"):
      return str(e)
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


def sample_result(logits_V: np.ndarray, h: dict[str, Any]) -> dict[str, Any]:
  """Samples the head stage's last logits row with the coordinator's parameters."""
  from ds4jax.generate import sampling  # numpy only; imported lazily to keep bridge light
  try:
    params = sampling.SamplingParams.from_dict(field(h, "s", dict, default={}))
  except (TypeError, ValueError) as e:  # wrong types from the wire, not a compute error
    raise ProtocolError(f"bad sampling parameters: {e}") from None
  step = field(h, "st", int, default=0, lo=0)
  k = field(h, "k", int, default=0, lo=0, hi=64)
  # "kind" is omitted for a token (its default): a decode reply's common case.
  res: dict[str, Any] = {"token": sampling.sample_token(logits_V, params, step)}
  if k:
    res["logprobs"] = [[i, lp] for i, lp in sampling.top_logprobs(logits_V, k)]
  return res
