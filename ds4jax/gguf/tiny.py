"""Deterministic, seeded tiny GGUFs with the exact ds4 layout and quant mix: the random
models behind `--gguf=tiny` / `bench`, `scripts/make_tiny_gguf.py` and the test fixtures.

Quant mix (`experts="iq2"`, ds4's q2 recipe): Q8_0 projections, shared experts and head; F16
embedding, HC fn, compressor, indexer and router; F32 norms, sinks, biases, HC base/scale;
I32 tid2eid; IQ2_XXS gate/up and Q2_K down routed experts. gguf-py cannot quantise the K/IQ
types, so those are random raw blocks whose f16 scale fields are set to small values
(ds4-architecture.md §4.6); every byte pattern is a valid block.

Weights are scaled to keep activations sane: std 1/sqrt(fan_in) for projections, norms
near 1, small sinks, biases and HC bases.

The `flash` preset has the real DeepSeek V4 Flash dims (`ModelConfig.flash`), usually cut to
a few layers (`n_layers=N` keeps the first N layers of the real schedule: SWA, SWA, CSA,
HCA, ..., hash routing on layers 0-2). Those files are GBs (about 2 GB a layer plus 1.6 GB of
embedding and head), so they are written by `make_streamed_gguf`: tensor by tensor, in chunks
of ~32 MB, with every quantised type (Q8_0 included) drawn as random valid blocks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pathlib
import tempfile
import time
import zlib

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

from ds4jax.config import LayerRange, ModelConfig
from ds4jax.data import cache_root
from ds4jax.gguf import names, table
from ds4jax.gguf.writer import RawTensor, StreamedTensor, write_gguf, write_gguf_streamed

PRESETS = ("tiny", "bench", "flash")
EXPERT_RECIPES = table.EXPERT_RECIPES
# Byte offsets of the f16 scale fields (d, then dmin) in one block.
_SCALE_FIELDS = {Q.IQ2_XXS: (0, None), Q.Q2_K: (80, 82), Q.Q4_K: (0, 2), Q.Q8_0: (0, None)}
# dmin / d that centres the block values near zero: E[scale * q] = ratio * E[min].
_DMIN_RATIO = {Q.Q2_K: 1.5, Q.Q4_K: 7.5}


def preset_config(preset: str, **overrides) -> ModelConfig:
  if preset == "tiny":
    return ModelConfig.tiny(**overrides)
  if preset == "bench":
    return ModelConfig.bench(**overrides)
  if preset == "flash":
    return ModelConfig.flash(**overrides)
  raise ValueError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")


def _rng(seed: int, name: str) -> np.random.Generator:
  """One generator per tensor, so a tensor's values do not depend on the others."""
  return np.random.default_rng([seed, zlib.crc32(name.encode())])


def raw_blocks(rng: np.random.Generator, shape: tuple[int, ...], qtype: Q,
               std: float) -> RawTensor:
  """Random valid K/IQ blocks for a float tensor of numpy `shape`, values of about `std`.

  Pipeline:
    1. random bytes for every block;
    2. scale fields d = 1 (and dmin = ratio) on a calibration sample, dequantise, measure rms;
    3. d = std / rms times a per-block factor in [0.75, 1.25], written as f16.
  """
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
  blocks = rng.integers(0, 256, size=(int(np.prod(shape)) // block, type_size), dtype=np.uint8)
  d_off, m_off = _SCALE_FIELDS[qtype]
  ratio = _DMIN_RATIO.get(qtype, 0.0)

  def set_scales(b, d):
    b[:, d_off:d_off + 2] = d.astype(np.float16)[:, None].view(np.uint8)
    if m_off is not None:
      b[:, m_off:m_off + 2] = (d * ratio).astype(np.float16)[:, None].view(np.uint8)

  sample = blocks[:64].copy()
  set_scales(sample, np.ones(len(sample), np.float32))
  rms = float(np.sqrt(np.mean(gguf.quants.dequantize(sample, qtype) ** 2)))
  d = (std / rms) * rng.uniform(0.75, 1.25, size=len(blocks)).astype(np.float32)
  set_scales(blocks, d)
  return RawTensor(blocks.reshape(byte_shape), qtype)


def _init(spec: names.TensorSpec, shape: tuple[int, ...], rng: np.random.Generator,
          cfg: ModelConfig, normal_dtype=np.float64) -> np.ndarray:
  """Float init by role. `shape` is numpy orientation, so the fan-in is the last axis.
  `normal_dtype`: the dtype of the embedding and projection normals (float32: half the memory)."""
  leaf = spec.path[-1]
  if spec.ds4_type == Q.I32:
    # tid2eid: k distinct experts per token.
    return np.argsort(rng.random((cfg.vocab_size, cfg.n_experts)), axis=1)[:, :cfg.n_experts_used]
  if leaf == "scale" and spec.path[-2] != "hc_attn" and spec.path[-2] != "hc_ffn":
    return 1.0 + 0.1 * rng.standard_normal(shape)          # RMSNorm weights
  if leaf in ("scale", "hc_scale"):
    return rng.uniform(0.2, 1.0, shape)                     # HC scales
  if leaf in ("base", "hc_base", "sinks", "ape"):
    return 0.1 * rng.standard_normal(shape)
  if leaf == "bias":
    return 0.01 * rng.standard_normal(shape)
  if leaf == "embedding":
    return rng.standard_normal(shape, dtype=normal_dtype)
  return rng.standard_normal(shape, dtype=normal_dtype) / np.sqrt(shape[-1])  # 1/sqrt(fan_in)


def build_tensors(cfg: ModelConfig, *, seed: int = 0, experts: str = "iq2",
                  layers: LayerRange | None = None) -> dict[str, object]:
  """Every tensor a ds4 file of `cfg` carries (router bias on non-hash layers only).

  Returns `{gguf_name: float32/int32 array or RawTensor}` in numpy orientation.
  """
  if experts not in EXPERT_RECIPES:
    raise ValueError(f"unknown expert recipe {experts!r}: expected one of {sorted(EXPERT_RECIPES)}")
  gate_up_t, down_t = EXPERT_RECIPES[experts]
  layers = (layers or LayerRange.parse("all")).resolve(cfg.n_layers)
  out: dict[str, object] = {}
  for name in names.ds4_tensor_names(cfg, layers):
    spec, il = names.lookup(name)
    shape = spec.numpy_shape(cfg, il)
    rng = _rng(seed, name)
    if spec.is_expert and experts != "q8":
      qtype = down_t if spec.path[-1] == "down_exps" else gate_up_t
      out[name] = raw_blocks(rng, shape, qtype, std=1.0 / np.sqrt(shape[-1]))
    else:
      arr = _init(spec, shape, rng, cfg)
      out[name] = arr.astype(np.int32 if spec.ds4_type == Q.I32 else np.float32)
  return out


def make_tiny_gguf(path: str | os.PathLike, preset: str = "tiny", *, seed: int = 0,
                   experts: str = "iq2", types: str = "ds4", **overrides) -> str:
  """Writes a deterministic ds4-layout GGUF and returns its path (`flash`: streamed, see
  `make_streamed_gguf`)."""
  cfg = preset_config(preset, **overrides)
  if preset == "flash":
    return make_streamed_gguf(path, cfg, seed=seed, experts=experts, types=types,
                              name=f"ds4jax-{preset}")
  tensors = build_tensors(cfg, seed=seed, experts=experts)
  return write_gguf(path, cfg, tensors, types=types, name=f"ds4jax-{preset}",
                    extra_metadata={"ds4jax.seed": seed})


# ------------------------------------------------------------------------ streamed writing
# Target bytes of one generated chunk (a chunk is whole rows of the tensor's last axis).
CHUNK_BYTES = 32 * 2**20
log = logging.getLogger("ds4jax.gguf.tiny")


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
  """n uniformly random bytes (uint8), drawn 8 at a time (several GB/s)."""
  return rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]


def _row_chunks(shape: tuple[int, ...], row_bytes: int):
  """Rows per chunk, for chunks of about CHUNK_BYTES of whole rows (rows: the flattened
  leading axes of numpy `shape`; `row_bytes`: what one row costs while it is generated)."""
  n_rows = math.prod(shape[:-1])
  step = max(1, CHUNK_BYTES // max(1, row_bytes))
  for r0 in range(0, n_rows, step):
    yield min(step, n_rows - r0)


def block_chunks(rng: np.random.Generator, shape: tuple[int, ...], qtype: Q, std: float):
  """Random valid Q8_0 / K / IQ blocks for a float tensor of numpy `shape`, values of about
  `std`, yielded as uint8 [blocks, type_size] chunks of whole rows.

  Like `raw_blocks`, but chunked: random bytes for every block, then the f16 scale field(s)
  set to `std / rms` (times a per-block factor in [0.75, 1.25]), where rms is that of a
  calibration sample dequantised with d = 1 (and dmin = ratio). For Q8_0 the bytes after the
  scale are the int8 quants, so every byte pattern is a valid block there too.
  """
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  d_off, m_off = _SCALE_FIELDS[qtype]
  ratio = _DMIN_RATIO.get(qtype, 0.0)
  sample = _random_bytes(rng, 64 * type_size).reshape(64, type_size).copy()

  def set_scales(b, d):
    b[:, d_off:d_off + 2] = d.astype(np.float16)[:, None].view(np.uint8)
    if m_off is not None:
      b[:, m_off:m_off + 2] = (d * ratio).astype(np.float16)[:, None].view(np.uint8)

  set_scales(sample, np.ones(len(sample), np.float32))
  rms = float(np.sqrt(np.mean(gguf.quants.dequantize(sample, qtype) ** 2)))
  per_row = shape[-1] // block
  for rows in _row_chunks(shape, per_row * type_size):
    n = rows * per_row
    blocks = _random_bytes(rng, n * type_size).reshape(n, type_size)
    set_scales(blocks, (std / rms) * rng.uniform(0.75, 1.25, size=n).astype(np.float32))
    yield blocks


def _float_chunks(spec: names.TensorSpec, shape: tuple[int, ...], qtype: Q,
                  rng: np.random.Generator, cfg: ModelConfig):
  """The `_init` values of an F32 / F16 tensor, chunk by chunk of rows (float32 normals)."""
  dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(qtype)
  if dtype is None:
    raise ValueError(f"tensor {spec.template!r}: cannot draw {qtype.name} values")
  for rows in _row_chunks(shape, shape[-1] * 8):
    yield _init(spec, (rows, shape[-1]), rng, cfg, normal_dtype=np.float32).astype(dtype)


def _tid2eid_chunks(shape: tuple[int, ...], rng: np.random.Generator, cfg: ModelConfig):
  """int32 [V, k]: k distinct experts per token (the k smallest of random keys)."""
  k = shape[-1]
  for rows in _row_chunks(shape, cfg.n_experts * 4):
    keys = rng.random((rows, cfg.n_experts), dtype=np.float32)
    yield np.argpartition(keys, k - 1, axis=1)[:, :k].astype(np.int32)


def streamed_tensors(cfg: ModelConfig, *, seed: int = 0, experts: str = "iq2",
                     types: str = "ds4") -> list[StreamedTensor]:
  """Every tensor of a ds4 file of `cfg` (types per `table.tensor_table`) as a StreamedTensor
  whose data are drawn when written, from one generator per tensor."""
  out = []
  for info in table.tensor_table(cfg, experts=experts, types=types):
    shape, qtype, spec, name = info.numpy_shape, info.qtype, info.spec, info.name

    def chunks(shape=shape, qtype=qtype, spec=spec, name=name):
      rng = _rng(seed, name)
      if qtype == Q.I32:
        return _tid2eid_chunks(shape, rng, cfg)
      if qtype in _SCALE_FIELDS:
        return block_chunks(rng, shape, qtype, std=1.0 / np.sqrt(shape[-1]))
      return _float_chunks(spec, shape, qtype, rng, cfg)

    out.append(StreamedTensor(name, qtype, shape, chunks))
  return out


def make_streamed_gguf(path: str | os.PathLike, cfg: ModelConfig, *, seed: int = 0,
                       experts: str = "iq2", types: str = "ds4", name: str = "ds4jax-flash",
                       log_every_s: float = 5.0) -> str:
  """Writes a whole-model ds4 GGUF of `cfg` tensor by tensor (memory: one ~32 MB chunk), and
  logs progress at most every `log_every_s` seconds. The bytes depend on cfg, seed, experts
  and types only; they differ from `make_tiny_gguf`'s for the same cfg (other generators)."""
  tensors = streamed_tensors(cfg, seed=seed, experts=experts, types=types)
  total = sum(t.nbytes for t in tensors)
  log.info("writing %s: %d layers, %d tensors, %.2f GB", path, cfg.n_layers, len(tensors),
           total / 1e9)
  t0 = time.monotonic()
  last = [t0]

  def on_tensor(i, n, t, done, total):
    now = time.monotonic()
    if now - last[0] >= log_every_s or i == n - 1:
      last[0] = now
      log.info("%4d/%d tensors  %6.2f / %.2f GB  %5.1f%%  %6.1f s  %5.0f MB/s  (%s)", i + 1, n,
               done / 1e9, total / 1e9, 100 * done / total, now - t0,
               done / 1e6 / max(now - t0, 1e-9), t.name)

  return write_gguf_streamed(path, cfg, tensors, name=name, on_tensor=on_tensor,
                             extra_metadata={"ds4jax.seed": seed})


def code_version() -> str:
  """Hash of the code that decides a fixture's bytes, so caches rebuild when it changes."""
  from ds4jax import config
  from ds4jax.gguf import writer
  from ds4jax.tokenizer import tiny_vocab
  h = hashlib.sha256(gguf.__version__.encode() if hasattr(gguf, "__version__") else b"")
  for mod in (config, names, writer, tiny_vocab):
    h.update(pathlib.Path(mod.__file__).read_bytes())
  h.update(pathlib.Path(__file__).read_bytes())
  return h.hexdigest()[:12]


def tiny_gguf_path(preset: str = "tiny", cache_dir: str | os.PathLike | None = None, *,
                   seed: int = 0, experts: str = "iq2", types: str = "ds4") -> str:
  """Builds the fixture once into the cache (keyed by preset, seed, recipe and code version)
  and returns its path. Safe against concurrent builders: written to a temp file, then renamed.
  Not for `flash` (tens of GB): write it with scripts/make_tiny_gguf.py --preset=flash."""
  if preset == "flash":
    raise ValueError("the flash preset is not cached (tens of GB): write one with "
                     "scripts/make_tiny_gguf.py --preset=flash --n_layers=N --out=PATH")
  d = cache_root(cache_dir)
  path = d / f"{preset}-s{seed}-{experts}-{types}-{code_version()}.gguf"
  if not path.exists():
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".gguf.tmp")
    os.close(fd)
    try:
      make_tiny_gguf(tmp, preset, seed=seed, experts=experts, types=types)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  return str(path)
