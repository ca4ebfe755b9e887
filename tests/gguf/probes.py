"""Runs a memory probe script in a fresh process (RSS of this process would mix test state)."""

import json
import os
import subprocess
import sys


def run_probe(script: str, path: str, spec: str) -> dict:
  """Runs `script` with argv [path, spec] and returns its last stdout line, parsed as JSON."""
  # Transparent huge pages that numpy requests for big arrays make RSS depend on the host's
  # memory fragmentation (seen: +100 MB on a busy machine); without them it is reproducible.
  env = dict(os.environ, NUMPY_MADVISE_HUGEPAGE="0")
  p = subprocess.run([sys.executable, "-c", script, path, spec], capture_output=True, text=True,
                     timeout=300, env=env)
  assert p.returncode == 0, p.stderr
  return json.loads(p.stdout.strip().splitlines()[-1])
