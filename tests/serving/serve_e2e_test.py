"""Acceptance (issue 8): `scripts/serve.py` as the coordinator of a real split, over loopback.

Two server processes (layers 0:1) start before any worker: the main one waits up to
ROUTE_TIMEOUT_S for its route (a joining worker compiles its shapes before it is ready, which
takes tens of seconds on a loaded CI host), a second one only SHORT_TIMEOUT_S and never gets a
worker.
  1. /health reports the missing layers at once, and answers in < 100 ms throughout;
  2. a request made with no worker gets 503 naming the missing layers after the timeout;
  3. a request made before the worker (2:output) joins completes once it does;
  4. the official `openai` client, streaming and not, gets exactly `scripts/generate.py`'s text
     for the same greedy request (generate.py runs as its own process, whole model);
  5. ten concurrent streaming requests each equal their sequential result;
  6. a client that disconnects mid-stream frees its session on the coordinator.
"""

import concurrent.futures
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUTE_TIMEOUT_S = 300.0
SHORT_TIMEOUT_S = 4.0
CTX = 256
PROMPT = "Hello, world"
MAX_TOKENS = 6
START_TIMEOUT_S = 240


class Proc:
  """A child process whose stdout lines are collected by a thread (so reads can time out)."""

  def __init__(self, args, log_path):
    self.log = open(log_path, "w")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    self.p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=self.log, text=True)
    self.lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._pump, daemon=True).start()

  def _pump(self):
    for line in self.p.stdout:
      self.lines.put(line)

  def wait_line(self, prefix, timeout):
    deadline = time.monotonic() + timeout
    while True:
      left = deadline - time.monotonic()
      if left <= 0 or self.p.poll() is not None and self.lines.empty():
        raise RuntimeError(f"no {prefix!r} line (exit {self.p.poll()}); see {self.log.name}")
      try:
        line = self.lines.get(timeout=min(left, 1.0))
      except queue.Empty:
        continue
      if line.startswith(prefix):
        return line.strip()

  def stop(self):
    if self.p.poll() is None:
      self.p.send_signal(signal.SIGTERM)
      try:
        self.p.wait(15)
      except subprocess.TimeoutExpired:
        self.p.kill()
        self.p.wait(5)
    self.log.close()
    return self.p.returncode


def _script(name):
  return os.path.join(ROOT, "scripts", name)


def _assert_fast(lat_ms):
  """/health answers within 100 ms. The server side takes well under 1 ms (a snapshot read in
  a process that never runs JAX); what the client sees on a shared, oversubscribed CI host also
  includes OS scheduling of both processes, so 90% of probes must be under 100 ms and none may
  take a second (a GIL stall from an in-process compile takes 0.3-2.3 s)."""
  lat = sorted(lat_ms)
  assert len(lat) >= 5, lat
  assert lat[int(0.9 * (len(lat) - 1))] < 100 and lat[-1] < 1000, lat


def _get_ms(c, path):
  t0 = time.perf_counter()
  r = c.get(path)
  return 1e3 * (time.perf_counter() - t0), r


@pytest.fixture(scope="module")
def split(tiny_gguf, tiny_cache_dir, tmp_path_factory):
  logs = tmp_path_factory.mktemp("serve-logs")

  def serve(timeout, log):
    return Proc([_script("serve.py"), f"--gguf={tiny_gguf}", "--layers=0:1",
                 "--listen=127.0.0.1:0", "--http=127.0.0.1:0", f"--ctx_size={CTX}",
                 f"--route_timeout={timeout}", f"--cache_dir={tiny_cache_dir}",
                 "--model_name=tiny", "--max_concurrency=10"], logs / log)

  procs = {"server": serve(ROUTE_TIMEOUT_S, "serve.log"), "short": serve(SHORT_TIMEOUT_S,
                                                                         "short.log")}
  try:
    line = procs["server"].wait_line("serving ", START_TIMEOUT_S)
    url = line.split()[1]
    listen = line.split("listen=")[1]
    short_url = procs["short"].wait_line("serving ", START_TIMEOUT_S).split()[1]
    # The reference: generate.py, whole model in one process, chat format, greedy.
    ref_json = logs / "generate.json"
    procs["generate"] = Proc([_script("generate.py"), f"--gguf={tiny_gguf}", f"--prompt={PROMPT}",
                              "--chat", f"--max_new_tokens={MAX_TOKENS}", f"--ctx_size={CTX}",
                              f"--cache_dir={tiny_cache_dir}", f"--output_json={ref_json}",
                              "--nostream"], logs / "generate.log")

    def start_worker():
      procs["worker"] = Proc([_script("worker.py"), f"--gguf={tiny_gguf}", "--layers=2:output",
                              f"--coordinator={listen}", f"--ctx_size={CTX}", "--max_sessions=10",
                              f"--cache_dir={tiny_cache_dir}"], logs / "worker.log")

    yield dict(url=url, short_url=short_url, start_worker=start_worker, procs=procs,
               ref_json=ref_json, logs=logs)
  finally:
    for name in ("worker", "generate", "short", "server"):
      if name in procs:
        procs[name].stop()


def _reference(split):
  proc = split["procs"]["generate"]
  assert proc.p.wait(START_TIMEOUT_S) == 0, f"generate.py failed; see {proc.log.name}"
  with open(split["ref_json"]) as f:
    return json.load(f)


def test_split_server_acceptance(split):
  url = split["url"]
  client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
  with httpx.Client(base_url=url, timeout=300) as c:
    # 1. Missing layers at once, fast.
    ms, r = _get_ms(c, "/health")
    h = r.json()
    assert ms < 100, ms
    assert h["status"] == "waiting_for_route"
    assert h["route"]["missing_layers"] == [2, 3] and h["route"]["reason"] == "missing layer 2"
    assert h["route"]["workers"] == []

    # 2. No worker: 503 after the route timeout; health stays fast meanwhile.
    with concurrent.futures.ThreadPoolExecutor(1) as pool, \
        httpx.Client(base_url=split["short_url"], timeout=60) as short:
      t0 = time.monotonic()
      fut = pool.submit(short.post, "/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": PROMPT}]})
      lat = []
      while not fut.done():
        lat.append(_get_ms(short, "/health")[0])
        time.sleep(0.1)
      r = fut.result()
      waited = time.monotonic() - t0
    assert r.status_code == 503, r.text
    assert SHORT_TIMEOUT_S <= waited < SHORT_TIMEOUT_S + 10
    assert r.json()["error"]["missing_layers"] == [2, 3]
    assert "missing layer 2" in r.json()["error"]["message"]
    _assert_fast(lat)
    assert split["procs"]["short"].stop() == 0

    # 3. A request made before the worker has joined completes once it does. The request is
    # sent once the worker process is up and dialing (JAX imported), so the join (weights
    # load, HELLO) falls well inside the timeout even on a loaded machine.
    split["start_worker"]()
    worker = split["procs"]["worker"]
    deadline = time.monotonic() + START_TIMEOUT_S
    while "dialing" not in open(worker.log.name).read():
      assert worker.p.poll() is None and time.monotonic() < deadline, "worker did not start"
      time.sleep(0.1)
    assert c.get("/health").json()["route"]["complete"] is False
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      fut = pool.submit(client.chat.completions.create, model="tiny", max_tokens=MAX_TOKENS,
                        temperature=0, messages=[{"role": "user", "content": PROMPT}])
      lat = []
      while not fut.done():
        lat.append(_get_ms(c, "/health")[0])
        time.sleep(0.25)
      first = fut.result()
    _assert_fast(lat)
    h = c.get("/health").json()
    assert h["route"]["complete"] and h["route"]["workers"][0]["layers"] == "2:3+output"

    # 4. The openai client, streaming and not, equals generate.py.
    ref = _reference(split)
    msgs = [{"role": "user", "content": PROMPT}]
    assert first.choices[0].message.content == ref["text"]
    assert first.usage.prompt_tokens == len(ref["prompt_tokens"])
    assert first.usage.completion_tokens == len(ref["tokens"])
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == ref["text"]
    # The same transcript as token ids through /v1/completions.
    done = client.completions.create(model="tiny", prompt=ref["prompt_tokens"],
                                     max_tokens=MAX_TOKENS, temperature=0)
    assert done.choices[0].text == ref["text"]
    stream = client.completions.create(model="tiny", prompt=ref["prompt_tokens"],
                                       max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == ref["text"]

    # 5. Ten concurrent streams, each equal to its sequential result.
    prompts = [f"Question {i}: why?" for i in range(10)]
    seq = [client.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0)
           .choices[0].text for p in prompts]

    def run(p):
      s = client.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0,
                                    stream=True)
      return "".join(ch.choices[0].text for ch in s if ch.choices)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
      assert list(pool.map(run, prompts)) == seq
    assert len(set(seq)) > 1, "distinct prompts should give distinct texts"

    # 6. A client that leaves mid-stream frees its session (server and coordinator).
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
    with c.stream("POST", "/v1/completions", json=body) as r:
      lines = r.iter_lines()
      assert next(lines).startswith("data: ")
      assert c.get("/health").json()["sessions"] == 1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
      h = c.get("/health").json()
      if h["sessions"] == 0 and h["route"]["backend"]["sessions"] == 0:
        break
      time.sleep(0.1)
    assert h["sessions"] == 0 and h["route"]["backend"]["sessions"] == 0, h

    # The HTTP process never loaded JAX (the model runs in its child), so no compile can stall
    # health: the structural half of the latency guarantee.
    maps = f"/proc/{split['procs']['server'].p.pid}/maps"
    if os.path.exists(maps):
      with open(maps) as f:
        assert "jaxlib" not in f.read()

    # Metrics saw the worker's hop and the generated tokens.
    text = c.get("/metrics").text
    assert any(l.startswith('ds4jax_hop_latency_seconds_count{stage="2:output"')
               for l in text.splitlines()), text
    assert "ds4jax_route_complete 1" in text and "ds4jax_workers 1" in text
  assert split["procs"]["server"].stop() == 0
