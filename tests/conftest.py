"""Shared test fixtures."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `paligemma_jax`, `tests.x`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import spm_fixture`.

import spm_fixture  # noqa: E402


@pytest.fixture(scope="session")
def spm_model_path(tmp_path_factory):
  """A small Gemma-style tokenizer.model with loc/seg tokens (ids as in tests/spm_fixture.py)."""
  return str(spm_fixture.build_spm_model(tmp_path_factory.mktemp("spm") / "tokenizer.model"))
