"""LocalAI packaging: localai/ds4jax/run.sh starts the server from an installed copy of the
backend directory (as LocalAI spawns it), ds4-worker and the console entry points run the
worker, the requirements match the `localai` extra, and a missing extra is one line."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from localai_client import REPO, Backend, backend_env

from ds4jax import extras
from ds4jax.testing.suite import CHUNK, CTX

BACKEND_DIR = REPO / "localai" / "ds4jax"


@pytest.fixture
def installed(tmp_path):
  """The backend directory copied into a LocalAI backends path."""
  dest = tmp_path / "backends" / "ds4jax"
  shutil.copytree(BACKEND_DIR, dest)
  return dest


@pytest.mark.parametrize("python_from", ["env", "venv"])
@pytest.mark.e2e
def test_run_sh_starts_the_server(installed, tiny_cache_dir, logs_dir, python_from):
  pytest.importorskip("grpc")
  from ds4jax.localai import backend_pb2 as pb
  env = backend_env(tiny_cache_dir)
  if python_from == "env":
    env["DS4JAX_PYTHON"] = sys.executable
  else:  # what install.sh leaves behind: venv/bin/python next to run.sh
    (installed / "venv" / "bin").mkdir(parents=True)
    py = installed / "venv" / "bin" / "python"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    py.chmod(0o755)
  b = Backend(env, logs_dir / f"run_sh_{python_from}.log", argv=[str(installed / "run.sh")],
              cwd=installed)
  try:
    assert b.stub.Health(pb.HealthMessage(), timeout=10).message == b"OK"
    assert b.stub.Status(pb.HealthMessage(), timeout=10).state == pb.StatusResponse.UNINITIALIZED
  finally:
    assert b.stop() == 0


@pytest.mark.e2e
def test_ds4_worker_and_entry_points_run_the_worker(installed, tmp_path):
  env = dict(os.environ, DS4JAX_PYTHON=sys.executable, JAX_PLATFORMS="cpu",
             DS4JAX_CACHE=str(tmp_path))
  p = subprocess.run([str(installed / "ds4-worker"), "--role", "coordinator", "--model", "m"],
                     env=env, capture_output=True, text=True, timeout=60)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert p.stderr.strip().startswith("error: --role coordinator: this is the worker")
  from ds4jax import entry_points
  assert entry_points.scripts_dir() == REPO / "scripts"
  for name in ("worker", "generate", "serve", "localai"):
    assert callable(getattr(entry_points, name))


def test_pyproject_declares_the_extra_and_entry_points():
  tomllib = pytest.importorskip("tomllib")
  with open(REPO / "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
  reqs = [l.strip() for l in (BACKEND_DIR / "requirements.txt").read_text().splitlines()
          if l.strip() and not l.startswith("#")]
  assert reqs == project["optional-dependencies"]["localai"]
  scripts = project["scripts"]
  assert {"ds4jax-worker", "ds4jax-generate", "ds4jax-serve", "ds4jax-localai"} <= set(scripts)
  assert all(v.startswith("ds4jax.entry_points:") for v in scripts.values())
  meta = json.loads((BACKEND_DIR / "metadata.json").read_text())
  assert meta["name"] == "ds4jax"
  for f in ("run.sh", "install.sh", "ds4-worker"):
    assert os.access(BACKEND_DIR / f, os.X_OK), f


def _blocked(tmp_path, *modules):
  """A PYTHONPATH entry under which importing `modules` fails as if they were not installed."""
  d = tmp_path / "blocked"
  for m in modules:
    pkg = d / m
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        f"raise ModuleNotFoundError({f'No module named {m!r}'!r}, name={m!r})\n")
  return f"{d}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"


@pytest.mark.parametrize("script, args, blocked, needle", [
    ("serve.py", ["--gguf=tiny", "--http=127.0.0.1:0"], ["uvicorn", "fastapi"],
     "scripts/serve.py needs the 'serve' extra: pip install 'ds4jax[serve]'"),
    ("localai_backend.py", ["--addr", "127.0.0.1:0"], ["grpc"],
     "the LocalAI backend needs the 'localai' extra: pip install 'ds4jax[localai]'"),
])
@pytest.mark.e2e
def test_missing_extra_is_one_line(tmp_path, script, args, blocked, needle):
  env = backend_env(tmp_path, PYTHONPATH=_blocked(tmp_path, *blocked))
  p = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], env=env, cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and needle in lines[0], p.stderr


def test_missing_reference_extra(monkeypatch):
  from ds4jax.config import ModelConfig
  from ds4jax.gguf.hf import hf_config_from_cfg
  monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
  with pytest.raises(extras.MissingExtra, match=r"needs the 'reference' extra: pip install "
                     r"'ds4jax\[reference\]' \(no module named 'transformers'\)"):
    hf_config_from_cfg(ModelConfig.tiny())


@pytest.mark.e2e
def test_localai_e2e_suite_steps(installed, tiny_gguf, tiny_cache_dir, logs_dir, tiny_reference):
  """The steps and checks of LocalAI's Go suite (tests/e2e-backends/backend_test.go, caps
  health,load,predict,tokenize,stream), which cannot run here (no Go 1.26 toolchain nor module
  proxy): run.sh spawned with one `--addr=` token, LoadModel with Model = ModelFile = the
  file, then Predict / TokenizeString / PredictStream with the suite's sampling. Whole model in
  one process (no ds4 options), so this is also the single-node path: the texts are the
  in-process model's for the same sampling (seed 0, LocalAI's unset Seed)."""
  pytest.importorskip("grpc")
  import grpc

  from ds4jax.localai import backend_pb2 as pb
  from ds4jax.runtime.sampling import SamplingParams
  env = backend_env(tiny_cache_dir, DS4JAX_PYTHON=sys.executable)
  b = Backend(env, logs_dir / "e2e_suite.log", argv=[str(installed / "run.sh")], cwd=installed,
              one_token=True)
  suite = SamplingParams(temperature=0.1, top_k=40, top_p=0.9, seed=0)
  try:
    assert b.stub.Health(pb.HealthMessage(), timeout=10).message
    res = b.stub.LoadModel(pb.ModelOptions(Model=tiny_gguf, ModelFile=tiny_gguf,
                                           ContextSize=CTX, Threads=4, NBatch=CHUNK),
                           timeout=600)  # the suite sends 512 unless BACKEND_TEST_CTX_SIZE
    assert res.success, res.message
    sampling = dict(Tokens=20, Temperature=0.1, TopK=40, TopP=0.9)
    r = b.stub.Predict(pb.PredictOptions(Prompt="The capital of France is", **sampling),
                       timeout=120)
    want = tiny_reference("The capital of France is", 20, sampling=suite)
    assert r.message.decode("utf-8") == want.text
    assert r.tokens == len(want.tokens) and r.prompt_tokens == len(want.prompt_tokens)
    t = b.stub.TokenizeString(pb.PredictOptions(Prompt="The capital of France is"), timeout=60)
    assert len(t.tokens) == r.prompt_tokens
    chunks = [c.message for c in b.stub.PredictStream(
        pb.PredictOptions(Prompt="Once upon a time", **sampling), timeout=120) if c.message]
    assert len(chunks) >= 2
    assert b"".join(chunks).decode("utf-8") == tiny_reference("Once upon a time", 20,
                                                              sampling=suite).text
    with pytest.raises(grpc.RpcError) as e:  # the loaded Model is the file path here
      b.stub.Predict(pb.PredictOptions(Prompt="x", ModelIdentity="other"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
  finally:
    b.stop()
