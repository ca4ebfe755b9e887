"""TLS + pre-shared key from the command line, over real processes: generate.py --listen with
--tls_cert/--tls_key/--key_file generates with scripts/worker.py --tls_ca/--key_file; a worker
that does not trust the certificate exits 2 with the reason."""

import json
import os
import subprocess
import sys

import pytest

from ds4jax import local_cluster
from ds4jax.testing.suite import CHUNK, CTX

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--prompt_tokens=7,300,42,9,1,77", "--max_new_tokens=4", f"--ctx_size={CTX}",
          f"--prefill_chunk={CHUNK}", "--nostream"]


def script(name, *args, cache):
  env = {k: v for k, v in os.environ.items() if k != "DS4JAX_KEY"}
  env["JAX_PLATFORMS"] = "cpu"
  return [sys.executable, os.path.join(ROOT, "scripts", name), *args, f"--cache_dir={cache}"], env


def test_tls_and_key_split_generation(tiny_gguf, tiny_cache_dir, tmp_path):
  pytest.importorskip("cryptography")
  from ds4jax.testing.certs import make_self_signed
  cert, key = make_self_signed(str(tmp_path), "coord")
  other, _ = make_self_signed(str(tmp_path), "other")
  key_file = tmp_path / "bridge.key"
  key_file.write_bytes(os.urandom(24).hex().encode())
  key_file.chmod(0o600)
  port = local_cluster.free_port()
  worker_args = [f"--gguf={tiny_gguf}", "--layers=2:output", f"--coordinator=127.0.0.1:{port}",
                 f"--ctx_size={CTX}", "--backoff_min=0.1", "--backoff_max=0.5",
                 f"--key_file={key_file}", "--exit_with_parent"]
  cmd, env = script("worker.py", *worker_args, f"--tls_ca={cert}", cache=tiny_cache_dir)
  good = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  cmd, env = script("worker.py", *worker_args, f"--tls_ca={other}", cache=tiny_cache_dir)
  untrusting = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
  try:
    cmd, env = script("generate.py", f"--gguf={tiny_gguf}", *COMMON, "--layers=0:1",
                      f"--listen=127.0.0.1:{port}", f"--tls_cert={cert}", f"--tls_key={key}",
                      f"--key_file={key_file}", "--route_timeout=120",
                      f"--output_json={tmp_path}/split.json", cache=tiny_cache_dir)
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    err = untrusting.communicate(timeout=60)[1]
    assert untrusting.returncode == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "certificate verify failed" in last, last
  finally:
    for w in (good, untrusting):
      if w.poll() is None:
        w.kill()
      w.communicate()
  split = json.loads((tmp_path / "split.json").read_text())
  assert len(split["tokens"]) == 4
  assert [h["layers"] for h in split["route"]["route"]] == ["0:1", "2:output"]
  assert all(h["bytes_in"] > 0 for h in split["hops"][1:])
  # Exactness of the split itself is covered by e2e_test and scripts_test (same code path
  # after the handshake); a one-process reference here would double this test's time.
