"""The tokenizer read from the tiny GGUF (the vocab the tiny model is built with)."""

import gguf
import numpy as np
import pytest

from ds4jax.testing import tiny_vocab
from ds4jax.tokenizer import Tokenizer, TokenizerError
from ds4jax.tokenizer import tokenizer as tk


@pytest.fixture(scope="module")
def tok(tiny_gguf):
  return Tokenizer.from_gguf(tiny_gguf)


def test_reads_the_vocab_written_into_the_gguf(tok):
  v = tiny_vocab.build_vocab(tok.vocab_size)
  assert tok.tokens == list(v.tokens)
  assert (tok.bos_id, tok.eos_id) == (v.bos_id, v.eos_id) == (0, 1)
  # The token_type table marks exactly the 8 control tokens as special.
  assert tok.special_ids == frozenset(range(tiny_vocab.N_SPECIAL))


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "naïve café – 日本語 テキスト, Ελληνικά, עברית, 🙂👍🏽 and 1234567",
    "def f(x):\n\treturn x * 2 + 1\r\n",
    "  spaces   everywhere  ",
])
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert all(i not in tok.special_ids for i in ids)


def test_corpus_words_use_merges(tok):
  # The vocab's merges were learned on this corpus: it must compress well below 1 token/byte.
  text = tiny_vocab.CORPUS
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert len(ids) < 0.6 * len(text.encode())


def test_multibyte_bytes_are_byte_tokens(tok):
  # No merges cover these, so every UTF-8 byte is its own token: id = 8 + byte.
  text = "日🙂"
  assert tok.encode(text) == [8 + b for b in text.encode("utf-8")]
  ids = tok.encode(text)
  # A prefix that ends inside a character decodes to U+FFFD, the whole sequence exactly.
  assert tok.decode(ids[:2]) == "\ufffd"
  assert tok.decode(ids) == text


def test_specials_and_chat_prompt(tok):
  ids = tok.encode(f"{tk.USER}Hi{tk.ASSISTANT}{tk.THINK}")
  assert ids[0] == tok.user_id and ids[-2:] == [tok.assistant_id, tok.think_id]
  chat = tok.chat_prompt([("user", "Hi")], thinking=True)
  assert chat == [tok.bos_id] + ids


def test_gguf_without_tokenizer_metadata(tmp_path):
  path = tmp_path / "no_tok.gguf"
  w = gguf.GGUFWriter(str(path), "deepseek4")
  w.add_tensor("x", np.zeros(4, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(TokenizerError, match="missing GGUF metadata key 'tokenizer.ggml.tokens'"):
    Tokenizer.from_gguf(path)
  with pytest.raises(FileNotFoundError):
    Tokenizer.from_gguf(tmp_path / "absent.gguf")
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
  with pytest.raises(TokenizerError, match="not a readable GGUF"):
    Tokenizer.from_gguf(tmp_path / "junk.gguf")
