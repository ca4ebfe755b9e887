"""Issue 24 items 10 and 11: the notebook API takes the names the scripts take, and builds the
same prompt transcript as generate.py."""

import os

import pytest

from ds4jax import data
from ds4jax.runtime import sources
from ds4jax.tokenizer import Tokenizer


def test_a_built_in_name_resolves_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "docs").mkdir()  # like the repository root: a docs/ folder that is no model
  assert sources.resolve("docs") == data.docs_gguf_path()
  cfg, fingerprint = sources.model_info("docs")
  assert cfg.n_layers >= 1 and fingerprint


def test_a_model_named_like_a_built_in_is_ambiguous_until_written_as_a_path(tmp_path,
                                                                           monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.symlink(data.docs_gguf_path(), tmp_path / "tiny")  # a GGUF file called 'tiny'
  with pytest.raises(ValueError, match=r"names both the built-in tiny model .* write ./tiny"):
    sources.resolve("tiny")
  assert sources.resolve("./tiny") == "./tiny"
  with pytest.raises(FileNotFoundError, match="GGUF file not found: nope.gguf .*docs, tiny"):
    sources.resolve("nope.gguf")


def test_prompt_is_the_transcript_generate_starts_from():
  tok = Tokenizer.from_gguf(data.docs_gguf_path())
  text = "The assert statement"
  assert tok.prompt(text) == [tok.bos_id] + tok.encode(text)
  assert tok.encode(text)[0] != tok.bos_id
  chat = tok.prompt(text, chat=True, system="Be brief.")
  assert chat == tok.chat_prompt([("system", "Be brief."), ("user", text)])
  with pytest.raises(ValueError, match="chat=True"):
    tok.prompt(text, system="Be brief.")


def test_the_chat_default_follows_what_the_model_was_trained_on(tiny_gguf):
  """Issue 24 item 1: the docs model (plain text) defaults to --nochat, ds4-layout models
  to the chat format; the scripts' --chat default is `Tokenizer.chat_model`."""
  assert Tokenizer.from_gguf(data.docs_gguf_path()).chat_model is False
  assert Tokenizer.from_gguf(tiny_gguf).chat_model is True
