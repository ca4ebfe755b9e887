"""generate.py and chat.py --capture / --capture_layers / --capture_out (issue 22), as a user
runs them."""

import json

import numpy as np
import pytest

from scripts_test import SHAPES, assert_one_line_error, env, run  # noqa: F401 (env: a fixture)

pytestmark = pytest.mark.e2e


def test_generate_writes_the_captured_npz(env, tmp_path):  # noqa: F811
  out, js = tmp_path / "cap.npz", tmp_path / "out.json"
  p = run("generate.py", "--gguf=tiny", "--prompt=Hello, world", "--max_new_tokens=3",
          *SHAPES, "--capture=ffn_out,router_ids,lens,logits",
          "--capture_layers=1:2", f"--capture_out={out}", f"--output_json={js}", env=env)
  assert p.returncode == 0, p.stderr
  d = json.loads(js.read_text())
  n = len(d["prompt_tokens"]) + len(d["tokens"]) - 1  # the prompt, then each token fed back
  with np.load(out) as z:
    assert sorted(z.files) == ["ffn_out.1", "ffn_out.2", "lens.1", "lens.2", "logits",
                               "positions", "router_ids.1", "router_ids.2"]
    assert z["positions"].tolist() == list(range(n))
    assert z["ffn_out.2"].shape == (n, 256) and z["router_ids.1"].dtype == np.int32
    assert z["lens.1"].shape == z["logits"].shape == (n, 512)
    # each greedy token is the argmax of the captured logits of the position before it
    assert z["logits"].argmax(-1)[len(d["prompt_tokens"]) - 1:].tolist() == d["tokens"]
  assert f"captured 7 arrays x {n} positions" in p.stderr


def test_chat_captures_every_turn(env, tmp_path):  # noqa: F811
  """Two turns: the arrays cover every position the chat computed, in order, once (each turn
  computes only its new tokens: the prefix is reused)."""
  out = tmp_path / "chat.npz"
  p = run("chat.py", "--gguf=tiny", "--max_new_tokens=3", *SHAPES,
          "--capture=router_ids,logits", "--capture_layers=1", f"--capture_out={out}",
          env=env, stdin="Hello\nworld\n")
  assert p.returncode == 0, p.stderr
  assert "captured 2 turns" in p.stderr
  with np.load(out) as z:
    assert sorted(z.files) == ["logits", "positions", "router_ids.1"]
    n = len(z["positions"])
    assert z["positions"].tolist() == list(range(n)) and n > 6
    assert z["router_ids.1"].shape == (n, 2) and z["logits"].shape == (n, 512)


def test_bad_capture_flags_are_one_line_errors(env, tmp_path):  # noqa: F811
  base = ["generate.py", "--gguf=tiny", "--prompt=x", *SHAPES, f"--capture_out={tmp_path}/c.npz"]
  assert_one_line_error(run(*base, "--capture=ffn_out,nope", env=env),
                        "unknown capture point 'nope'")
  assert_one_line_error(run(*base, "--capture=ffn_out", "--capture_layers=2:9", env=env),
                        "capture layer 4 is out of range")
  assert_one_line_error(run("generate.py", "--gguf=tiny", "--prompt=x", "--capture=lens",
                            env=env), "--capture and --capture_out go together")
  assert_one_line_error(run("chat.py", "--gguf=tiny", *SHAPES, "--capture=nope",
                            f"--capture_out={tmp_path}/c.npz", env=env, stdin=""),
                        "unknown capture point 'nope'")


def test_generate_steers_with_a_ds4_direction_file(env, tmp_path, tiny_gguf):  # noqa: F811
  """--dir_steering_file/--dir_steering_ffn (ds4's spelling): the script's greedy tokens are
  the in-process Generator's with the same steering, and differ from the plain run."""
  from ds4jax import build
  from ds4jax.generate.loop import Generator
  from ds4jax.runtime import sources
  from ds4jax.runtime.edits import Interventions
  cfg, _ = sources.model_info(tiny_gguf)
  dirs = np.random.default_rng(3).standard_normal((cfg.n_layers, cfg.d_model))
  (dirs / np.linalg.norm(dirs, axis=1, keepdims=True)).astype("<f4").tofile(tmp_path / "d.f32")
  common = ["generate.py", "--gguf=tiny", "--prompt=Hello, world", "--max_new_tokens=8",
            "--nochat", *SHAPES]
  outs = {}
  for name, extra in (("plain", []), ("steered", [f"--dir_steering_file={tmp_path}/d.f32",
                                                  "--dir_steering_ffn=2"])):
    p = run(*common, *extra, f"--output_json={tmp_path}/{name}.json", env=env)
    assert p.returncode == 0, p.stderr
    outs[name] = json.loads((tmp_path / f"{name}.json").read_text())["tokens"]
  assert outs["steered"] != outs["plain"]
  tok = sources.open_tokenizer(tiny_gguf)
  be = build.local_backend(tiny_gguf, ctx_size=128, prefill_chunk=16)  # the script's shapes
  try:
    ref = Generator(be, tok).generate(
        "Hello, world", max_new_tokens=8,
        edits=Interventions.ds4_steering(tmp_path / "d.f32", cfg, ffn=2.0))
  finally:
    be.close()
  assert outs["steered"] == ref.tokens
  # A file of the wrong size, and scales without a file: one line each, before any load.
  (tmp_path / "bad.f32").write_bytes(b"\0" * 12)
  assert_one_line_error(run(*common, f"--dir_steering_file={tmp_path}/bad.f32", env=env),
                        "needs L x D = 4 x 256 float32")
  assert_one_line_error(run(*common, "--dir_steering_ffn=1", env=env),
                        "need --dir_steering_file")
  assert_one_line_error(run(*common, f"--expert_steering_file={tmp_path}/bad.f32", env=env),
                        "needs L x E = 4 x 8 float32")
