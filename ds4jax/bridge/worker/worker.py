"""The worker: dial the coordinator (with backoff), say HELLO, serve a StageRunner.

Every session's state is a slot of one `runtime.batching.StageBatcher` pool, whose compute
thread runs the one-token WORK of all sessions that are pending together as ONE
`forward_batch` call (docs/design.md §11). Frames stay per session on the wire; a worker
batches what is queued (docs/protocol.md §3).

Threads per connection (`_serve`): a few serving threads that trade roles. At any time one
reads frames (it answers PING at once, so a busy worker still looks alive); each session's
frames form a *lane*, run in arrival order by one thread at a time (the coordinator
pipelines several prefill chunks of a session), and lanes of different sessions run on
different threads at once, each blocking in `batcher.run`, which is how their rows meet in
one batch. A frame whose lane is idle runs on the thread that read it; another takes over
reading. When the coordinator goes away (EOF, error, or no frame for `dead_after`), the
worker drops every session and dials again: coordinator restarts need no worker restart.
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

from ds4jax.wire import protocol, tensors, transport
from ds4jax.wire.errors import (HandshakeRefused, LinkLost, PrefixMismatch, ProtocolError)
from ds4jax.wire.protocol import MsgType, field
from ds4jax.bridge.worker.sessions import SessionStore
from ds4jax.config import LayerRange
from ds4jax.runtime.batching import StageBatcher, StateLost

log = logging.getLogger("ds4jax.bridge.worker")
CAPABILITIES = ("sample", "logits", "rewind", "ack_only", "telemetry", "batch")
# Frames that run in arrival order per session (its lane) on the serving threads.
_QUEUED = (MsgType.WORK, MsgType.DROP, MsgType.SNAPSHOT_SAVE, MsgType.SNAPSHOT_LOAD)
# An idle serving thread checks this often whether the reader role is free. With a single
# resident session a decode token does not wake it (a wake-up on the hot path costs more
# than the token's bookkeeping, and no other session's frame can be waiting), so a long
# compute is covered within this time (far below the 1 s minimum liveness deadline).
_TAKEOVER_S = 0.1
_JOIN_S = 30.0  # how long a closing connection waits for its serving threads


class _Lane:
  """One session's queued frames, in arrival order; at most one thread runs them."""

  __slots__ = ("queue", "owned", "listed", "computing")

  def __init__(self):
    self.queue: collections.deque = collections.deque()  # (frame, t_recv)
    self.owned = False  # a thread runs this lane
    self.listed = False  # waiting in _Conn.ready for a thread
    self.computing = False  # a frame was taken and its reply is not yet built


class _Conn:
  """The serving threads' shared state for one connection (guarded by `cv`)."""

  def __init__(self, ch: transport.Channel, dead_after: float, poll: float, max_owners: int):
    self.ch = ch
    self.dead_after = dead_after
    self.poll = poll
    self.cv = threading.Condition()
    self.lanes: dict[str, _Lane] = {}
    self.ready: collections.deque[str] = collections.deque()  # lanes waiting for a thread
    self.owners = 0  # threads running a lane
    self.max_owners = max_owners
    self.idle = 0  # threads waiting for a role
    self.threads: list[threading.Thread] = []
    self.serving = False  # the stage is loaded and compiled (READY sent)
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
  # Decode batch sizes compiled by the warm-up (others compile on first use; buckets are
  # powers of two up to the runner's max_batch).
  warm_batches: tuple[int, ...] = (1,)


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
    try:
      self._dial_loop()
    finally:
      b, self.batcher = self.batcher, None
      if b is not None:
        self.sessions.clear()
        b.close()

  def _dial_loop(self) -> None:
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
    """Loads the slice and builds its session pool (once), compiles its shapes, then says
    READY. Runs on a serving thread, so the reader keeps answering heartbeats meanwhile."""
    if self.runner is None:
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
    """Serves one connection with serving threads that trade roles (module docstring).

    Exactly one thread reads frames at a time (it answers PING at once, so a busy worker
    still looks alive). A frame whose session has nothing queued runs on the thread that
    read it, with no hand-off (the decode hot path), and another thread takes over reading:
    woken at once when other sessions may send meanwhile (or for a prefill chunk), else by
    itself within _TAKEOVER_S. Frames of a session that is computing queue in its lane.
    Threads are started as lanes need them, at most max_sessions + 1.
    """
    owners = max(self.opt.max_sessions, 1) + 1  # + 1: a DROP/snapshot lane of an evictee
    conn = _Conn(ch, max(3 * hb, 1.0) if hb > 0 else self.opt.dead_after,
                 min(hb, 1.0) if hb > 0 else 1.0, owners)
    self._ch = ch
    self._spawn(conn, self._helper)
    try:
      self._roles(conn)
    finally:
      conn.end(None)
      ch.close()
      deadline = time.monotonic() + _JOIN_S
      with conn.cv:
        threads = list(conn.threads)
      for t in threads:
        t.join(timeout=max(deadline - time.monotonic(), 0.0))
    if conn.error is not None:
      raise conn.error

  def _spawn(self, conn: _Conn, target) -> None:
    t = threading.Thread(target=target, args=(conn,), daemon=True, name="ds4jax-worker-serve")
    with conn.cv:
      conn.threads.append(t)
    t.start()

  def _helper(self, conn: _Conn) -> None:
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
    with conn.cv:
      conn.serving = True
      conn.cv.notify_all()
    self._thread(conn)

  def _thread(self, conn: _Conn) -> None:
    try:
      self._roles(conn)
    except BaseException as e:  # never leave the connection without a thread
      conn.end(e)

  def _roles(self, conn: _Conn) -> None:
    """One thread's life on a connection: run a waiting lane, else read, else wait."""
    sid = None
    while True:
      if sid is not None and not self._run_lane(conn, sid):
        conn.end(None)
        return
      sid = None
      with conn.cv:
        while True:
          if conn.done:
            return
          if conn.serving and conn.ready and conn.owners < conn.max_owners:
            sid = conn.ready.popleft()
            lane = conn.lanes[sid]
            lane.listed, lane.owned = False, True
            conn.owners += 1
            break
          if conn.reader_free:
            conn.reader_free = False
            break
          conn.idle += 1
          conn.cv.wait(_TAKEOVER_S)
          conn.idle -= 1
      if sid is None:
        sid = self._read(conn)  # returns with a lane to run and the reader role handed over
        if sid is None:
          return

  def _run_lane(self, conn: _Conn, sid: str) -> bool:
    """Runs sid's queued frames in order until none is left; False once the link is lost."""
    while True:
      with conn.cv:
        lane = conn.lanes[sid]
        if conn.done or not lane.queue:
          lane.owned = False
          conn.owners -= 1
          if not lane.queue:
            del conn.lanes[sid]
          if conn.ready:
            conn.cv.notify()  # a lane waited for a thread
          return True
        f, t_recv = lane.queue.popleft()
        lane.computing = True
      if not self._process(conn, lane, f, t_recv):
        return False

  def _read(self, conn: _Conn) -> str | None:
    """Reads frames until one must run on this thread: returns its session id with this
    thread owning its lane and the reader role released (None: the connection ended)."""
    ch = conn.ch
    try:
      while not self._stop.is_set() and not conn.done:
        try:
          f = ch.recv(idle_timeout=conn.poll)
        except protocol.IdleTimeout:
          if ch.silent_for(time.monotonic()) > conn.dead_after:
            raise LinkLost(f"no frame from the coordinator for {conn.dead_after:.1f}s") from None
          continue
        if f.type == MsgType.PING:
          ch.send(MsgType.PONG, {"t": f.header.get("t", 0), "b": _pong_stats(self.batcher)})
        elif f.type in _QUEUED:
          sid = f.header.get("sid")
          sid = sid if isinstance(sid, str) else ""  # _process refuses it in its lane
          spawn = False
          with conn.cv:
            lane = conn.lanes.get(sid)
            if f.type == MsgType.DROP and (lane is None or not (lane.queue or lane.computing)):
              lane = None  # nothing of sid runs or waits: drop it here, now
            else:
              if lane is None:
                lane = conn.lanes[sid] = _Lane()
              lane.queue.append((f, time.monotonic()))
              if lane.owned or lane.listed:
                continue  # its owner (or the next free thread) runs it in order
              if not conn.serving or conn.owners >= conn.max_owners:
                lane.listed = True
                conn.ready.append(sid)
                continue
              lane.owned, conn.reader_free = True, True
              conn.owners += 1
              # Wake a reader unless this is a lone session's decode token (nobody else can
              # be waiting to send; an idle thread takes over by itself if it runs long).
              if (f.type != MsgType.WORK or f.header.get("n") != 1
                  or len(self.sessions) > 1 or conn.owners > 1):
                if conn.idle:
                  conn.cv.notify()
                else:
                  spawn = len(conn.threads) < conn.max_owners  # + this thread
          if lane is None:
            self.sessions.drop(sid)
            continue
          if spawn:
            self._spawn(conn, self._thread)
          return sid
        else:
          raise ProtocolError(f"unexpected {f.type.name} frame from the coordinator")
    except BaseException as e:
      conn.end(e)
      return None
    conn.end(None)
    return None

  def _process(self, conn: _Conn, lane: _Lane, f: protocol.Frame, t_recv: float) -> bool:
    """Runs one frame of a lane and sends its reply; False once the link is lost."""
    ch = conn.ch

    def computed():  # the session's state is settled: a DROP may now run on the reader
      with conn.cv:
        lane.computing = False

    if f.type == MsgType.DROP:
      self.sessions.drop(str(f.header.get("sid", "")))
      computed()
      return True
    req = f.header.get("req", -1)
    try:
      try:
        if f.type in (MsgType.SNAPSHOT_SAVE, MsgType.SNAPSHOT_LOAD):
          header, payload = self._snapshot(f)
        else:
          header, payload = self._work(f, t_recv)
      finally:
        computed()
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

  def _compute(self, slot: int, tokens_T: np.ndarray, x_TCD, pos0: int) -> np.ndarray:
    """tokens [T] (+ activations [T, C, D]) through the batcher, in pieces of at most the
    runner's max_chunk; -> float32 [T, V] logits (head) or [T, C, D]."""
    step = self.runner.max_chunk
    outs = [self.batcher.run(slot, tokens_T[a:a + step], None if x_TCD is None
                             else x_TCD[a:a + step], pos0 + a)
            for a in range(0, tokens_T.shape[0], step)]
    return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)

  def _snapshot(self, f: protocol.Frame) -> tuple[dict[str, Any], bytes]:
    """Session snapshot save/load parts (in order with WORK, on the compute thread)."""
    if self._transfers is None:
      from ds4jax.bridge.worker.snapshots import SnapshotTransfers  # only snapshots need it
      self._transfers = SnapshotTransfers(self)
    return self._transfers.handle(f)

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
    s, evicted = self.sessions.prepare(sid, pos0, hb_)
    for old in evicted:
      log.info("evicted session %s (limit %d)", old, self.sessions.limit)
    t1 = time.monotonic()
    try:
      out = self._compute(s.slot, tokens, x, pos0)
    except StateLost as e:  # the pool was rebuilt after another call failed
      self.sessions.drop(sid)
      raise PrefixMismatch(f"session {sid} lost its state on this worker ({e})") from None
    except BaseException:
      self.sessions.drop(sid)  # the state may be half-updated
      raise
    self.sessions.commit(s, toks, hashes)
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


def warmup_batched(runner, batch_sizes, chunk_sizes, n_slots: int) -> None:
  """Compiles `forward_batch` for these decode batch sizes x chunk sizes on a pool of
  `n_slots` (what a StageBatcher of that many slots runs); a runner without `compile_batch`
  (test fakes) compiles nothing."""
  compile_batch = getattr(runner, "compile_batch", None)
  sizes = sorted(set(min(int(s), runner.ctx_size) for s in chunk_sizes if s))
  if compile_batch is not None and sizes:
    compile_batch(tuple(batch_sizes) or (1,), sizes, n_slots=n_slots)


def _pong_stats(batcher) -> list[int]:
  """[forward_batch calls, decode calls, decode rows, largest decode batch] for PONG."""
  if batcher is None:
    return [0, 0, 0, 0]
  st = batcher.stats
  return [st.calls, st.decode_calls, st.decode_rows, st.max_batch_seen]


@functools.cache
def _greedy():
  from ds4jax.runtime import sampling
  return sampling.SamplingParams()


def sample_result(logits_V: np.ndarray, h: dict[str, Any]) -> dict[str, Any]:
  """Samples the head stage's last logits row with the coordinator's parameters."""
  from ds4jax.runtime import sampling  # numpy only; imported lazily to keep bridge light
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
