"""scripts/chat.py --save_session / --load_session: a chat saved after one turn and continued
in a new process equals the uninterrupted chat (same reply, same transcript, same number of
computed tokens; the uninterrupted chat runs in this process, as chat.py runs it, at the same
shapes). Bad session paths are one-line errors before the model loads."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from ds4jax.testing.suite import CHUNK, CTX

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[2]
# The suite's shapes: this first turn reuses the compilations of scripts_test's chat.
COMMON = ["--gguf=tiny", "--max_new_tokens=4", f"--ctx_size={CTX}", f"--prefill_chunk={CHUNK}"]
TURN = re.compile(r"^\[turn \d+: computed (\d+) of (\d+) prompt tokens", re.M)


@pytest.fixture(scope="module")
def env(tiny_gguf, tiny_cache_dir):
  e = dict(os.environ, DS4JAX_CACHE=tiny_cache_dir, JAX_PLATFORMS="cpu")
  e.pop("DS4JAX_KEY", None)
  return e


def chat(env, *lines, args=()):
  """Runs chat.py on `lines` as stdin; returns (process, replies, [(computed, of)] per turn)."""
  p = subprocess.run([sys.executable, str(REPO / "scripts" / "chat.py"), *COMMON, *args],
                     input="".join(f"{l}\n" for l in lines), env=env, cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  replies = p.stdout.split("assistant> ")[1:]
  return p, replies, [tuple(map(int, m)) for m in TURN.findall(p.stderr)]


def transcript(d: pathlib.Path) -> list[int]:
  return json.loads((d / "snapshot.json").read_text())["tokens"]


def uninterrupted(reference, *lines):
  """The chat chat.py runs, in this process on the whole model at the same shapes: (replies,
  [(computed, of)] per turn, transcript)."""
  chat = reference.generator.chat()
  replies, turns = [], []
  try:
    for line in lines:
      stream = chat.stream(line, max_new_tokens=4)
      replies.append("".join(stream))
      res = stream.result
      turns.append((res.n_prefill_computed, len(res.prompt_tokens)))
    return replies, turns, list(chat.transcript)
  finally:
    chat.close()


def test_saved_chat_continues_like_the_uninterrupted_one(env, tmp_path, tiny_reference):
  first, rest = tmp_path / "first", tmp_path / "rest"
  replies, turns, whole = uninterrupted(tiny_reference, "Hello, world", "And then?")
  assert len(replies) == 2 and turns[1][0] < turns[1][1]

  p, replies1, _ = chat(env, "Hello, world", args=[f"--save_session={first}"])
  assert p.returncode == 0, p.stderr
  assert f"to {first}" in p.stderr and replies1 == replies[:1]

  p, replies2, turns2 = chat(env, "And then?", args=[f"--load_session={first}",
                                                      f"--save_session={rest}"])
  assert p.returncode == 0, p.stderr
  assert f"restored session: {len(transcript(first))} tokens" in p.stderr
  # The same reply, computing only the new turn (as many tokens as the uninterrupted chat),
  # and the same transcript token for token.
  assert replies2 == replies[1:]
  assert turns2 == turns[1:]
  assert transcript(rest) == whole
  assert whole[:len(transcript(first))] == transcript(first)


def test_bad_session_paths_are_one_line_errors(env, tmp_path):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")
  for args, msg in [([f"--load_session={tmp_path / 'nope'}"], "not a directory"),
                    ([f"--load_session={tmp_path}"], "not a session snapshot"),
                    ([f"--save_session={not_a_dir}"], "is not a session snapshot")]:
    p, _, _ = chat(env, "Hello", args=args)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and msg in errors[0], p.stderr
    assert "route:" not in p.stderr  # refused before the model was loaded
