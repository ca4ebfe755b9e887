"""Every configs/*.py loads, has the fields the scripts read, and documents its command."""

import importlib.util
import pathlib

import ml_collections
import pytest

from ds4jax.config import LayerRange

# Run configs; the training configs (train_*.py) are tested in tests/train.
CONFIGS = sorted(p for p in (pathlib.Path(__file__).resolve().parents[2] / "configs").glob("*.py")
                 if not p.stem.startswith("train_"))
FIELDS = ("gguf", "layers", "ctx_size", "prompt", "max_new_tokens", "temperature", "seed")


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_the_three_configs_exist():
  assert {"tiny_local", "tiny_split3", "flash_two_hosts"} <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config(path):
  mod = _load(path)
  cfg = mod.get_config()
  assert isinstance(cfg, ml_collections.ConfigDict)
  for f in FIELDS:
    assert f in cfg, f
  assert "python scripts/" in mod.__doc__ and f"configs/{path.name}" in mod.__doc__
  n_layers = 43 if "flash" in path.stem else 4
  ranges = [LayerRange.parse(cfg.layers, n_layers)]
  ranges += [LayerRange.parse(w, n_layers) for w in cfg.get("workers", [])]
  # The coordinator's slice and the workers chain contiguously from layer 0 to the head.
  assert ranges[0].start == 0 and ranges[-1].has_output
  for a, b in zip(ranges, ranges[1:]):
    assert b.start == a.end + 1
  if cfg.get("workers"):
    assert cfg.listen
