"""Per-request steering and capture through the OpenAI server (issue 22 items 6 and 7) over
the real tiny model at the suite's shapes: in the server's process, and through the
model-process link (the model server in a thread, a real socketpair, JSON lines).

  - a request's `steering` changes the greedy text, and equals the in-process Generator with
    the same Interventions and the same steering given as server flags;
  - `"steering": null` and scales of 0 turn the server's flags off for that request;
  - a `capture` returns exactly the asked arrays, equal to the Generator's capture;
  - concurrent requests with different steering each equal their result alone;
  - bad fields are HTTP 400 one-liners before any compute, and the next request succeeds.
"""

import concurrent.futures
import json

import httpx
import numpy as np
import openai
import pytest

from ds4jax import build
from ds4jax.generate.loop import Generator
from ds4jax.runtime import sources
from ds4jax.runtime.capture import CaptureSpec
from ds4jax.runtime.edits import Interventions
from ds4jax.serving.app import create_app
from ds4jax.serving.engine import SessionTracker
from ds4jax.serving.research import Research, decode_captured
from ds4jax.testing.suite import CHUNK, CTX

from serving_fakes import linked_model, serve_in_thread

MODEL = "tiny"
PROMPT = "Hello, world"
N = 8
MSGS = [{"role": "user", "content": PROMPT}]
STEER = {"dir_steering_file": "d.f32", "dir_steering_ffn": 2.0}
CAPTURE = {"points": "ffn_out,router_ids", "layers": "1:2"}


@pytest.fixture(scope="module")
def model(tiny_gguf, tmp_path_factory):
  """(backend, tokenizer, steering dir): the whole tiny model and ds4 steering files."""
  be = build.local_backend(tiny_gguf, ctx_size=CTX, prefill_chunk=CHUNK)
  cfg = be.cfg
  d = tmp_path_factory.mktemp("steer")
  dirs = np.random.default_rng(3).standard_normal((cfg.n_layers, cfg.d_model))
  (dirs / np.linalg.norm(dirs, axis=1, keepdims=True)).astype("<f4").tofile(d / "d.f32")
  experts = np.zeros((cfg.n_layers, cfg.n_experts), "<f4")
  experts[:, 5], experts[:, 0] = 1.0, -1.0
  experts.tofile(d / "e.f32")
  (d / "bad.f32").write_bytes(b"\0" * 12)
  yield be, sources.open_tokenizer(tiny_gguf), d
  be.close()


@pytest.fixture(scope="module")
def ref(model):
  """ref(chat, **generate kwargs) -> the in-process Generator's result, memoised."""
  be, tok, _ = model
  gen, memo = Generator(be, tok), {}

  def reference(chat=False, edits=None, capture=None):
    key = (chat, None if edits is None else edits.key, capture)
    if key not in memo:
      ids = tok.chat_prompt([(m["role"], m["content"]) for m in MSGS]) if chat else None
      memo[key] = gen.generate(None if chat else PROMPT, prompt_tokens=ids, max_new_tokens=N,
                               edits=edits, capture=capture)
    return memo[key]

  return reference


def _post(c, chat=False, **extra):
  body = {"messages": MSGS} if chat else {"prompt": PROMPT}
  return c.post("/v1/chat/completions" if chat else "/v1/completions",
                json={**body, "max_tokens": N, "temperature": 0, **extra})


def _text(r, chat=False):
  assert r.status_code == 200, r.text
  ch = r.json()["choices"][0]
  return ch["message"]["content"] if chat else ch["text"]


def _stream(c, chat=False, **extra):
  """(text, the final chunk's capture or None) of a streaming request."""
  body = {"messages": MSGS} if chat else {"prompt": PROMPT}
  path = "/v1/chat/completions" if chat else "/v1/completions"
  text, capture = "", None
  with c.stream("POST", path, json={**body, "max_tokens": N, "temperature": 0, "stream": True,
                                    **extra}) as r:
    assert r.status_code == 200
    for line in r.iter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      ev = json.loads(line[6:])
      for ch in ev["choices"]:
        text += (ch["delta"].get("content") or "") if chat else ch["text"]
        if ch["finish_reason"] is not None:
          capture = ev.get("capture")
  return text, capture


def _same_capture(got, want):
  got = decode_captured(got)
  assert sorted(got.keys()) == sorted(want.keys())
  np.testing.assert_array_equal(got.positions, want.positions)
  for k in want.arrays:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_request_steering_and_capture_in_process(model, ref):
  be, tok, d = model
  steer = Interventions.ds4_steering(d / "d.f32", be.cfg, ffn=2.0)
  experts = Interventions.ds4_expert_steering(d / "e.f32", be.cfg, scale=1e6)
  spec = CaptureSpec.parse(CAPTURE["points"], CAPTURE["layers"])
  app = create_app(be, tok, MODEL, max_concurrency=4,
                   research=Research(be.cfg, steering_dir=str(d)))
  with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=300) as c:
    plain = _text(_post(c))
    assert plain == ref().text
    steered = _text(_post(c, steering=STEER))
    assert steered == ref(edits=steer).text != plain, "the steering should change the text"
    assert _stream(c, chat=True, steering=STEER)[0] == ref(chat=True, edits=steer).text

    # Capture: exactly the asked arrays, equal to the Generator's; streaming: the last chunk.
    r = _post(c, capture=CAPTURE)
    assert _text(r) == plain
    got = r.json()["capture"]
    assert sorted(got["arrays"]) == ["ffn_out.1", "ffn_out.2", "router_ids.1", "router_ids.2"]
    _same_capture(got, ref(capture=spec).captured)
    text, got = _stream(c, chat=True, capture=CAPTURE, steering=STEER)
    want = ref(chat=True, edits=steer, capture=spec)
    assert text == want.text
    _same_capture(got, want.captured)
    assert "capture" not in _post(c).json()  # only when asked
    # The openai client: the fields in extra_body, the capture in model_extra.
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0,
                                  extra_body={"steering": STEER, "capture": CAPTURE})
    assert r.choices[0].text == steered
    _same_capture(r.model_extra["capture"], ref(edits=steer, capture=spec).captured)

    # Different steering at once: each equals its result alone.
    kinds = [None, STEER, {"expert_steering_file": "e.f32", "expert_steering_scale": 1e6}]
    alone = [plain, steered, _text(_post(c, steering=kinds[2]))]
    assert alone[2] == ref(edits=experts).text
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      futs = [pool.submit(lambda s: _text(_post(c, **({} if s is None else {"steering": s}))),
                          s) for s in kinds * 2]
      assert [f.result() for f in futs] == alone * 2


@pytest.mark.parametrize("extra, needle", [
    (dict(steering={"dir_steering_file": "bad.f32"}),
     "steering file bad.f32 has 12 bytes; this model needs L x D = 4 x 256 float32"),
    (dict(steering={"dir_steering_file": "../d.f32"}), "plain file name"),
    (dict(steering={"dir_steering_file": "nope.f32"}), "steering file not found: nope.f32"),
    (dict(steering={"expert_steering_scale": 1.0}), "needs expert_steering_file"),
    (dict(steering={"ffn": 1.0}), "steering.ffn: unknown field"),
    (dict(capture={"points": "ffn_out,nope"}), "unknown capture point 'nope'"),
    (dict(capture={"points": "ffn_out", "layers": "2:9"}), "capture layer 4 is out of range"),
    (dict(capture={"points": "lens"}), "over this server's limit of 100000 (--max_capture_mb)"),
])
def test_bad_fields_are_400_one_liners_over_the_model_process(model, ref, extra, needle):
  """Through the model-process link, whose server steers by default (its flags)."""
  be, tok, d = model
  research = Research(be.cfg, defaults={"dir_steering_file": str(d / "d.f32"),
                                        "dir_steering_ffn": 2.0},
                      steering_dir=str(d), max_capture_bytes=100_000)
  counted = SessionTracker(be)  # counts the sessions the model server opens
  with linked_model(counted, tok, research) as proc, \
      serve_in_thread(create_app(proc, None, MODEL)) as url, \
      httpx.Client(base_url=url, timeout=300) as c:
    r = _post(c, chat=True, **extra)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_request"
    assert needle in err["message"] and "\n" not in err["message"], err["message"]
    assert counted.opened == 0, "nothing ran"
    # The server lives on; its flags steer by default, and a request can turn them off.
    steer = Interventions.ds4_steering(d / "d.f32", be.cfg, ffn=2.0)
    assert _text(_post(c)) == ref(edits=steer).text
    if "bad.f32" in str(extra):  # once is enough: the rest of the link's behaviour
      assert _text(_post(c, steering=None)) == ref().text
      assert _text(_post(c, steering={"dir_steering_ffn": 0})) == ref().text
      spec = CaptureSpec.parse(CAPTURE["points"], CAPTURE["layers"])
      r = _post(c, capture=CAPTURE)
      _same_capture(r.json()["capture"], ref(edits=steer, capture=spec).captured)

