"""Loading a slice of the bench file costs memory in proportion to the slice, not the file.

Each load runs in a fresh subprocess that reports (a) its peak RSS growth during the load and
(b) how much of the GGUF's memory map is resident afterwards (from /proc/self/smaps), i.e.
which bytes of the file were actually touched.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ds4jax.config import LayerRange
from ds4jax.gguf import names, reader

_PROBE = r"""
import json, os, resource, sys
import psutil
from ds4jax.gguf import load, reader
path, spec = sys.argv[1], sys.argv[2]
f = reader.open_gguf(path)
before = psutil.Process().memory_info().rss
cfg, ts = load.load_tensors(f, spec, progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
mapped, inside = 0, False
real = os.path.realpath(path)
for line in open("/proc/self/smaps"):
  parts = line.split()
  if parts and "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
    inside = parts[-1] == real
  elif inside and parts[0] == "Rss:":
    mapped += int(parts[1]) * 1024
print(json.dumps({"growth": peak - before, "peak": peak, "mapped": mapped,
                  "loaded": sum(a.nbytes for a in ts.values())}))
"""


def probe(path, spec):
  """Loads `spec` of `path` in a fresh process and returns its memory report (bytes)."""
  # Transparent huge pages that numpy requests for big arrays make RSS depend on the host's
  # memory fragmentation (seen: +100 MB on a busy machine); without them it is reproducible.
  env = dict(os.environ, NUMPY_MADVISE_HUGEPAGE="0")
  p = subprocess.run([sys.executable, "-c", _PROBE, path, spec], capture_output=True, text=True,
                     timeout=300, env=env)
  assert p.returncode == 0, p.stderr
  return json.loads(p.stdout.strip().splitlines()[-1])


def probe_best(path, spec, ok):
  """`probe`, once more if the first report fails `ok` (a busy host can inflate one run)."""
  r = probe(path, spec)
  if not ok(r):
    r2 = probe(path, spec)
    r = r2 if r2["growth"] < r["growth"] else r
  return r


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc smaps")
def test_slice_rss_follows_slice_bytes(bench_gguf):
  f = reader.open_gguf(bench_gguf)
  n = f.cfg.n_layers
  file_bytes = os.path.getsize(bench_gguf)
  res = {}
  for spec in ("all", f"0:{n // 2 - 1}", f"{n // 2}:output"):
    rng = f.resolve(spec)
    slice_bytes = sum(f.nbytes(e.name) for e in f.validate(rng))
    ok = lambda r: r["growth"] <= 1.5 * r["loaded"] + slice_bytes + (32 << 20)
    r = probe_best(bench_gguf, spec, ok)
    r["slice_bytes"] = slice_bytes
    res[spec] = r
    # Only the slice's bytes of the map were touched (plus header and readahead slack).
    assert r["mapped"] <= slice_bytes + (2 << 20), (spec, r)
    # Peak growth is about the dequantised arrays plus the mapped slice.
    assert ok(r), (spec, r)
  print(json.dumps(res, indent=1))
  everything, first, second = res.values()
  assert everything["mapped"] > 0.9 * file_bytes
  for half in (first, second):
    assert half["mapped"] < 0.7 * everything["mapped"]
    assert half["growth"] < 0.75 * everything["growth"]
