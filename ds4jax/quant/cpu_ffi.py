"""The C++ CPU kernels of `quant.matmul` / `quant.expert_matmul` (csrc/ds4_cpu.cc), built at
first use and called through the XLA FFI (`jax.ffi`).

The library is compiled once per (source, compiler, flags, CPU, jax) into a cache directory
(`$DS4JAX_KERNEL_CACHE`, default `~/.cache/ds4jax/kernels`) with the first C++ compiler found
(`$CXX`, g++, c++, clang++) and `-march=native`, then loaded and registered as the FFI targets
`ds4_matmul` and `ds4_expert_matmul` for the CPU platform. Nothing is built at import.

    available() -> bool          # built (or buildable) and registered; never raises
    ensure() -> None             # the same, raising KernelUnavailable (one line) otherwise
    matmul(x_MK, planes, qtype, n, act) -> f32[M, N]
    expert_matmul(x_PK, e_P, planes, qtype, n_experts, n, act) -> f32[P, N]
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SRC_DIR = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("ds4_cpu.cc", "gemv.h", "q8.h", "amx.h", "avx512.h", "blocks.h")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off",
          "-fno-math-errno")
_LOCK = threading.Lock()
_log = logging.getLogger(__name__)


class KernelUnavailable(RuntimeError):
  """The C++ kernels cannot be built or loaded here (the message is one line)."""


def _compiler() -> str:
  for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    if c and shutil.which(c):
      return shutil.which(c)
  raise KernelUnavailable("ds4jax CPU kernels: no C++ compiler found (install g++ or set CXX; "
                          "DS4JAX_CPU_KERNELS=xla uses the jax.numpy kernels instead)")


def _cpu_id() -> str:
  """What -march=native depends on: the CPU's model and flags."""
  try:
    text = Path("/proc/cpuinfo").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "model name"))][:2]
    return "\n".join(lines)
  except OSError:
    import platform
    return platform.processor() + platform.machine()


def cache_dir() -> Path:
  return Path(os.environ.get("DS4JAX_KERNEL_CACHE")
              or Path.home() / ".cache" / "ds4jax" / "kernels")


def library_path() -> Path:
  """The compiled library, built now if it is not in the cache (KernelUnavailable if that
  fails)."""
  cxx = _compiler()
  try:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout.splitlines()[:1]
  except (OSError, subprocess.SubprocessError) as e:
    raise KernelUnavailable(f"ds4jax CPU kernels: {cxx} does not run: {e}") from None
  h = hashlib.sha256()
  for part in [*(((_SRC_DIR / s).read_bytes()) for s in _SOURCES),
               *(x.encode() for x in (*version, *_FLAGS, _cpu_id(), jax.__version__))]:
    h.update(part)
    h.update(b"\0")
  out = cache_dir() / f"ds4_cpu_{h.hexdigest()[:16]}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SRC_DIR / "ds4_cpu.cc"), "-o", tmp]
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  except (OSError, subprocess.SubprocessError) as e:
    os.unlink(tmp)
    raise KernelUnavailable(f"ds4jax CPU kernels: {cxx} failed: {e}") from None
  if p.returncode:
    os.unlink(tmp)
    err = next((ln for ln in p.stderr.splitlines() if "error" in ln), p.stderr.strip()[:200])
    raise KernelUnavailable(f"ds4jax CPU kernels: {Path(cxx).name} failed: {err}")
  os.replace(tmp, out)  # atomic: concurrent first uses each build, one wins
  _log.info("built %s", out)
  return out


@functools.cache
def _load() -> ctypes.CDLL:
  """Builds (if needed), loads and registers the kernels once per process."""
  lib = ctypes.CDLL(str(library_path()))
  from ds4jax.quant import kernels
  grid = np.ascontiguousarray(kernels._iq2_xxs_grid().astype(np.uint8))
  lib.ds4_set_iq2xxs_grid(grid.ctypes.data_as(ctypes.c_void_p))
  for name in ("ds4_matmul", "ds4_expert_matmul"):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
  return lib


def ensure() -> None:
  """Builds and registers the kernels (KernelUnavailable, one line, if they cannot be)."""
  with _LOCK:
    _load()


def available() -> bool:
  try:
    ensure()
    return True
  except (KernelUnavailable, OSError) as e:
    _warn_once(str(e).splitlines()[0] if str(e) else type(e).__name__)
    return False


@functools.cache
def _warn_once(msg: str) -> None:
  _log.warning("%s; using the jax.numpy kernels", msg)


def _act(act: str) -> np.int64:
  return np.int64({"exact": 0, "q8": 1}[act])


def matmul(x_MK, planes, qtype: int, n: int, act: str):
  """f32[M, K] times the planes of a packed [N, K] weight -> f32[M, N] (the FFI call)."""
  ensure()
  m = x_MK.shape[0]
  call = jax.ffi.ffi_call("ds4_matmul", jax.ShapeDtypeStruct((m, n), jnp.float32),
                          vmap_method="sequential")
  return call(x_MK.astype(jnp.float32), *planes, qtype=np.int64(qtype), act=_act(act))


def expert_matmul(x_PK, e_P, planes, qtype: int, n_experts: int, n: int, act: str):
  """f32[P, K] times expert e_P[p] of the planes of a packed [E, N, K] weight -> f32[P, N]
  (rows whose expert is outside [0, E) give zeros)."""
  ensure()
  p = x_PK.shape[0]
  call = jax.ffi.ffi_call("ds4_expert_matmul", jax.ShapeDtypeStruct((p, n), jnp.float32),
                          vmap_method="sequential")
  return call(x_PK.astype(jnp.float32), e_P.astype(jnp.int32), *planes, qtype=np.int64(qtype),
              act=_act(act), n_experts=np.int64(n_experts))
