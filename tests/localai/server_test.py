"""The backend over real gRPC without a loaded model: Health, Status, FAILED_PRECONDITION
before a load, success=false for every kind of bad LoadModel, bearer auth, and the command
line's one-line errors. One backend process per module (about a second to start)."""

import socket
import subprocess
import sys
import time

import pytest

grpc = pytest.importorskip("grpc")

from localai_client import REPO, Backend, backend_env

from ds4jax.localai import backend_pb2 as pb

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def backend(tiny_cache_dir, logs_dir):
  b = Backend(backend_env(tiny_cache_dir), logs_dir / "backend.log", one_token=True)
  yield b
  assert b.stop() == 0  # SIGTERM is a clean exit


def test_health_and_status_before_load(backend):
  assert backend.stub.Health(pb.HealthMessage(), timeout=60).message == b"OK"
  st = backend.stub.Status(pb.HealthMessage(), timeout=5)
  assert st.state == pb.StatusResponse.UNINITIALIZED
  assert st.memory.total > 0 and st.memory.breakdown["backend_rss"] == st.memory.total


@pytest.mark.parametrize("rpc", ["Predict", "PredictStream", "TokenizeString"])
def test_failed_precondition_before_load(backend, rpc):
  call = getattr(backend.stub, rpc)
  with pytest.raises(grpc.RpcError) as e:
    r = call(pb.PredictOptions(Prompt="Hi", Tokens=4), timeout=10)
    if rpc == "PredictStream":
      list(r)
  assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
  assert "model not loaded" in e.value.details()
  with pytest.raises(grpc.RpcError) as e:
    backend.stub.Detokenize(pb.DetokenizeRequest(tokens=[1, 2]), timeout=10)
  assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def _occupied_port():
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  s.listen(1)
  return s


def test_bad_load_options_are_success_false(backend, tiny_gguf, tmp_path):
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"not a gguf")
  busy = _occupied_port()
  coordinator = ["ds4_role:coordinator", "ds4_layers:0:1"]
  cases = [
      (tiny_gguf, ["ds4_role:coordinator", "ds4_layers:0:x", "ds4_listen:127.0.0.1:7070"],
       "ds4: invalid ds4_layers (want START:END or START:output)"),
      (tiny_gguf, ["ds4_role:coordinator", "ds4_layers:0:9", "ds4_listen:127.0.0.1:7070"],
       "ends past the final model layer 3"),
      (tiny_gguf, coordinator, "ds4: ds4_role:coordinator requires ds4_layers and ds4_listen"),
      (tiny_gguf, coordinator + ["ds4_listen:127.0.0.1:port"],
       "ds4: ds4_listen port must be a positive integer"),
      (tiny_gguf, coordinator + [f"ds4_listen:127.0.0.1:{busy.getsockname()[1]}"],
       "address already in use"),
      (tiny_gguf, ["ds4_route_timeout:-5"], "ds4: ds4_route_timeout must be a positive integer"),
      (str(tmp_path / "missing.gguf"), [], "ds4: model file not found"),
      (str(junk), [], "not a GGUF file"),
  ]
  try:
    for path, opts, needle in cases:
      r = backend.stub.LoadModel(pb.ModelOptions(Model="tiny", ModelFile=path, Options=opts),
                                 timeout=60)
      assert not r.success and needle in r.message and "\n" not in r.message, (opts, r.message)
  finally:
    busy.close()
  # Still nothing loaded: requests say so, and Status too.
  with pytest.raises(grpc.RpcError) as e:
    backend.stub.Predict(pb.PredictOptions(Prompt="Hi"), timeout=10)
  assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
  assert backend.stub.Status(pb.HealthMessage()).state == pb.StatusResponse.UNINITIALIZED
  assert backend.stub.Free(pb.HealthMessage(), timeout=10).success


def test_bearer_token(tiny_cache_dir, logs_dir):
  b = Backend(backend_env(tiny_cache_dir, LOCALAI_GRPC_AUTH_TOKEN="s3cret"),
              logs_dir / "auth.log")
  try:
    good = [("authorization", "Bearer s3cret")]
    for md in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
      with pytest.raises(grpc.RpcError) as e:
        b.stub.Health(pb.HealthMessage(), metadata=md, timeout=10)
      assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
      with pytest.raises(grpc.RpcError) as e:
        list(b.stub.PredictStream(pb.PredictOptions(Prompt="x"), metadata=md, timeout=10))
      assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert b.stub.Health(pb.HealthMessage(), metadata=good, timeout=10).message == b"OK"
    with pytest.raises(grpc.RpcError) as e:  # authenticated: the backend's own answer
      b.stub.Predict(pb.PredictOptions(Prompt="x"), metadata=good, timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
  finally:
    b.stop()


@pytest.mark.parametrize("args, needle", [
    (["--addr", "nonsense"], "bad address 'nonsense'"),
    (["--addr=127.0.0.1:1", "extra"], "unexpected arguments: extra"),
    (["--nope"], "nope"),
])
def test_command_line_one_line_errors(args, needle, tmp_path):
  p = subprocess.run([sys.executable, str(REPO / "scripts" / "localai_backend.py"), *args],
                     env=backend_env(tmp_path), cwd=REPO, capture_output=True, text=True,
                     timeout=60)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and needle in lines[0], p.stderr


def test_addr_in_use_is_one_line(tmp_path):
  busy = _occupied_port()
  try:
    port = busy.getsockname()[1]
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "localai_backend.py"), "--addr",
                        f"127.0.0.1:{port}"], env=backend_env(tmp_path), cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  finally:
    busy.close()
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert f"error: cannot listen on 127.0.0.1:{port}" in p.stderr
