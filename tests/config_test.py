"""ModelConfig and LayerRange: presets, hashing, schedule, metadata round trip, range syntax."""

import dataclasses

import jax
import pytest

from ds4jax.config import (METADATA_KEYS, ConfigError, LayerRange, LayerRangeError, ModelConfig,
                           flash_schedule)
from ds4jax.gguf import reader
from ds4jax.testing import tiny


@pytest.mark.parametrize("make", [ModelConfig.flash, ModelConfig.tiny, ModelConfig.bench])
def test_presets_are_frozen_hashable_static_args(make):
  cfg = make()
  assert hash(cfg) == hash(make()) and cfg == make()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.n_layers = 3
  f = jax.jit(lambda x, c: x * c.n_layers, static_argnums=1)
  assert int(f(2, cfg)) == 2 * cfg.n_layers
  assert len(cfg.compress_ratios) == len(cfg.swiglu_clamp) == cfg.n_layers


def test_flash_schedule():
  cfg = ModelConfig.flash()
  kinds = [cfg.layer_kind(il) for il in range(43)]
  assert kinds.count("SWA") == 2 and kinds.count("CSA") == 21 and kinds.count("HCA128") == 20
  assert [il for il in range(43) if cfg.is_hash_layer(il)] == [0, 1, 2]
  assert cfg.rope_kind(0) == "main" and cfg.rope_kind(2) == "compress"
  assert cfg.has_indexer(42) and not cfg.has_indexer(41)
  assert cfg.hc_mix == 24
  assert flash_schedule(4) == (0, 0, 4, 128)


def test_tiny_schedule_covers_every_layer_kind():
  cfg = ModelConfig.tiny()
  assert [cfg.layer_kind(il) for il in range(4)] == ["SWA", "SWA", "CSA", "HCA16"]
  assert cfg.is_hash_layer(0) and not cfg.is_hash_layer(1)
  assert cfg.has_indexer(2) and cfg.overlap(2) and not cfg.overlap(3)


@pytest.mark.parametrize("kw,msg", [
    (dict(n_layers=0), "n_layers must be >= 1"),
    (dict(compress_ratios=(0, 0)), "compress_ratios has 2 entries"),
    (dict(n_kv_heads=2), "n_kv_heads must be 1"),
    (dict(rope_dim=63), "rope_dim=63 must be even"),
    (dict(o_groups=3), "not divisible by o_groups=3"),
    (dict(n_experts_used=9), "n_experts_used=9 > n_experts=8"),
    (dict(index_head_dim=32), "rope_dim=64 must be <= index_head_dim=32"),
])
def test_validation_names_the_field(kw, msg):
  with pytest.raises(ConfigError, match=msg):
    ModelConfig.tiny(**kw)


@pytest.mark.parametrize("preset", ["tiny", "bench"])
def test_gguf_round_trip(tmp_path, preset):
  p = tiny.make_tiny_gguf(tmp_path / f"{preset}.gguf", preset)
  assert reader.read_config(p) == tiny.preset_config(preset)
  assert reader.read_config(p, qat=True) == tiny.preset_config(preset, qat=True)


def test_from_metadata_errors():
  cfg = ModelConfig.tiny()
  meta = {k: getattr(cfg, f) for k, (f, _, _) in METADATA_KEYS.items()}
  assert ModelConfig.from_metadata(meta) == cfg
  with pytest.raises(ConfigError, match="missing GGUF metadata key 'deepseek4.expert_count'"):
    ModelConfig.from_metadata({k: v for k, v in meta.items() if k != "deepseek4.expert_count"})
  with pytest.raises(ConfigError, match="'deepseek4.swiglu_clamp_exp' has 2 entries, need >= 4"):
    ModelConfig.from_metadata(dict(meta, **{"deepseek4.swiglu_clamp_exp": [10.0, 10.0]}))
  with pytest.raises(ConfigError, match="GGUF metadata is inconsistent: n_kv_heads must be 1"):
    ModelConfig.from_metadata(dict(meta, **{"deepseek4.attention.head_count_kv": 2}))
  # Longer per-layer arrays are cut to n_layers (Flash config.json has an MTP slot).
  longer = dict(meta, **{"deepseek4.attention.compress_ratios": [0, 0, 4, 16, 0]})
  assert ModelConfig.from_metadata(longer) == cfg


@pytest.mark.parametrize("spec,n,want", [
    ("all", 43, LayerRange(0, 42, True)),
    ("0:20", 43, LayerRange(0, 20, False)),
    ("21:output", 43, LayerRange(21, 42, True)),
    (" 3:3 ", 4, LayerRange(3, 3, False)),
    ("42:42", 43, LayerRange(42, 42, False)),
])
def test_range_parse(spec, n, want):
  r = LayerRange.parse(spec, n)
  assert r == want
  assert LayerRange.parse(str(r), n) == r


@pytest.mark.parametrize("spec,msg", [
    ("5:2", "end 2 is before start 5"),
    ("0:99", "ends past the final model layer 42"),
    ("a:b", "start 'a' is not a non-negative integer"),
    ("1:b", "end 'b' is not a non-negative integer or 'output'"),
    ("-1:3", "start '-1' is not"),
    ("1:2:3", "expected A:B, A:output or all"),
    ("", "expected A:B, A:output or all"),
    ("43:output", "starts past the final model layer 42"),
])
def test_range_errors(spec, msg):
  with pytest.raises(LayerRangeError, match=msg) as e:
    LayerRange.parse(spec, 43)
  assert "\n" not in str(e.value)


def test_range_unresolved_then_resolved():
  r = LayerRange.parse("2:output")
  assert r.end == -1 and r.has_output
  assert r.resolve(4) == LayerRange(2, 3, True)
  assert LayerRange(0, 3, True).describe() == "0:3+output" and str(LayerRange(0, 3, True)) == "0:output"
  assert LayerRange(0, 1).embeds and not LayerRange(1, 1).embeds and 1 in LayerRange(0, 1)
