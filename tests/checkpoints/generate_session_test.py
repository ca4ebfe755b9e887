"""scripts/generate.py --save_session / --load_session: save after a few tokens on an
in-process split (from the orbax checkpoint), continue in a fresh process over the whole model;
the tokens equal one uninterrupted run. Bad snapshot paths are one-line errors."""

import json
import pathlib
import subprocess
import sys

import pytest

from ds4jax.testing.suite import CHUNK, CTX

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[2]
PROMPT = "0,17,42,5,88,19,20,301,7"


def generate(tiny_ckpt, cache, tmp_path, name, *args):
  out = tmp_path / f"{name}.json"
  r = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "generate.py"), f"--gguf={tiny_ckpt}",
       f"--cache_dir={cache}", f"--ctx_size={CTX}", f"--prefill_chunk={CHUNK}", "--nostream",
       f"--output_json={out}", *args],
      capture_output=True, text=True, timeout=300, cwd=str(REPO))
  return r, (json.loads(out.read_text())["tokens"] if r.returncode == 0 else None)


def test_save_then_load_continues_the_run(tiny_ckpt, tiny_cache_dir, tmp_path):
  snap = tmp_path / "snap"
  r, full = generate(tiny_ckpt, tiny_cache_dir, tmp_path, "full", f"--prompt_tokens={PROMPT}",
                     "--max_new_tokens=9")
  assert r.returncode == 0, r.stderr
  r, first = generate(tiny_ckpt, tiny_cache_dir, tmp_path, "first", "--layers=0:1,2:output",
                      f"--prompt_tokens={PROMPT}", "--max_new_tokens=4",
                      f"--save_session={snap}")
  assert r.returncode == 0, r.stderr
  assert "saved session: 13 tokens (12 with KV state)" in r.stderr
  r, rest = generate(tiny_ckpt, tiny_cache_dir, tmp_path, "rest", f"--load_session={snap}",
                     "--max_new_tokens=5")
  assert r.returncode == 0, r.stderr
  assert "restored session: 13 tokens" in r.stderr
  assert "prefill 1 tok" in r.stderr  # only the token after the snapshot was computed
  assert first + rest == full
  # A snapshot that is not one: one line, exit 2, no traceback.
  r, _ = generate(tiny_ckpt, tiny_cache_dir, tmp_path, "bad", f"--load_session={tmp_path}")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: snapshot")
