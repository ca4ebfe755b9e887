r"""Peak host memory of a split against one process on a Flash-dims GGUF (issue 12, item 5).

    python scripts/make_tiny_gguf.py --preset=flash --n_layers=4 --out=/tmp/flash4.gguf
    python scripts/bench_flash_memory.py --gguf=/tmp/flash4.gguf --split=1

Runs, one after the other: (a) `scripts/generate.py` with the whole file in one process, and
(b) a coordinator `generate.py --layers=0:K --listen=...` with `scripts/worker.py
--layers=K+1:output`. Each generates --max_new_tokens greedy tokens after the same fixed
prompt. A thread samples the RSS of each process tree (the process and its children, from
/proc) every --sample_s seconds. Prints per process: its slice, the GGUF bytes of the slice,
the peak RSS, the budget (--ratio x slice + --allowance_gb) and PASS/FAIL, the load time, and
the tokens (which must match). Exits 1 if the tokens differ or a peak is over its budget.

Each sample also reads RssAnon (anonymous memory: the weights, the state, XLA's buffers and
the heaps, not the file pages of the GGUF or the libraries) and VmHWM (the kernel's own
peak RSS, so the last sample before exit holds the true peak) of every process in the tree.

`--bound=state` (issue 21 item 3) judges each process against its slice's GGUF bytes plus its
decode state (`partition.memory.state_layer_bytes` at the run's ctx and chunk, times the
pool's max_sessions + 1 slots, as the process allocates it) plus --allowance_gb, on peak
RssAnon and on peak RSS, instead of --ratio x slice + allowance on RSS:

    python scripts/make_tiny_gguf.py --preset=flash --n_layers=12 --n_experts=16 \
        --out=/tmp/flash12x16.gguf
    python scripts/bench_flash_memory.py --gguf=/tmp/flash12x16.gguf --only=single \
        --bound=state --ctx_size=4096 --prompt_len=300 --max_new_tokens=4
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

from ds4jax.local_cluster import (LocalWorkers, free_port, log_tail, signal_group, spawn, stop_all,
                                  tree_rss_bytes)
from ds4jax.errors import one_line

REPO = pathlib.Path(__file__).resolve().parent.parent
GEN = REPO / "scripts" / "generate.py"
GB = 1e9

_GGUF = flags.DEFINE_string("gguf", "/tmp/flash4.gguf", "A ds4 GGUF (e.g. the Flash fixture).")
_SPLIT = flags.DEFINE_integer("split", 1, "The coordinator runs layers 0:SPLIT, the worker "
                              "SPLIT+1:output.", lower_bound=0)
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 24, "Fixed prompt length.", lower_bound=1)
_NEW = flags.DEFINE_integer("max_new_tokens", 6, "Greedy tokens to generate.", lower_bound=1)
_CTX = flags.DEFINE_integer("ctx_size", 64, "KV capacity per session.", lower_bound=1)
_RATIO = flags.DEFINE_float("ratio", 1.25, "Budget: RATIO x slice bytes + ALLOWANCE.")
_ALLOW = flags.DEFINE_float("allowance_gb", 1.5, "Budget: RATIO x slice bytes + ALLOWANCE.")
_SAMPLE = flags.DEFINE_float("sample_s", 0.1, "RSS sampling period.", lower_bound=0.01)
_TIMEOUT = flags.DEFINE_float("timeout_s", 900.0, "Give up on a run after this long.")
_ONLY = flags.DEFINE_enum("only", "both", ["both", "single", "split"], "Which runs to do.")
_LOGS = flags.DEFINE_string("logs", None, "Keep the processes' logs here (default: temp).")
_OUT_JSON = flags.DEFINE_string("out_json", None, "Write the results here (JSON).")
_EXTRA = flags.DEFINE_list("extra_args", [], "More flags for every generate.py/worker.py.")
_BOUND = flags.DEFINE_enum("bound", "ratio", ["ratio", "state"], "ratio: peak RSS <= RATIO x "
                           "slice + ALLOWANCE. state: peak RssAnon and peak RSS <= slice + "
                           "decode state + ALLOWANCE.")
_SESSIONS = flags.DEFINE_integer("max_sessions", None, "Every process's --max_sessions (the "
                                 "pool holds this many slots plus a scratch slot; default: "
                                 "theirs, generate.py 1, worker.py 8).", lower_bound=1)
_CHUNK = flags.DEFINE_integer("prefill_chunk", None, "Every process's --prefill_chunk (default: "
                              "theirs, 256).", lower_bound=1)
DEFAULT_SESSIONS = {"single": 1, "coordinator": 1, "worker": 8}  # generate.py's, worker.py's
DEFAULT_CHUNK = 256


def _shape_args() -> list[str]:
  out = [] if _SESSIONS.value is None else [f"--max_sessions={_SESSIONS.value}"]
  return out + ([] if _CHUNK.value is None else [f"--prefill_chunk={_CHUNK.value}"])

_LOADED = re.compile(r"(?:loaded layers \S+ (?:of \S+ )?in|layers \S+ loaded in) ([0-9.]+)s")


# ------------------------------------------------------------------------------- sampling
def _status_bytes(pid: int, keys=("VmRSS", "RssAnon", "VmHWM")) -> dict[str, int]:
  """Fields of /proc/PID/status in bytes (absent ones 0: the process is gone)."""
  out = dict.fromkeys(keys, 0)
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        key, _, rest = line.partition(":")
        if key in out:
          out[key] = 1024 * int(rest.split()[0])
  except (OSError, ValueError, IndexError):
    pass
  return out


def tree_status_bytes(pid: int) -> dict[str, int]:
  """VmRSS, RssAnon and VmHWM summed over `pid` and its descendants."""
  import psutil
  try:
    pids = [pid] + [k.pid for k in psutil.Process(pid).children(recursive=True)]
  except (psutil.Error, OSError):
    pids = [pid]
  tot = dict.fromkeys(("VmRSS", "RssAnon", "VmHWM"), 0)
  for p in pids:
    for k, v in _status_bytes(p).items():
      tot[k] += v
  return tot


class Sampler:
  """Samples the tree RSS of named processes every `period` s: peaks and the whole series;
  also peak RssAnon and the largest VmHWM seen."""

  def __init__(self, period: float):
    self.period = period
    self.pids: dict[str, int] = {}
    self.peak: dict[str, int] = {}
    self.peak_t: dict[str, float] = {}
    self.peak_anon: dict[str, int] = {}
    self.peak_anon_t: dict[str, float] = {}
    self.hwm: dict[str, int] = {}
    self.series: dict[str, list[tuple[float, int]]] = {}  # (s since start, bytes)
    self.anon: dict[str, list[tuple[float, int]]] = {}  # (s since start, RssAnon bytes)
    self.t0 = time.monotonic()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

  def watch(self, name: str, pid: int) -> None:
    self.pids[name] = pid
    for d in (self.peak, self.peak_anon, self.hwm):
      d.setdefault(name, 0)
    self.series.setdefault(name, [])
    self.anon.setdefault(name, [])

  def _run(self) -> None:
    while not self._stop.wait(self.period):
      now = time.monotonic() - self.t0
      for name, pid in list(self.pids.items()):
        st = tree_status_bytes(pid)
        rss, anon = st["VmRSS"], st["RssAnon"]
        if not rss:
          continue  # gone
        self.series[name].append((round(now, 2), rss))
        self.anon[name].append((round(now, 2), anon))
        self.hwm[name] = max(self.hwm[name], st["VmHWM"])
        if rss > self.peak[name]:
          self.peak[name], self.peak_t[name] = rss, now
        if anon > self.peak_anon[name]:
          self.peak_anon[name], self.peak_anon_t[name] = anon, now

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


# ------------------------------------------------------------------------------- processes
_PROCS: list[subprocess.Popen] = []


def _spawn(args: list[str], log: pathlib.Path) -> subprocess.Popen:
  p = spawn(args, log)
  _PROCS.append(p)
  return p


def _kill_all() -> None:
  stop_all()
  for p in _PROCS:
    if p.poll() is None:
      signal_group(p, signal.SIGKILL)
      p.wait()


def _wait(p: subprocess.Popen, log: pathlib.Path, name: str, deadline: float) -> None:
  try:
    p.wait(max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    raise RuntimeError(f"{name} still running after {_TIMEOUT.value:.0f}s: "
                       f"{log_tail(log)}") from None
  if p.returncode != 0:
    raise RuntimeError(f"{name} exited with status {p.returncode}: {log_tail(log)}")


def _load_s(log: pathlib.Path) -> float | None:
  m = _LOADED.search(log.read_text(errors="replace"))
  return float(m.group(1)) if m else None


def _port_open(port: int) -> bool:
  with socket.socket() as s:
    s.settimeout(0.2)
    return s.connect_ex(("127.0.0.1", port)) == 0


# ------------------------------------------------------------------------------- runs
def _gen_args(gguf: str, prompt: list[int], out_json: pathlib.Path) -> list[str]:
  return [str(GEN), f"--gguf={gguf}", f"--prompt_tokens={','.join(map(str, prompt))}",
          "--nochat", f"--max_new_tokens={_NEW.value}", "--temperature=0",
          f"--ctx_size={_CTX.value}", f"--output_json={out_json}", "--nostream",
          *_shape_args(), *_EXTRA.value]


def run_single(gguf, prompt, logs, sampler) -> dict:
  out, log = logs / "single.json", logs / "single.log"
  t0 = time.monotonic()
  p = _spawn(_gen_args(gguf, prompt, out), log)
  sampler.watch("single", p.pid)
  _wait(p, log, "single process", t0 + _TIMEOUT.value)
  wall = time.monotonic() - t0
  return {"single": dict(load_s=_load_s(log), wall_s=wall, log=str(log)),
          "tokens": json.loads(out.read_text())["tokens"]}


def run_split(gguf, prompt, logs, sampler, n_layers: int) -> dict:
  k = _SPLIT.value
  if k + 1 >= n_layers:
    raise ValueError(f"--split={k} leaves no layers for the worker ({n_layers} layers)")
  port = free_port()
  out, clog = logs / "split.json", logs / "coordinator.log"
  t0 = time.monotonic()
  coord = _spawn([*_gen_args(gguf, prompt, out), f"--layers=0:{k}",
                  f"--listen=127.0.0.1:{port}", "--route_timeout=900"], clog)
  sampler.watch("coordinator", coord.pid)
  # The coordinator listens only once its layers are loaded: that is its load time here
  # (process start included). The worker dials after that, and loads on ACCEPT.
  while not _port_open(port):
    if coord.poll() is not None:
      raise RuntimeError(f"coordinator exited with status {coord.returncode}: {log_tail(clog)}")
    if time.monotonic() - t0 > _TIMEOUT.value:
      raise RuntimeError(f"coordinator not listening after {_TIMEOUT.value:.0f}s: {log_tail(clog)}")
    time.sleep(0.2)
  coord_load = time.monotonic() - t0
  t1 = time.monotonic()
  workers = LocalWorkers(gguf, [f"{k + 1}:output"], ("127.0.0.1", port), ctx_size=_CTX.value,
                         log_dir=str(logs), extra_args=[*_shape_args(), *_EXTRA.value]).start()
  wlog = workers.logs[0]
  sampler.watch("worker", workers.procs[0].pid)
  _wait(coord, clog, "coordinator", t0 + _TIMEOUT.value)
  wall = time.monotonic() - t0
  worker_wall = time.monotonic() - t1
  workers.stop(timeout=10)
  return {"coordinator": dict(load_s=coord_load, load_how="start to listening", wall_s=wall,
                              log=str(clog)),
          "worker": dict(load_s=_load_s(wlog), wall_s=worker_wall, log=str(wlog)),
          "tokens": json.loads(out.read_text())["tokens"]}


def _state_bytes(cfg, layers: dict) -> dict[str, int]:
  """Decode-state bytes each process allocates: its layers' `state_layer_bytes` at the run's
  ctx and chunk (capped and sized as `build.load_runner` does), times its pool's slots
  (max_sessions + the scratch slot), plus the pool's positions."""
  from ds4jax.build.stages import max_chunk_for
  from ds4jax.partition.memory import POS_BYTES, state_layer_bytes
  per = state_layer_bytes(cfg, ctx=min(_CTX.value, cfg.context_length),
                          max_chunk=max_chunk_for(_CHUNK.value or DEFAULT_CHUNK))
  out = {}
  for name, rng in layers.items():
    slots = (_SESSIONS.value or DEFAULT_SESSIONS[name]) + 1
    out[name] = slots * (sum(per[il] for il in rng) + POS_BYTES)
  return out


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  from ds4jax.gguf.reader import open_gguf
  gguf = _GGUF.value
  if not os.path.isfile(gguf):
    raise FileNotFoundError(f"no GGUF at {gguf} (make one with scripts/make_tiny_gguf.py "
                            "--preset=flash --n_layers=4)")
  r = open_gguf(gguf)
  embed, per_layer, head = r.layer_bytes()
  cfg = r.cfg
  n, k, vocab = len(per_layer), _SPLIT.value, cfg.vocab_size
  del r
  slices = {"single": ("all", embed + sum(per_layer) + head),
            "coordinator": (f"0:{k}", embed + sum(per_layer[:k + 1])),
            "worker": (f"{k + 1}:output", sum(per_layer[k + 1:]) + head)}
  states = _state_bytes(cfg, {"single": range(n), "coordinator": range(k + 1),
                              "worker": range(k + 1, n)})
  prompt = [(1 + 7919 * i) % vocab for i in range(_PROMPT_LEN.value)]  # fixed, spread over vocab
  logs = pathlib.Path(_LOGS.value or tempfile.mkdtemp(prefix="ds4jax-flashmem-"))
  logs.mkdir(parents=True, exist_ok=True)
  res, tokens = {}, {}
  load0 = os.getloadavg()
  try:
    for which in ("single", "split"):
      if _ONLY.value not in ("both", which):
        continue
      with Sampler(_SAMPLE.value) as s:
        out = (run_single(gguf, prompt, logs, s) if which == "single"
               else run_split(gguf, prompt, logs, s, n))
      tokens[which] = out.pop("tokens")
      for name, row in out.items():
        row.update(peak_rss=s.peak[name], peak_at_s=s.peak_t.get(name), rss=s.series[name],
                   peak_anon=s.peak_anon[name], peak_anon_at_s=s.peak_anon_t.get(name),
                   vm_hwm=s.hwm[name], rss_anon=s.anon[name])
        res[name] = row
  finally:
    _kill_all()
  load1 = os.getloadavg()
  ok = True
  if _BOUND.value == "state":
    how = f"bound = slice + decode state + {_ALLOW.value} GB, on peak RssAnon and peak RSS"
  else:
    how = f"budget = {_RATIO.value} x slice + {_ALLOW.value} GB, on peak RSS"
  print(f"\n{gguf}: {n} layers, prompt {len(prompt)} tokens, {_NEW.value} greedy tokens, "
        f"ctx {_CTX.value}; {how}")
  print(f"{'process':<12} {'slice':<10} {'slice GB':>9} {'state GB':>9} {'peak RSS GB':>12} "
        f"{'peak anon GB':>13} {'VmHWM GB':>9} {'budget GB':>10} {'load s':>7} {'wall s':>7}  "
        "result")
  for name, row in res.items():
    rng, nbytes = slices[name]
    state = states[name]
    if _BOUND.value == "state":
      budget = nbytes + state + _ALLOW.value * GB
      row_ok = max(row["peak_rss"], row["vm_hwm"], row["peak_anon"]) <= budget
    else:
      budget = _RATIO.value * nbytes + _ALLOW.value * GB
      row_ok = row["peak_rss"] <= budget
    row.update(slice=rng, slice_bytes=nbytes, state_bytes=state, budget=budget, ok=row_ok)
    ok &= row["ok"]
    load = f"{row['load_s']:.1f}" if row["load_s"] is not None else "?"
    print(f"{name:<12} {rng:<10} {nbytes / GB:>9.2f} {state / GB:>9.3f} "
          f"{row['peak_rss'] / GB:>12.2f} {row['peak_anon'] / GB:>13.2f} "
          f"{row['vm_hwm'] / GB:>9.2f} {budget / GB:>10.2f} {load:>7} {row['wall_s']:>7.1f}  "
          f"{'PASS' if row['ok'] else 'FAIL'}")
  for which, toks in tokens.items():
    print(f"tokens ({which}): {toks}")
  same = len(set(map(tuple, tokens.values()))) <= 1
  if len(tokens) == 2:
    print(f"tokens identical: {'yes' if same else 'NO'}")
  ok &= same
  print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f} (1 min); logs in {logs}")
  if _OUT_JSON.value:
    with open(_OUT_JSON.value, "w") as f:
      json.dump(dict(gguf=gguf, prompt=prompt, tokens=tokens, rows=res, loadavg=[load0, load1],
                     ratio=_RATIO.value, allowance_gb=_ALLOW.value, bound=_BOUND.value,
                     ctx_size=_CTX.value, max_sessions=_SESSIONS.value,
                     prefill_chunk=_CHUNK.value), f, indent=1)
  return 0 if ok else 1


def _main(argv):
  try:
    sys.exit(main(argv))
  except (ValueError, RuntimeError, OSError) as e:
    _kill_all()
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    _kill_all()
    print("interrupted", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  signal.signal(signal.SIGTERM, lambda *_: (_kill_all(), os._exit(143)))
  app.run(_main)
