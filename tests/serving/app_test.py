"""The server over a fake split backend: OpenAI shapes, route waits, health latency, load,
disconnects, bad bodies and metrics. Real uvicorn on loopback; the real-model acceptance
tests are in serve_e2e_test.py."""

import concurrent.futures
import json
import threading
import time

import httpx
import openai
import pytest

from ds4jax.generate.loop import Generator
from ds4jax.serving.app import create_app

from serving_fakes import FakeBackend, serve_in_thread, tiny_tokenizer

MODEL = "tiny-fake"


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer()


def _reference(tok, prompt=None, messages=None, max_tokens=16, stop=()):
  """What Generator alone produces for the request (the fake backend is stateless)."""
  gen = Generator(FakeBackend(step_s=0), tok)
  if messages is not None:
    ids = tok.chat_prompt([(m["role"], m["content"]) for m in messages])
    return gen.generate(prompt_tokens=ids, max_new_tokens=max_tokens, stop=stop)
  return gen.generate(prompt, max_new_tokens=max_tokens, stop=stop)


@pytest.fixture
def server(tok):
  backend = FakeBackend()
  app = create_app(backend, tok, MODEL, route_timeout=1.0, max_concurrency=10)
  with serve_in_thread(app) as url:
    yield backend, url


def _client(url):
  return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_openai_client_completions_and_chat(server, tok):
  backend, url = server
  client = _client(url)
  ref = _reference(tok, "The sky is", max_tokens=24)
  r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=24, temperature=0)
  assert r.choices[0].text == ref.text
  assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
  assert r.usage.prompt_tokens == len(ref.prompt_tokens)
  assert r.usage.completion_tokens == len(ref.tokens)
  assert r.usage.prompt_tokens_details.cached_tokens == ref.cached_prompt_tokens
  chunks = list(client.completions.create(model=MODEL, prompt="The sky is", max_tokens=24,
                                          temperature=0, stream=True))
  assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason

  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
  ref = _reference(tok, messages=msgs, max_tokens=12)
  r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
  assert r.choices[0].message.role == "assistant"
  assert r.choices[0].message.content == ref.text
  assert r.usage.total_tokens == len(ref.prompt_tokens) + len(ref.tokens)
  stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12,
                                          temperature=0, stream=True,
                                          stream_options={"include_usage": True})
  chunks = list(stream)
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
  assert chunks[-1].usage.completion_tokens == len(ref.tokens)
  assert [m.id for m in client.models.list().data] == [MODEL]
  assert not backend.open, "every session is closed after its request"


def test_stop_strings_match_generator(server, tok):
  _, url = server
  ref = _reference(tok, "abc", max_tokens=40, stop=["g"])
  r = _client(url).completions.create(model=MODEL, prompt="abc", max_tokens=40, stop=["g"],
                                      temperature=0)
  assert r.choices[0].text == ref.text
  assert "g" not in r.choices[0].text


def test_bad_bodies_get_clear_4xx(server):
  _, url = server
  with httpx.Client(base_url=url, timeout=10) as c:
    cases = [
        ({"prompt": "x", "max_token": 3}, "max_token: unknown field"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "n": 2}, "only n=1"),
        ({"max_tokens": 3}, "prompt: Field required"),
        ({"prompt": ["a", "b"]}, "batched prompts"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "stop": [""]}, "non-empty"),
    ]
    for body, needle in cases:
      r = c.post("/v1/completions", json=body)
      assert r.status_code == 400, body
      assert needle in r.json()["error"]["message"], (body, r.json())
    r = c.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    r = c.post("/v1/completions", content=b"{not json",
               headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = c.post("/v1/completions", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404 and "other" in r.json()["error"]["message"]
    # A system message after a user message is refused by the chat format: 400, not 500.
    r = c.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": "a"}, {"role": "system", "content": "b"}]})
    assert r.status_code == 400 and "system message must come first" in r.json()["error"]["message"]


def _wait_health(c, pred, what, timeout=60.0):
  """Polls /health until pred(health) holds (a hang guard, not a goal); returns it."""
  deadline = time.monotonic() + timeout
  while True:
    h = c.get("/health").json()
    if pred(h):
      return h
    assert time.monotonic() < deadline, f"{what}: {h}"
    time.sleep(0.02)


def test_route_wait_join_and_timeout(tok):
  backend = FakeBackend(ready=False)
  app = create_app(backend, tok, MODEL, route_timeout=1.5)
  with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as c:
    h = c.get("/health").json()
    assert h["status"] == "waiting_for_route" and h["route"]["missing_layers"] == [2, 3]
    assert h["route"]["reason"] == "missing layer 2" and h["route"]["workers"] == []
    assert c.get("/ready").status_code == 503

    # A request made now waits (health answers meanwhile and counts it); the worker joins
    # within the timeout; the request completes.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      fut = pool.submit(c.post, "/v1/completions", json={"prompt": "hi", "max_tokens": 5})
      _wait_health(c, lambda h: h["queue_depth"] == 1, "the request never queued")
      assert "ds4jax_queue_depth 1" in c.get("/metrics").text
      backend.join()
      r = fut.result(timeout=60)
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == _reference(tok, "hi", max_tokens=5).text
    h = c.get("/health").json()
    assert h["route"]["workers"][0]["layers"] == "2:3+output" and h["route"]["missing_layers"] == []

    # With no worker the request gets 503 naming the missing layers after the timeout.
    backend.leave()
    t0 = time.monotonic()
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503
    assert time.monotonic() - t0 >= 1.5  # it waited for the route first
    err = r.json()["error"]
    assert err["code"] == "route_incomplete" and err["missing_layers"] == [2, 3]
    assert "missing layer 2" in err["message"]


def test_health_answers_while_generating_and_on_stuck_backend(tok):
  """Health never waits for the model: it answers while every step is held mid-generation,
  and from the last known route state while the backend's route query hangs. (Its latency is
  a benchmark's figure.)"""
  backend = FakeBackend()
  backend.hold = threading.Event()
  app = create_app(backend, tok, MODEL)
  with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      futs = [pool.submit(c.post, "/v1/completions", json={"prompt": f"p{i}", "max_tokens": 6})
              for i in range(3)]
      try:
        assert backend.in_step.wait(60)
        _wait_health(c, lambda h: h["active_requests"] == 3, "three requests never ran")
        # A backend whose route query hangs until health has answered.
        gate = threading.Event()
        orig = backend.route_ready
        backend.route_ready = lambda: (gate.wait(60), orig())[1]
        r = c.get("/health").json()
        assert r["route"]["stale"] is True and r["route"]["complete"], r
        gate.set()
        backend.route_ready = orig
      finally:
        backend.hold.set()
      assert all(f.result(timeout=60).status_code == 200 for f in futs)


def test_ten_concurrent_streams_equal_sequential(tok):
  backend = FakeBackend(step_s=0.02)
  with serve_in_thread(create_app(backend, tok, MODEL, max_concurrency=10)) as url:
    _ten_streams(backend, url, tok)


def _ten_streams(backend, url, tok):
  """Ten streams, all open at once (every step is held until the tenth session exists), each
  equal to its sequential reference."""
  client = _client(url)
  prompts = [f"request number {i}:" for i in range(10)]
  refs = [_reference(tok, p, max_tokens=20).text for p in prompts]

  def run(p):
    s = client.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0,
                                  stream=True)
    return "".join(c.choices[0].text for c in s if c.choices)

  backend.hold = threading.Event()
  with concurrent.futures.ThreadPoolExecutor(10) as pool, \
      httpx.Client(base_url=url, timeout=60) as c:
    futs = [pool.submit(run, p) for p in prompts]
    try:
      _wait_health(c, lambda h: h["sessions"] == 10, "the ten requests never overlapped")
    finally:
      backend.hold.set()
    got = [f.result(timeout=60) for f in futs]
  assert got == refs
  assert len(backend.closed) == 10 and not backend.open


def test_disconnect_mid_stream_frees_session(tok):
  backend = FakeBackend(step_s=0.02, eos=False)
  app = create_app(backend, tok, MODEL)
  with serve_in_thread(app) as url:
    with httpx.Client(base_url=url, timeout=10) as c:
      body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 5000,
              "stream": True}
      with c.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert got[0].startswith("data: ")
        assert len(backend.open) == 1
      # The client closed the connection: the session must go.
      deadline = time.monotonic() + 60  # a hang guard
      while backend.open and time.monotonic() < deadline:
        time.sleep(0.02)
      assert not backend.open and len(backend.closed) == 1
      steps = backend.steps
      time.sleep(0.2)
      assert backend.steps == steps, "generation kept running after the client left"
      assert steps < 5000  # it stopped before max_tokens
      assert c.get("/health").json()["sessions"] == 0


def test_route_lost_mid_stream_reports_error_event(tok):
  backend = FakeBackend(eos=False)
  with serve_in_thread(create_app(backend, tok, MODEL)) as url:
    _route_lost(backend, url)


def _route_lost(backend, url):
  with httpx.Client(base_url=url, timeout=10) as c:
    body = {"prompt": "x", "max_tokens": 2000, "stream": True}
    events = []
    with c.stream("POST", "/v1/completions", json=body) as r:
      assert r.status_code == 200
      for line in r.iter_lines():
        if line.startswith("data: "):
          events.append(line[6:])
          if len(events) == 3:
            backend.leave()
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "route_unavailable" and "RouteUnavailable" in err["message"]
    assert not backend.open


def test_metrics_exposition(server):
  _, url = server
  client = _client(url)
  client.completions.create(model=MODEL, prompt="m", max_tokens=8, temperature=0)
  with httpx.Client(base_url=url, timeout=10) as c:
    c.post("/v1/completions", json={"prompt": "x", "n": 3})
    text = c.get("/metrics").text
  lines = text.splitlines()
  assert 'ds4jax_requests_total{endpoint="/v1/completions",status="200"} 1' in lines
  assert 'ds4jax_requests_total{endpoint="/v1/completions",status="400"} 1' in lines
  assert 'ds4jax_errors_total{kind="invalid_request"} 1' in lines
  n_gen = [l for l in lines if l.startswith("ds4jax_generated_tokens_total ")]
  assert 1 <= int(n_gen[0].split()[1]) <= 8
  tps = float([l for l in lines if l.startswith("ds4jax_tokens_per_second ")][0].split()[1])
  assert tps > 0
  assert any(l.startswith('ds4jax_hop_latency_seconds_count{stage="2:output",host="127.0.0.1:9"}')
             for l in lines)
  assert "ds4jax_route_complete 1" in lines and "ds4jax_workers 1" in lines
  assert "# TYPE ds4jax_hop_latency_seconds histogram" in lines


def test_disconnect_non_streaming_frees_session(tok):
  backend = FakeBackend(step_s=0.02, eos=False)
  with serve_in_thread(create_app(backend, tok, MODEL)) as url:
    with httpx.Client(base_url=url, timeout=0.5) as c:
      with pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json={"prompt": "x", "max_tokens": 5000})
    deadline = time.monotonic() + 60  # a hang guard
    while (backend.open or not backend.closed) and time.monotonic() < deadline:
      time.sleep(0.02)
    assert not backend.open and len(backend.closed) == 1
    assert backend.steps < 5000  # it stopped before max_tokens


def test_client_leaving_during_route_wait_is_dropped(tok):
  backend = FakeBackend(ready=False)
  with serve_in_thread(create_app(backend, tok, MODEL, route_timeout=30)) as url:
    with httpx.Client(base_url=url, timeout=0.5) as c:
      with pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
    with httpx.Client(base_url=url, timeout=10) as c:
      deadline = time.monotonic() + 60  # a hang guard
      while c.get("/health").json()["queue_depth"] and time.monotonic() < deadline:
        time.sleep(0.05)
      assert c.get("/health").json()["queue_depth"] == 0
      backend.join()
      time.sleep(0.3)
      assert backend.steps == 0 and not backend.closed, "nothing runs for a client that left"
      assert 'status="499"' in c.get("/metrics").text
