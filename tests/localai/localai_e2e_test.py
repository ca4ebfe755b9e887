"""Acceptance (issue 16): the LocalAI backend as the coordinator of a real split, on loopback.

One backend process (`scripts/localai_backend.py --addr`, as LocalAI spawns it) loads the tiny
model as a ds4 coordinator (`ds4_role:coordinator`, `ds4_layers:0:1`, `ds4_listen` where the
session's shared worker dials, a 3 s `ds4_route_timeout`), with the worker paused:
  1. Health answers during LoadModel and while Predicts wait for the route;
  2. Predict and PredictStream get UNAVAILABLE after the timeout, naming layers 2-3 with
     ds4's "route incomplete" text; a wrong ModelIdentity gets NOT_FOUND before any wait;
then the worker joins, and
  3. Predict and PredictStream give exactly the whole model's greedy text (the in-process
     reference at the same shapes), the chunks concatenate to it and carry running token
     totals;
  4. with `kv_cache_dir`, a repeated long prompt loads the route's stored state and says the
     same text;
  5. Free unloads: FAILED_PRECONDITION again.
ds4-worker's spelling of the worker command line (`--role worker --model ... --coordinator
HOST PORT -c N`) is tests/localai/ds4_args_test.py's.
"""

import threading
import time

import pytest

grpc = pytest.importorskip("grpc")

from localai_client import Backend, Prober, backend_env

from ds4jax.localai import backend_pb2 as pb
from ds4jax.testing.suite import CHUNK, CTX
from ds4jax.tokenizer import Tokenizer

ROUTE_TIMEOUT_S = 3
PROMPT = "Hello"
MAX_TOKENS = 8
START_TIMEOUT_S = 300
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def split(tiny_gguf, tiny_cache_dir, logs_dir, split_route, tmp_path_factory):
  kv_dir = tmp_path_factory.mktemp("kv")
  backend = Backend(backend_env(tiny_cache_dir), logs_dir / "backend.log")
  split_route.pause()  # no route until test_with_a_worker_predict_matches_generate
  try:
    with Prober(backend.stub) as probe:
      res = backend.stub.LoadModel(pb.ModelOptions(
          Model="tiny", ModelFile=tiny_gguf, ContextSize=CTX, Threads=2,
          Options=["ds4_role:coordinator", f"ds4_layers:{split_route.layers}",
                   f"ds4_listen:{split_route.listen}", f"ds4_route_timeout:{ROUTE_TIMEOUT_S}",
                   f"ds4_prefill_chunk:{CHUNK}", f"kv_cache_dir:{kv_dir}"]),
          timeout=START_TIMEOUT_S)
    yield dict(backend=backend, stub=backend.stub, load=res, load_probe=probe,
               route=split_route, tokenizer=Tokenizer.from_gguf(tiny_gguf), kv_dir=kv_dir,
               log=logs_dir / "backend.log")
  finally:
    split_route.resume()
    backend.stop()


def test_load_as_coordinator(split):
  res = split["load"]
  assert res.success, res.message
  assert split["route"].listen in res.message
  assert split["load_probe"].replies == {b"OK"}  # Health answered during LoadModel
  st = split["stub"].Status(pb.HealthMessage(), timeout=5)
  assert st.state == pb.StatusResponse.READY
  mem = st.memory.breakdown
  assert mem["stage 0:1@local"] > 0 and mem["model_process_rss"] > 0
  assert mem["tokenizer_process_rss"] > 0
  assert st.memory.total == sum(v for k, v in mem.items() if k.endswith("_rss"))


def test_identity_mismatch_is_not_found(split):
  """Refused before any route wait: a request waiting for the (absent) route would make the
  backend BUSY and end UNAVAILABLE."""
  stub = split["stub"]
  with Prober(stub, status=True) as probe:
    for call in (stub.Predict, stub.TokenizeString):
      with pytest.raises(grpc.RpcError) as e:
        call(pb.PredictOptions(Prompt=PROMPT, ModelIdentity="other-model"), timeout=10)
      assert e.value.code() == grpc.StatusCode.NOT_FOUND
      details = e.value.details()
      assert "model identity mismatch" in details and "other-model" in details
  assert pb.StatusResponse.BUSY not in probe.states


def test_route_timeout_is_unavailable_while_health_answers(split):
  stub = split["stub"]
  errors = {}

  def stream():
    try:
      list(stub.PredictStream(pb.PredictOptions(Prompt=PROMPT, Tokens=MAX_TOKENS), timeout=60))
    except grpc.RpcError as e:
      errors["stream"] = e

  t = threading.Thread(target=stream)
  with Prober(stub, status=True) as probe:
    t0 = time.monotonic()
    t.start()
    with pytest.raises(grpc.RpcError) as e:
      stub.Predict(pb.PredictOptions(Prompt=PROMPT, Tokens=MAX_TOKENS), timeout=60)
    waited = time.monotonic() - t0
    t.join(60)
  assert e.value.code() == grpc.StatusCode.UNAVAILABLE
  for err in (e.value, errors["stream"]):
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "route incomplete" in err.details() and "layers 2-3" in err.details(), err.details()
  assert waited >= ROUTE_TIMEOUT_S - 0.2, waited  # it waited for the route first
  assert probe.replies == {b"OK"} and len(probe.health_ms) >= 2  # Health answered meanwhile
  assert pb.StatusResponse.BUSY in probe.states  # requests waiting count as busy


def test_tokenize_and_detokenize(split):
  stub, tok = split["stub"], split["tokenizer"]
  r = stub.TokenizeString(pb.PredictOptions(Prompt=PROMPT, ModelIdentity="tiny"), timeout=10)
  assert list(r.tokens) == tok.encode(PROMPT, add_bos=True) and r.length == len(r.tokens)
  ids = tok.encode("Hello, world")
  assert stub.Detokenize(pb.DetokenizeRequest(tokens=ids), timeout=10).content == tok.decode(ids)
  with pytest.raises(grpc.RpcError) as e:
    stub.Detokenize(pb.DetokenizeRequest(tokens=[10**6]), timeout=10)
  assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _predict_until_route(stub, req):
  """Retries while the route is incomplete, as LocalAI's ds4 e2e spec does."""
  deadline = time.monotonic() + START_TIMEOUT_S
  while True:
    try:
      return stub.Predict(req, timeout=120)
    except grpc.RpcError as e:
      if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
        raise


def test_with_a_worker_predict_matches_generate(split, tiny_reference):
  split["route"].resume()
  req = pb.PredictOptions(Prompt=PROMPT, Tokens=MAX_TOKENS, ModelIdentity="tiny")
  r = _predict_until_route(split["stub"], req)
  ref = tiny_reference(PROMPT, MAX_TOKENS, chat=False)
  assert r.message.decode("utf-8") == ref.text
  assert r.tokens == len(ref.tokens) and r.prompt_tokens == len(ref.prompt_tokens)
  assert r.timing_prompt_processing > 0


def test_stream_chunks_concatenate_to_generate(split, tiny_reference):
  split["route"].resume()
  ref = tiny_reference(PROMPT, MAX_TOKENS, chat=False)
  chunks = list(split["stub"].PredictStream(
      pb.PredictOptions(Prompt=PROMPT, Tokens=MAX_TOKENS, Temperature=0.0), timeout=120))
  assert b"".join(c.message for c in chunks).decode("utf-8") == ref.text
  assert sum(1 for c in chunks if c.message) >= 2
  totals = [c.tokens for c in chunks]
  assert totals == sorted(totals) and totals[-1] == len(ref.tokens)
  assert {c.prompt_tokens for c in chunks} == {len(ref.prompt_tokens)}


def test_kv_cache_dir_skips_a_repeated_prefill_through_the_split(split):
  """ds4's kv_cache_dir through LocalAI, on the split: the first Predict of a long prompt
  stores the route's state (the worker's layers pulled over the bridge) at its last chunk
  boundary; the second loads it, computes only the tail, and says the same text."""
  split["route"].resume()
  prompt = "The quick brown fox jumps over the lazy dog. " * 2
  n = len(split["tokenizer"].encode(prompt))
  assert n > 2 * CHUNK
  req = pb.PredictOptions(Prompt=prompt, Tokens=4, ModelIdentity="tiny")
  first = _predict_until_route(split["stub"], req)
  assert any(split["kv_dir"].iterdir()), "no entry stored"
  second = split["stub"].Predict(req, timeout=120)
  assert second.message == first.message and second.prompt_tokens == first.prompt_tokens
  hits = [line for line in split["log"].read_text().splitlines()
          if "kv disk cache:" in line and "prompt tokens from" in line]
  want = (first.prompt_tokens - 1) // CHUNK * CHUNK
  assert hits and f"{want} of {first.prompt_tokens} prompt tokens" in hits[-1], hits


def test_chat_messages_with_the_tokenizer_template(split):
  tok = split["tokenizer"]
  req = pb.PredictOptions(Messages=[pb.Message(role="user", content=PROMPT)],
                          UseTokenizerTemplate=True, Tokens=4)
  r = split["stub"].Predict(req, timeout=120)
  assert r.prompt_tokens == len(tok.chat_prompt([("user", PROMPT)])) and r.tokens >= 1


def test_free_unloads(split):
  stub = split["stub"]
  assert stub.Free(pb.HealthMessage(), timeout=30).success
  assert stub.Status(pb.HealthMessage(), timeout=5).state == pb.StatusResponse.UNINITIALIZED
  with pytest.raises(grpc.RpcError) as e:
    stub.Predict(pb.PredictOptions(Prompt=PROMPT), timeout=10)
  assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
