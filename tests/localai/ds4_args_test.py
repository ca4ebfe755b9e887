"""Worker CLI parity: ds4-worker's spelling (what LocalAI's --ds4-args pass) on scripts/worker.py:
the translation, the one-line errors, and the whole spelling reaching the worker's loader."""

import os
import subprocess
import sys

import pytest
from localai_client import REPO

from ds4jax.localai.ds4_args import Ds4ArgsError, translate


def test_ds4_spelling_becomes_worker_flags(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  got = translate(["w", "--role", "worker", "--model", "/m.gguf", "--layers", "20:output",
                   "--coordinator", "10.0.0.1", "1234", "-c", "8192", "-t", "8", "--cpu",
                   "--max_sessions=4"])
  assert got == ["w", "--gguf=/m.gguf", "--layers", "20:output",
                 "--coordinator=10.0.0.1:1234", "--ctx=8192", "--max_sessions=4"]
  assert os.environ["JAX_PLATFORMS"] == "cpu"
  got = translate(["w", "--role=worker", "-m", "/m.gguf", "--layers", "2:3", "--coordinator",
                   "h", "7", "--ctx", "512", "--threads", "2", "--debug"], ctx_flag="ctx_size")
  assert got == ["w", "--gguf=/m.gguf", "--layers", "2:3", "--coordinator=h:7",
                 "--ctx_size=512"]


def test_our_spelling_passes_through():
  argv = ["w", "--gguf=/m.gguf", "--layers=2:output", "--coordinator=h:7", "--ctx=256"]
  assert translate(argv) == argv
  argv = ["w", "--gguf", "/m.gguf", "--coordinator", "h:7"]
  assert translate(argv) == argv


@pytest.mark.parametrize("args, needle", [
    (["--role", "coordinator", "--model", "m"], "--role coordinator: this is the worker"),
    (["--role", "worker", "--layers", "1:2"], "need --model PATH"),
    (["--role", "worker", "--model"], "--model needs a value"),
    (["--role", "worker", "--model", "m", "--coordinator", "h"], "--coordinator needs 2 values"),
    (["--role", "worker", "--model", "m", "--coordinator", "h", "0"], "port must be 1..65535"),
])
def test_bad_ds4_arguments(args, needle):
  with pytest.raises(Ds4ArgsError, match=needle):
    translate(["w", *args])


@pytest.mark.e2e
def test_worker_script_one_line_errors(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", DS4JAX_CACHE=str(tmp_path))
  for args, needle in [(["--role", "coordinator", "--model", "x"], "this is the worker"),
                       (["--role", "worker", "--model", str(tmp_path / "nope.gguf"),
                         "--layers", "2:output", "--coordinator", "127.0.0.1", "7070", "-c",
                         "128", "-t", "2"], "GGUF file not found")]:
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "worker.py"), *args], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], p.stderr
