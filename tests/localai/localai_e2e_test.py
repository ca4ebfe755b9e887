"""Acceptance (issue 16): the LocalAI backend as the coordinator of a real split, on loopback.

One backend process (`scripts/localai_backend.py --addr`, as LocalAI spawns it) loads the tiny
model as a ds4 coordinator (`ds4_role:coordinator`, `ds4_layers:0:1`, `ds4_listen`, a 3 s
`ds4_route_timeout`), with no worker yet:
  1. Health answers in < 100 ms during LoadModel and while Predicts wait for the route;
  2. Predict and PredictStream get UNAVAILABLE after the timeout, naming layers 2-3 with
     ds4's "route incomplete" text; a wrong ModelIdentity gets NOT_FOUND at once;
then a worker joins with ds4-worker's spelling (`--role worker --model ... --coordinator HOST
PORT -c N`), and
  3. Predict and PredictStream give exactly `scripts/generate.py --nochat`'s greedy text
     (generate.py runs whole, as its own process), the chunks concatenate to it and carry
     running token totals;
  4. Free unloads: FAILED_PRECONDITION again.
"""

import json
import subprocess
import sys
import threading
import time

import pytest

grpc = pytest.importorskip("grpc")

from localai_client import REPO, Backend, Prober, assert_fast, backend_env

from ds4jax.local_cluster import free_port
from ds4jax.localai import backend_pb2 as pb
from ds4jax.tokenizer import Tokenizer

ROUTE_TIMEOUT_S = 3
CTX = 256
PROMPT = "Hello"
MAX_TOKENS = 8
START_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def split(tiny_gguf, tiny_cache_dir, logs_dir):
  env = backend_env(tiny_cache_dir)
  procs = {}
  ref_json = logs_dir / "generate.json"
  # The reference runs while the backend starts: generate.py, whole model, no chat format.
  procs["generate"] = subprocess.Popen(
      [sys.executable, str(REPO / "scripts" / "generate.py"), f"--gguf={tiny_gguf}",
       f"--prompt={PROMPT}", "--nochat", f"--max_new_tokens={MAX_TOKENS}", f"--ctx_size={CTX}",
       f"--output_json={ref_json}", "--nostream"], cwd=REPO, env=env,
      stdout=subprocess.DEVNULL, stderr=open(logs_dir / "generate.log", "w"))
  backend = Backend(env, logs_dir / "backend.log")
  port = free_port()
  try:
    with Prober(backend.stub) as probe:
      res = backend.stub.LoadModel(pb.ModelOptions(
          Model="tiny", ModelFile=tiny_gguf, ContextSize=CTX, Threads=2,
          Options=["ds4_role:coordinator", "ds4_layers:0:1", f"ds4_listen:127.0.0.1:{port}",
                   f"ds4_route_timeout:{ROUTE_TIMEOUT_S}",
                   # Prompts here fit one 8-token chunk: the worker's warm-up (sizes 1 and
                   # the chunk) then compiles exactly the shapes the tests use.
                   "ds4_prefill_chunk:8"]), timeout=START_TIMEOUT_S)

    def start_worker():
      procs["worker"] = subprocess.Popen(
          [sys.executable, str(REPO / "scripts" / "worker.py"), "--role", "worker", "--model",
           tiny_gguf, "--layers", "2:output", "--coordinator", "127.0.0.1", str(port), "-c",
           str(CTX), "-t", "2"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
          stderr=open(logs_dir / "worker.log", "w"))

    yield dict(backend=backend, stub=backend.stub, load=res, load_health_ms=probe.health_ms,
               port=port, start_worker=start_worker, procs=procs, ref_json=ref_json,
               tokenizer=Tokenizer.from_gguf(tiny_gguf))
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.terminate()
        p.wait(15)
    backend.stop()


def _reference(split):
  assert split["procs"]["generate"].wait(START_TIMEOUT_S) == 0, "generate.py failed"
  with open(split["ref_json"]) as f:
    return json.load(f)


def test_load_as_coordinator(split):
  res = split["load"]
  assert res.success, res.message
  assert f"127.0.0.1:{split['port']}" in res.message
  assert_fast(split["load_health_ms"], n_min=3)
  st = split["stub"].Status(pb.HealthMessage(), timeout=5)
  assert st.state == pb.StatusResponse.READY
  mem = st.memory.breakdown
  assert mem["stage 0:1@local"] > 0 and mem["model_process_rss"] > 0
  assert mem["tokenizer_process_rss"] > 0
  assert st.memory.total == sum(v for k, v in mem.items() if k.endswith("_rss"))


def test_identity_mismatch_is_not_found(split):
  stub = split["stub"]
  t0 = time.monotonic()
  for call in (stub.Predict, stub.TokenizeString):
    with pytest.raises(grpc.RpcError) as e:
      call(pb.PredictOptions(Prompt=PROMPT, ModelIdentity="other-model"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model identity mismatch" in e.value.details() and "other-model" in e.value.details()
  assert time.monotonic() - t0 < ROUTE_TIMEOUT_S  # checked before any route wait


def test_route_timeout_is_unavailable_and_health_stays_fast(split):
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
    t.join(30)
  assert e.value.code() == grpc.StatusCode.UNAVAILABLE
  for err in (e.value, errors["stream"]):
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "route incomplete" in err.details() and "layers 2-3" in err.details(), err.details()
  assert ROUTE_TIMEOUT_S - 0.2 <= waited < ROUTE_TIMEOUT_S + 10, waited
  assert probe.replies == {b"OK"}
  assert_fast(probe.health_ms)
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


def test_with_a_worker_predict_matches_generate(split):
  split["start_worker"]()
  req = pb.PredictOptions(Prompt=PROMPT, Tokens=MAX_TOKENS, ModelIdentity="tiny")
  r = _predict_until_route(split["stub"], req)
  ref = _reference(split)
  assert r.message.decode("utf-8") == ref["text"]
  assert r.tokens == len(ref["tokens"]) and r.prompt_tokens == len(ref["prompt_tokens"])
  assert r.timing_prompt_processing > 0


def test_stream_chunks_concatenate_to_generate(split):
  ref = _reference(split)
  chunks = list(split["stub"].PredictStream(
      pb.PredictOptions(Prompt=PROMPT, Tokens=MAX_TOKENS, Temperature=0.0), timeout=120))
  assert b"".join(c.message for c in chunks).decode("utf-8") == ref["text"]
  assert sum(1 for c in chunks if c.message) >= 2
  totals = [c.tokens for c in chunks]
  assert totals == sorted(totals) and totals[-1] == len(ref["tokens"])
  assert {c.prompt_tokens for c in chunks} == {len(ref["prompt_tokens"])}


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
