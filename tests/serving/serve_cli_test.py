"""scripts/serve.py on bad input: one line on stderr, non-zero exit, no traceback; and the
model process's failure reaching the server as one line."""

import os
import socket
import subprocess
import sys

import pytest

from ds4jax.serving.remote import ModelProcess, ModelProcessError

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _serve(*args, timeout=120):
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "serve.py"), *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("args, needle", [
    (["--gguf=/nonexistent/m.gguf"], "GGUF file not found: /nonexistent/m.gguf"),
    (["--gguf=/nonexistent/m.gguf", "--http=nonsense"], "bad address 'nonsense'"),
    (["--gguf=/nonexistent/m.gguf", "--max_concurrency=0"], "max_concurrency"),
    (["--gguf=/nonexistent/m.gguf", "extra"], "unexpected arguments: extra"),
])
def test_bad_input_is_one_line(args, needle, tmp_path):
  r = _serve(*args, f"--cache_dir={tmp_path}")
  assert r.returncode != 0
  assert "Traceback" not in r.stderr, r.stderr
  err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and needle in err[0], r.stderr


def test_http_port_in_use_is_one_line(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    r = _serve("--gguf=/nonexistent/m.gguf", f"--http=127.0.0.1:{port}",
               f"--cache_dir={tmp_path}")
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert "address already in use" in r.stderr


def test_model_process_failure_reaches_the_server(tmp_path):
  bad = tmp_path / "not.gguf"
  bad.write_bytes(b"not a gguf at all")
  model = ModelProcess([f"--gguf={bad}", f"--cache_dir={tmp_path}"])
  try:
    with pytest.raises(ModelProcessError) as e:
      model.wait_ready(timeout=120)
    assert "not.gguf" in str(e.value) and "\n" not in str(e.value)
    ok, reason = model.route_ready()
    assert not ok and reason == str(e.value)
  finally:
    model.close()
  assert model.proc.returncode not in (None, 0)


@pytest.mark.parametrize("mode", [[], ["--in_process"]])
def test_bad_steering_dir_fails_before_the_load(mode, tiny_gguf, tmp_path):
  """--steering_dir (the files requests may name) is checked at start, in either process."""
  r = _serve(f"--gguf={tiny_gguf}", "--http=127.0.0.1:0", f"--steering_dir={tmp_path}/nope",
             f"--cache_dir={tmp_path}", *mode)
  assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
  err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  # The model process's own line, then the server's (the same message).
  assert err and all(f"--steering_dir is not a directory: {tmp_path}/nope" in line
                     for line in err)
