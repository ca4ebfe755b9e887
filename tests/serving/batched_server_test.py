"""Continuous batching through the OpenAI server (issue 13): eight concurrent streaming
clients over the real tiny model each get exactly their sequential text while the stage
batcher runs their decode tokens together; beyond --max_concurrency a request queues and,
after --queue_timeout, gets HTTP 429 with Retry-After."""

import concurrent.futures
import threading
import time

import httpx
import openai

from ds4jax import build
from ds4jax.runtime import sources
from ds4jax.serving.app import create_app

from serving_fakes import FakeBackend, serve_in_thread, tiny_tokenizer

MODEL = "tiny"
N_STREAMS = 8
MAX_TOKENS = 12


def test_eight_concurrent_streams_equal_sequential_and_batch(tiny_gguf):
  backend = build.local_backend(tiny_gguf, ctx_size=128, max_sessions=N_STREAMS)
  tok = sources.open_tokenizer(tiny_gguf)
  prompts = [f"stream {i} says" + " more" * i for i in range(N_STREAMS)]
  try:
    app = create_app(backend, tok, MODEL, max_concurrency=N_STREAMS, queue_timeout=60)
    with serve_in_thread(app) as url:
      client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

      def run(p, stream=True):
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS,
                                      temperature=0, stream=stream)
        if not stream:
          return r.choices[0].text
        return "".join(c.choices[0].text for c in r if c.choices)

      sequential = [run(p, stream=False) for p in prompts]
      rows_before = backend.batchers[0].stats.decode_rows
      calls_before = backend.batchers[0].stats.decode_calls
      with concurrent.futures.ThreadPoolExecutor(N_STREAMS) as pool:
        concurrent_ = list(pool.map(run, prompts))
  finally:
    backend.close()
  assert concurrent_ == sequential
  assert all(sequential), "every request produced text"
  st = backend.batchers[0].stats
  rows, calls = st.decode_rows - rows_before, st.decode_calls - calls_before
  # The decode tokens of the concurrent streams shared calls.
  assert st.max_batch_seen >= 2 and rows > calls, (rows, calls, st.max_batch_seen)


def test_queue_beyond_max_concurrency_then_429_with_retry_after():
  backend = FakeBackend()
  backend.hold = threading.Event()  # the first request holds the only slot until released
  app = create_app(backend, tiny_tokenizer(), "tiny-fake", max_concurrency=1, queue_timeout=0.3)
  with serve_in_thread(app) as url:
    body = {"model": "tiny-fake", "prompt": "hold the slot", "max_tokens": 40,
            "temperature": 0}
    with httpx.Client(base_url=url, timeout=60) as c, \
        concurrent.futures.ThreadPoolExecutor(1) as pool:
      first = pool.submit(c.post, "/v1/completions", json={**body, "stream": True})
      try:
        assert backend.in_step.wait(60)
        t0 = time.monotonic()
        busy = c.post("/v1/completions", json=body)
        waited = time.monotonic() - t0
      finally:
        backend.hold.set()
      assert first.result().status_code == 200
      after = c.post("/v1/completions", json={**body, "max_tokens": 2})
  assert busy.status_code == 429, busy.text
  assert busy.headers["Retry-After"] == "1"
  err = busy.json()["error"]
  assert err["code"] == "busy" and "max_concurrency" in err["message"]
  assert waited >= 0.3, "it queued for queue_timeout before answering"
  assert after.status_code == 200  # the slot came back
