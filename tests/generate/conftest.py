import os
import sys

import pytest

from ds4jax.testing import tiny_vocab
from ds4jax.tokenizer import Tokenizer

# The test doubles in generate_fakes.py are imported by name.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def tiny_tokenizer():
  v = tiny_vocab.build_vocab(512)
  return Tokenizer.from_vocab(v.tokens, v.merges, v.token_type)
