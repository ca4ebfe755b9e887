"""--devices on the launch scripts (issue 14): bad values are one-line errors, and the
route config configs/flash_2x4gpu.py reaches the loader of both scripts.

The pytest host has one CPU device, so a 4-device request is refused with the device count;
that it then runs on 4 devices is tests/model/sharding_test.py's part.
"""

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(tiny_gguf, tiny_cache_dir):
  e = dict(os.environ, DS4JAX_CACHE=tiny_cache_dir, JAX_PLATFORMS="cpu")
  e.pop("DS4JAX_KEY", None)
  e.pop("XLA_FLAGS", None)
  return e


def run(script, *args, env):
  return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_one_line_error(p, pattern):
  assert p.returncode == 2, p.stdout + p.stderr
  assert "Traceback" not in p.stderr, p.stderr
  lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and pattern in lines[0], p.stderr


def test_generate_refuses_a_bad_device_count(env):
  p = run("generate.py", "--gguf=tiny", "--prompt_tokens=0,1", "--devices=0", env=env)
  assert_one_line_error(p, "--devices must be a positive integer or 'all', got '0'")


def test_route_config_sets_the_devices_of_the_worker(env):
  # layers (the config's one worker, 22:output) and devices (4) come from the config.
  p = run("worker.py", "--config=configs/flash_2x4gpu.py", "--config.gguf=tiny",
          "--coordinator=127.0.0.1:9", env=env)
  assert_one_line_error(p, "--devices=4 exceeds the 1 local device(s) (cpu)")


def test_route_config_sets_the_devices_of_the_coordinator(env):
  p = run("generate.py", "--config=configs/flash_2x4gpu.py", "--config.gguf=tiny",
          "--config.layers=0:1", "--listen=127.0.0.1:0", env=env)
  assert_one_line_error(p, "--devices=4 exceeds the 1 local device(s) (cpu)")
