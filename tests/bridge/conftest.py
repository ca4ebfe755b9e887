import logging

import pytest

from ds4jax.testing.fuzzing import LogCapture


@pytest.fixture
def logs():
  """Every ds4jax.bridge log message (INFO and up) emitted during the test."""
  cap = LogCapture()
  lg = logging.getLogger("ds4jax.bridge")
  old = lg.level
  lg.addHandler(cap)
  lg.setLevel(logging.INFO)
  yield cap
  lg.removeHandler(cap)
  lg.setLevel(old)
