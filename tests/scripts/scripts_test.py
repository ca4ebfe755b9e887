"""The launch scripts as a user runs them: real processes, loopback only.

All runs share the suite's cache dir ($DS4JAX_CACHE) and its standard shapes (CTX, CHUNK), so
the tiny GGUF is built once and XLA compilations are reused across scripts through the
persistent compilation cache.
"""

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from ds4jax.testing.suite import CHUNK, CTX
from ds4jax.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]
SHAPES = [f"--ctx_size={CTX}", f"--prefill_chunk={CHUNK}"]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def env(tiny_gguf, tiny_cache_dir):
  e = dict(os.environ, DS4JAX_CACHE=tiny_cache_dir, JAX_PLATFORMS="cpu")
  e.pop("DS4JAX_KEY", None)
  return e


def run(script, *args, env, timeout=300, stdin=None):
  return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=timeout, input=stdin)


def assert_one_line_error(p, pattern):
  assert p.returncode != 0, p.stdout + p.stderr
  assert "Traceback" not in p.stderr, p.stderr
  lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and pattern in lines[0], p.stderr


# ---------------------------------------------------------------------------- errors
def test_bad_flag_value(env):
  p = run("generate.py", "--gguf=tiny", "--prompt=x", "--temperature=hot", env=env)
  assert_one_line_error(p, "--temperature=hot")
  assert p.stderr.strip().count("\n") == 0
  p = run("generate.py", "--gguf=tiny", "--prompt=x", "--activation_dtype=f8", env=env)
  assert_one_line_error(p, "activation_dtype")


def test_missing_file(env, tmp_path):
  p = run("generate.py", f"--gguf={tmp_path}/nope.gguf", "--prompt=x", env=env)
  assert_one_line_error(p, "GGUF file not found")
  p = run("generate.py", "--config=configs/nope.py", env=env)
  assert_one_line_error(p, "nope.py")


def test_unknown_config_field_is_named_with_the_fields(env):
  p = run("generate.py", "--config=configs/tiny_local.py", "--config.bogus=1", env=env)
  assert_one_line_error(p, "--config.bogus: configs/tiny_local.py has no field 'bogus'")
  assert "ctx_size" in p.stderr and "max_new_tokens" in p.stderr


def test_layers_and_listen_that_disagree_say_which_flag_is_missing(env):
  """Issue 24 item 7: a partial --layers without --listen names --listen (not the output
  head), and --listen with --layers=all is refused, not ignored; both before any load."""
  p = run("generate.py", "--gguf=tiny", "--layers=0:1", "--prompt=x", env=env)
  assert_one_line_error(p, "--layers=0:1 without --listen")
  assert "--listen=HOST:PORT" in p.stderr and "loaded" not in p.stderr
  p = run("generate.py", "--gguf=tiny", "--listen=127.0.0.1:0", "--prompt=x", env=env)
  assert_one_line_error(p, "pass --layers=0:K")


def test_worker_at_a_closed_port_gives_up_after_connect_timeout(env):
  """Issue 24 item 5: --connect_timeout bounds the redialing (default: forever)."""
  with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  p = run("worker.py", "--gguf=tiny", "--layers=2:output", f"--coordinator=127.0.0.1:{port}",
          "--connect_timeout=1", env=env)
  assert_one_line_error(p, f"coordinator 127.0.0.1:{port} not reachable for")
  assert "--connect_timeout" in p.stderr and p.returncode == 2


def test_port_in_use(env):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    p = run("generate.py", "--gguf=tiny", "--layers=0:1", f"--listen=127.0.0.1:{port}",
            "--prompt=x", env=env)
  assert_one_line_error(p, "already in use")


def test_route_timeout(env):
  p = run("generate.py", "--gguf=tiny", "--layers=0:1", "--listen=127.0.0.1:0",
          "--route_timeout=1.5", "--prompt=x", env=env)
  assert_one_line_error(p, "route unavailable: missing layer 2")
  assert "waiting for route: missing layer 2" in p.stderr


# ------------------------------------------------------------------------ generate, chat
def test_generate_output_json_and_config_overrides(env, tmp_path, tiny_gguf):
  out = tmp_path / "out.json"
  p = run("generate.py", "--config=configs/tiny_local.py", "--config.max_new_tokens=9",
          "--max_new_tokens=5", *SHAPES, f"--output_json={out}", env=env)
  assert p.returncode == 0, p.stderr
  d = json.loads(out.read_text())
  for key in ("tokens", "text", "prefill_tok_s", "decode_tok_s", "route", "telemetry"):
    assert key in d
  assert len(d["tokens"]) == 5  # the plain flag beats --config.max_new_tokens
  assert d["route"]["route"] == [{"layers": "0:output", "host": "local"}]
  tok = Tokenizer.from_gguf(tiny_gguf)
  assert d["prompt_tokens"] == tok.chat_prompt([("user", "Hello, world")])
  if d["finish_reason"] == "length":
    assert d["text"] == tok.decode(d["tokens"])
  assert p.stdout.startswith(d["text"])  # streamed to stdout, same text
  assert len(d["telemetry"]) == 5 and d["telemetry"][0][0]["n_tokens"] == len(d["prompt_tokens"])


def test_chat_reuses_prefix(env):
  p = run("chat.py", "--gguf=tiny", "--max_new_tokens=4", *SHAPES,
          stdin="Hello, world\nAnd then?\n/quit\n", env=env)
  assert p.returncode == 0, p.stderr
  turns = [l for l in p.stderr.splitlines() if l.startswith("[turn ")]
  assert len(turns) == 2, p.stderr
  # "[turn 2: computed N of M prompt tokens, ...]": only the new turn is computed.
  n, m = (int(x) for x in turns[1].split("computed ")[1].split(" prompt")[0].split(" of "))
  assert 0 < n < m


def test_generate_as_coordinator(env, tmp_path, split_route, tiny_reference):
  """generate.py --listen: the session's worker dials in, the route and every step's telemetry
  name both hops, and the text is the whole model's (that a split is exact is
  tests/bridge/e2e_test.py's proof; here the front end must pass it through)."""
  p = run("generate.py", "--gguf=tiny", "--prompt=Hello, world", "--max_new_tokens=6", *SHAPES,
          "--layers=0:1", f"--listen={split_route.listen}", "--route_timeout=240",
          f"--output_json={tmp_path}/split.json", env=env)
  assert p.returncode == 0, p.stderr + split_route.logs()
  split = json.loads((tmp_path / "split.json").read_text())
  ref = tiny_reference("Hello, world", 6, chat=True)
  assert split["tokens"] == ref.tokens and split["text"] == ref.text
  hops = split["route"]["route"]
  assert [h["layers"] for h in hops] == ["0:1", "2:output"]
  assert hops[0]["host"] == "local" and hops[1]["host"].startswith("127.0.0.1:")
  # Telemetry of every step names the two hops, with bytes on the wire for the worker.
  assert all(len(step) == 2 for step in split["telemetry"])
  assert split["hops"][1]["bytes_in"] > 0


# ----------------------------------------------------------------------------------- demo
# The demo on the tiny model at the suite's shapes (its default is the docs model at ctx 512).
DEMO = ["--gguf=tiny", *SHAPES]


def test_demo_split_matches_single_process(env):
  p = run("demo.py", *DEMO, "--max_new_tokens=6", env=env, timeout=400)
  assert p.returncode == 0, p.stdout + p.stderr
  assert "PASS" in p.stdout
  assert "route: 0:1@local -> 2:2@127.0.0.1:" in p.stderr
  assert "3:output@127.0.0.1:" in p.stderr
  assert "prefill ms" in p.stderr  # the per-hop table


@contextlib.contextmanager
def running_demo(env, *args):
  """The demo as a child process (stderr piped); killed at the end if it still runs."""
  proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "demo.py"), *DEMO, *args],
                          env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  try:
    yield proc
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def read_until(proc, text, timeout=200.0):
  """The demo's stderr lines up to the first that contains `text` (asserted), then its
  children (the local workers, at least two)."""
  err, deadline = [], time.monotonic() + timeout
  for line in proc.stderr:
    err.append(line)
    if text in line or time.monotonic() > deadline:
      break
  assert err and text in err[-1], "".join(err)
  kids = psutil.Process(proc.pid).children(recursive=True)
  assert len(kids) >= 2
  return err, kids


# "listening on": the coordinator is up and waits for its workers, which are still loading.
# "route ready": the route is up and the coordinator generates through it (100 tokens, then
# the single-process check: seconds of work left at the signal). (An interrupt during the
# demo's JAX import, right after "started", can crash in native code: reported, not tested.)
@pytest.mark.parametrize("when", ["listening on", "route ready"])
def test_demo_ctrl_c_stops_workers(env, when):
  """Ctrl-C while the workers load, and during the generation: exit 130, workers reaped."""
  with running_demo(env, "--max_new_tokens=100") as proc:
    err, kids = read_until(proc, when)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, "".join(err) + rest
    assert "interrupted" in rest and "Traceback" not in rest and "Fatal" not in rest, rest
    gone, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive, alive


def test_demo_killed_hard_leaves_no_workers(env):
  """SIGKILL gives the demo no chance to clean up: the orphaned workers exit by themselves."""
  with running_demo(env) as proc:
    _, kids = read_until(proc, "started")
    proc.kill()
    proc.wait(timeout=30)
    # They notice within a second of reaching main(); imports can take long on a busy machine.
    gone, alive = psutil.wait_procs(kids, timeout=90)
    assert not alive, alive
