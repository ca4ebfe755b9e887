"""Fixtures of the LocalAI backend tests (helpers: localai_client.py)."""

import pytest


@pytest.fixture(scope="module")
def logs_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("localai-logs")
