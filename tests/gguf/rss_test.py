"""Loading a slice of the bench file costs memory in proportion to the slice, not the file.

Each load runs in a fresh subprocess that reports (a) the peak of its host allocations during
the load (tracemalloc: numpy's buffers and Python's, which depend only on the code, not on the
host; the process's RSS is scripts/bench.py's "Peak memory" figure) and (b) how much of the
GGUF's memory map is resident afterwards (from /proc/self/smaps): with `release=False` that is
which bytes of the file were touched; by default the loader drops each tensor's pages after
dequantising it, so little stays resident.
"""

import json
import os

import pytest
from probes import run_probe

from ds4jax.gguf import reader

pytestmark = pytest.mark.e2e

_PROBE = r"""
import json, mmap, os, sys, tracemalloc
from ds4jax.gguf import load, reader

path, spec = sys.argv[1], sys.argv[2]
real = os.path.realpath(path)

def mapped():
  total, inside = 0, False
  for line in open("/proc/self/smaps"):
    parts = line.split()
    if parts and "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
      inside = parts[-1] == real
    elif inside and parts[0] == "Rss:":
      total += int(parts[1]) * 1024
  return total

# Pages of the file left in the page cache by earlier runs would be mapped by the kernel's
# fault-around (64 KiB around each fault) and count as resident: start from a cold file.
fd = os.open(real, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
f = reader.open_gguf(path)
# ... and no fault-around on this map either (pages another process holds stay cached).
f.reader.data._mmap.madvise(mmap.MADV_RANDOM)
tracemalloc.start()
cfg, ts = load.load_tensors(f, spec, progress=False)
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
res = {"peak": peak, "mapped": mapped(), "loaded": sum(a.nbytes for a in ts.values())}
del ts
# Again without releasing pages: what stays resident in the map is what the load touched.
load.load_tensors(f, spec, progress=False, release=False)
res["touched"] = mapped()
print(json.dumps(res))
"""


def probe(path, spec):
  """Loads `spec` of `path` in a fresh process and returns its memory report (bytes)."""
  return run_probe(_PROBE, path, spec)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc smaps")
def test_slice_rss_follows_slice_bytes(bench_gguf):
  f = reader.open_gguf(bench_gguf)
  n = f.cfg.n_layers
  file_bytes = os.path.getsize(bench_gguf)
  res = {}
  for spec in ("all", f"0:{n // 2 - 1}", f"{n // 2}:output"):
    rng = f.resolve(spec)
    slice_bytes = sum(f.nbytes(e.name) for e in f.validate(rng))
    r = probe(bench_gguf, spec)
    # The peak is the dequantised arrays kept plus one tensor's temporaries at a time.
    assert r["loaded"] <= r["peak"] <= 1.2 * r["loaded"] + (16 << 20), (spec, r)
    # Released after use; fault-around re-maps a few neighbouring pages as loading moves on.
    assert r["mapped"] < 0.2 * slice_bytes + (1 << 20), (spec, r)
    # Only the slice's bytes of the file were touched (plus header and fault-around slack).
    assert r["touched"] <= slice_bytes + (2 << 20), (spec, r, slice_bytes)
    r["slice_bytes"] = slice_bytes
    res[spec] = r
  print(json.dumps(res, indent=1))
  everything, first, second = res.values()
  assert everything["touched"] > 0.9 * file_bytes
  for half in (first, second):
    assert half["touched"] < 0.7 * everything["touched"]
    assert half["peak"] < 0.75 * everything["peak"]
