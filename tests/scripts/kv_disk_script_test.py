"""generate.py --kv_disk_dir (ds4's disk KV cache, issue 23 item 3) as a user runs it: two
processes with the same 300-token prompt give the same tokens, and the second loads the
longest stored prefix instead of computing it. Bad flags are one-line errors."""

import json

import numpy as np
import pytest

from scripts_test import assert_one_line_error, env, run  # noqa: F401 (env: a fixture)
from ds4jax.testing.suite import CHUNK

pytestmark = pytest.mark.e2e

# The one test at a bigger context than the suite's (CTX=128): the 300-token prompt.
CTX_300 = 320
PROMPT = "0," + ",".join(str(t) for t in np.random.default_rng(300).integers(3, 500, size=299))


def test_a_second_process_loads_the_prompt_from_disk(env, tmp_path):  # noqa: F811
  args = ["generate.py", "--gguf=tiny", f"--prompt_tokens={PROMPT}", "--max_new_tokens=4",
          f"--ctx_size={CTX_300}", f"--prefill_chunk={CHUNK}", f"--kv_disk_dir={tmp_path}/kv",
          "--nostream"]
  outs = []
  for name in ("first", "second"):
    p = run(*args, f"--output_json={tmp_path}/{name}.json", env=env)
    assert p.returncode == 0, p.stderr
    outs.append((json.loads((tmp_path / f"{name}.json").read_text()), p.stderr))
  (first, _), (second, err) = outs
  assert first["cached_prompt_tokens"] == 0 and first["n_prefill_computed"] == 300
  assert second["tokens"] == first["tokens"]
  # The last boundary <= 299 is 288 (CHUNK 16): >= 256, and only 12 tokens are computed.
  assert second["cached_prompt_tokens"] == 288 and second["n_prefill_computed"] == 12
  assert second["timings"]["prefill_tokens"] == 12
  assert "(288 cached)" in err and "kv disk cache: 288 of 300 prompt tokens" in err


def test_bad_kv_disk_flags_are_one_line_errors(env, tmp_path):  # noqa: F811
  (tmp_path / "f").write_text("x")
  assert_one_line_error(run("generate.py", "--gguf=tiny", "--prompt=x", "--kv_disk_space_mb=64",
                            env=env), "--kv_disk_space_mb needs --kv_disk_dir")
  assert_one_line_error(run("generate.py", "--gguf=tiny", "--prompt=x",
                            f"--kv_disk_dir={tmp_path}/f", env=env), "is a file, not a directory")
  assert_one_line_error(run("chat.py", "--gguf=tiny", f"--kv_disk_dir={tmp_path}/f", env=env,
                            stdin=""), "is a file, not a directory")
