"""Acceptance (issue 8): `scripts/serve.py` as the coordinator of a real split, over loopback.

The server (layers 0:1) listens where the session's shared worker (layers 2:output, the
`split_route` fixture) dials; the worker is paused until the test lets it join.
  1. /health reports the missing layers at once, and answers while a request waits;
  2. a request made before the worker joins completes once it does;
  3. the official `openai` client, streaming and not, gets exactly the whole model's text for
     the same greedy request (the in-process reference at the same shapes);
  4. ten concurrent streaming requests each equal their sequential result;
  5. a client that disconnects mid-stream frees its session on the coordinator.
A request that times out waiting for the route (503 naming the missing layers) is
tests/serving/app_test.py's and remote_test.py's; the LocalAI e2e checks the same over a real
route (tests/localai/localai_e2e_test.py).
"""

import concurrent.futures
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

from ds4jax.testing.suite import CHUNK, CTX

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUTE_TIMEOUT_S = 300.0
PROMPT = "Hello, world"
MAX_TOKENS = 6
START_TIMEOUT_S = 240
pytestmark = pytest.mark.e2e


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


@pytest.fixture(scope="module")
def split(tiny_gguf, split_route, tmp_path_factory):
  logs = tmp_path_factory.mktemp("serve-logs")
  split_route.pause()  # no route until the test lets the worker join
  server = Proc([_script("serve.py"), f"--gguf={tiny_gguf}", f"--layers={split_route.layers}",
                 f"--listen={split_route.listen}", "--http=127.0.0.1:0", f"--ctx_size={CTX}",
                 f"--prefill_chunk={CHUNK}", f"--route_timeout={ROUTE_TIMEOUT_S}",
                 "--model_name=tiny", "--max_concurrency=10"], logs / "serve.log")
  try:
    url = server.wait_line("serving ", START_TIMEOUT_S).split()[1]
    yield dict(url=url, server=server, route=split_route, logs=logs)
  finally:
    split_route.resume()
    server.stop()


def _wait_for(c, pred, what, timeout=60.0):
  """Polls /health until pred(health) holds; returns that health."""
  deadline = time.monotonic() + timeout
  while True:
    h = c.get("/health").json()
    if pred(h):
      return h
    assert time.monotonic() < deadline, f"{what}: {h}"
    time.sleep(0.05)


def test_split_server_acceptance(split, tiny_reference):
  url = split["url"]
  client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
  with httpx.Client(base_url=url, timeout=300) as c:
    # 1. Missing layers at once.
    h = c.get("/health").json()
    assert h["status"] == "waiting_for_route"
    assert h["route"]["missing_layers"] == [2, 3] and h["route"]["reason"] == "missing layer 2"
    assert h["route"]["workers"] == []

    # 2. A request made before the worker has joined waits (health answers meanwhile and
    # counts it), then completes once the worker joins.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      fut = pool.submit(client.chat.completions.create, model="tiny", max_tokens=MAX_TOKENS,
                        temperature=0, messages=[{"role": "user", "content": PROMPT}])
      h = _wait_for(c, lambda h: h["queue_depth"] == 1, "the request never queued")
      assert h["route"]["complete"] is False and not fut.done()
      split["route"].resume()
      first = fut.result(timeout=ROUTE_TIMEOUT_S)
    h = c.get("/health").json()
    assert h["route"]["complete"] and h["route"]["workers"][0]["layers"] == "2:3+output"

    # 3. The openai client, streaming and not, equals the whole model's generation.
    ref = tiny_reference(PROMPT, MAX_TOKENS, chat=True)
    ref = dict(text=ref.text, tokens=ref.tokens, prompt_tokens=ref.prompt_tokens)
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

    # 4. Ten concurrent streams, each equal to its sequential result.
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

    # 5. A client that leaves mid-stream frees its session (server and coordinator). The model
    # process reports its session count on change, so /health follows it a moment later.
    _wait_for(c, lambda h: h["sessions"] == 0, "the streams of step 4 were not freed")
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
    with c.stream("POST", "/v1/completions", json=body) as r:
      lines = r.iter_lines()
      assert next(lines).startswith("data: ")
      _wait_for(c, lambda h: h["sessions"] == 1, "the open stream has no session")
    _wait_for(c, lambda h: h["sessions"] == 0 and h["route"]["backend"]["sessions"] == 0,
              "the session was not freed")

    # The HTTP process never loaded JAX (the model runs in its child), so no compile can stall
    # health (its latency is a benchmark's, not a test's).
    maps = f"/proc/{split['server'].p.pid}/maps"
    if os.path.exists(maps):
      with open(maps) as f:
        assert "jaxlib" not in f.read()

    # Metrics saw the worker's hop and the generated tokens.
    text = c.get("/metrics").text
    assert any(l.startswith('ds4jax_hop_latency_seconds_count{stage="2:output"')
               for l in text.splitlines()), text
    assert "ds4jax_route_complete 1" in text and "ds4jax_workers 1" in text
  assert split["server"].stop() == 0
