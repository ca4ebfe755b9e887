"""The model-process link (ModelProcess <-> model_proc.ModelServer) over a real socketpair,
with the model server in a thread over the fake backend: the server's request path, route
snapshots, cancellation and error mapping, without a JAX process."""

import json
import time

import httpx
import openai
import pytest

from ds4jax.generate.loop import Generator
from ds4jax.serving.app import create_app

from serving_fakes import FakeBackend, linked_model, serve_in_thread, tiny_tokenizer

MODEL = "tiny-remote"


@pytest.fixture
def linked():
  tok = tiny_tokenizer()
  backend = FakeBackend(ready=False, step_s=0.01, eos=False)
  with linked_model(backend, tok) as model, \
      serve_in_thread(create_app(model, None, MODEL, route_timeout=1.0)) as url:
    yield backend, model, url, tok


def _route_complete(url):
  """Waits until the HTTP process has the model process's snapshot of a complete route."""
  with httpx.Client(base_url=url, timeout=30) as c:
    deadline = time.monotonic() + 60  # a hang guard
    while not c.get("/health").json()["route"]["complete"]:
      assert time.monotonic() < deadline, "the route snapshot never arrived"
      time.sleep(0.02)


def test_route_snapshot_wait_join_and_generation(linked):
  backend, model, url, tok = linked
  with httpx.Client(base_url=url, timeout=30) as c:
    h = c.get("/health").json()
    assert h["route"]["missing_layers"] == [2, 3] and h["route"]["reason"] == "missing layer 2"
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
    assert r.status_code == 503 and r.json()["error"]["missing_layers"] == [2, 3]
    backend.join()
    _route_complete(url)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    ref = Generator(FakeBackend(step_s=0, eos=False), tok).generate("hello", max_new_tokens=12)
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == 12
    s = client.completions.create(model=MODEL, prompt="hello", max_tokens=12, temperature=0,
                                  stream=True)
    assert "".join(ch.choices[0].text for ch in s if ch.choices) == ref.text
    text = c.get("/metrics").text
    assert 'ds4jax_hop_latency_seconds_count{stage="2:output",host="127.0.0.1:9"}' in text
    # A prompt the model refuses is a 400 from the model process's ValueError.
    r = c.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": "a"}, {"role": "system", "content": "b"}]})
    assert r.status_code == 400 and "system message must come first" in r.text


def test_disconnect_cancels_in_the_model_process(linked):
  backend, model, url, _ = linked
  backend.join()
  _route_complete(url)
  with httpx.Client(base_url=url, timeout=30) as c:
    with c.stream("POST", "/v1/completions",
                  json={"prompt": "x", "max_tokens": 5000, "stream": True}) as r:
      lines = r.iter_lines()
      assert next(lines).startswith("data: ")
      assert len(backend.open) == 1
    deadline = time.monotonic() + 60  # a hang guard
    while backend.open and time.monotonic() < deadline:
      time.sleep(0.02)
    assert not backend.open and len(backend.closed) == 1
    steps = backend.steps
    time.sleep(0.2)
    assert backend.steps == steps < 5000  # it stopped, before max_tokens
    deadline = time.monotonic() + 60  # a hang guard
    while c.get("/health").json()["sessions"] and time.monotonic() < deadline:
      time.sleep(0.02)
    assert c.get("/health").json()["sessions"] == 0


def test_route_lost_mid_stream_and_model_exit(linked):
  backend, model, url, _ = linked
  backend.join()
  _route_complete(url)
  with httpx.Client(base_url=url, timeout=30) as c:
    events = []
    with c.stream("POST", "/v1/completions",
                  json={"prompt": "x", "max_tokens": 2000, "stream": True}) as r:
      for line in r.iter_lines():
        if line.startswith("data: "):
          events.append(line[6:])
          if len(events) == 3:
            backend.leave()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "route_unavailable"
    # The model process goes away: health says so, requests fail cleanly.
    model.conn.shutdown(2)
    deadline = time.monotonic() + 60  # a hang guard
    while "exited" not in c.get("/health").json()["route"]["reason"]:
      assert time.monotonic() < deadline
      time.sleep(0.02)
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
    assert r.status_code == 503
