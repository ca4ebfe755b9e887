"""Fixtures for the model tests: the re-randomised tiny HF oracle, written to a f32 GGUF."""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(__file__))
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
  """(hf_model, gguf_path): the HF oracle and its ds4-layout f32 GGUF."""
  from hf_reference import build_hf_model
  from ds4jax.gguf.hf import hf_to_gguf
  model, hcfg = build_hf_model(seed=0)
  path = str(tmp_path_factory.mktemp("hf") / "hf_tiny_f32.gguf")
  hf_to_gguf(model, hcfg, path, types="f32")
  return model, path
