"""Tokenizer tests on a small byte-level BPE vocab with the ds4 specials.

The BPE and the pre-tokenizer are checked against independent references written here: the
three DeepSeek split regexes run through the `regex` module, and a plain rank-ordered BPE.
"""

import regex
import pytest

from ds4jax.tokenizer import tokenizer as tk

SPECIALS = [tk.BOS, tk.EOS, tk.USER, tk.ASSISTANT, tk.THINK, tk.END_THINK, tk.DSML,
            "<｜▁pad▁｜>"]


def _u(s: str) -> str:
  """Text -> its byte-level alphabet spelling."""
  b2u = tk.byte_to_unicode()
  return "".join(b2u[b] for b in s.encode("utf-8"))


def _merges() -> list[str]:
  out = []
  def chain(word):
    # Left-to-right merges that build `word` (byte-level spelling) from its characters.
    w = _u(word)
    acc = w[0]
    for c in w[1:]:
      out.append(f"{acc} {c}")
      acc += c
  for word in ["hello", " the", "he", "ll", " world", "世界", "é", "12", "123", "ing", " 🙂"]:
    chain(word)
  # Deduplicate, keeping the first rank.
  seen, uniq = set(), []
  for m in out:
    if m not in seen:
      seen.add(m)
      uniq.append(m)
  return uniq


def _vocab():
  merges = _merges()
  tokens = SPECIALS + [tk.byte_to_unicode()[b] for b in range(256)]
  for m in merges:
    a, b = m.split(" ")
    if a + b not in tokens:
      tokens.append(a + b)
  return tokens, merges


@pytest.fixture(scope="module")
def tok():
  tokens, merges = _vocab()
  return tk.Tokenizer.from_vocab(tokens, merges)


def _ref_pretokenize(text):
  pieces = [text]
  for pat in tk.SPLIT_PATTERNS:
    rx = regex.compile(pat)
    nxt = []
    for p in pieces:
      pos = 0
      for m in rx.finditer(p):
        if m.start() > pos:
          nxt.append(p[pos:m.start()])
        if m.end() > m.start():
          nxt.append(m.group())
        pos = m.end()
      if pos < len(p):
        nxt.append(p[pos:])
    pieces = nxt
  return pieces


def _ref_bpe(tokens, merges, text):
  vocab = {t: i for i, t in enumerate(tokens)}
  ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
  ids = []
  for piece in _ref_pretokenize(text):
    word = list(_u(piece))
    while len(word) > 1:
      pairs = [(ranks.get((word[i], word[i + 1]), 1 << 30), i) for i in range(len(word) - 1)]
      r, i = min(pairs)
      if r == 1 << 30:
        break
      word = word[:i] + [word[i] + word[i + 1]] + word[i + 2:]
    ids += [vocab[w] for w in word]
  return ids


TEXTS = [
    "hello world",
    " the thing, the end.\n\n",
    "1234567 and 12 3",
    "世界 and 日本語のテキスト",
    "café naïve résumé",
    "emoji 🙂 🙂🙂 tail",
    "tabs\tand\r\nCRLF   spaces   ",
    "x=(a+b)*c; // don't",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_pretokenizer_matches_regex_reference(tok, text):
  got = [p for p, _ in tok.hf.pre_tokenizer.pre_tokenize_str(text)]
  assert got == [_u(p) for p in _ref_pretokenize(text)]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_reference_bpe_and_round_trips(tok, text):
  tokens, merges = _vocab()
  ids = tok.encode(text)
  assert ids == _ref_bpe(tokens, merges, text)
  assert tok.decode(ids) == text


def test_merges_are_used(tok):
  ids = tok.encode("hello world")
  assert ids == [tok.id_of(_u("hello")), tok.id_of(_u(" world"))]
  assert tok.encode("世界") == [tok.id_of(_u("世界"))]
  assert tok.encode("1234") == [tok.id_of("123"), tok.id_of("4")]


def test_special_tokens_encode_to_single_ids(tok):
  text = f"{tk.BOS}hi{tk.USER}q{tk.ASSISTANT}{tk.THINK}a{tk.END_THINK}{tk.EOS}"
  ids = tok.encode(text)
  assert ids[0] == tok.bos_id == 0
  assert tok.eos_id == 1
  for s in (tk.USER, tk.ASSISTANT, tk.THINK, tk.END_THINK):
    assert tok.id_of(s) in ids
  assert ids[-1] == tok.eos_id
  assert tok.decode(ids) == text
  assert tok.decode(ids, skip_special=True) == "hiqa"


def test_multibyte_split_across_tokens(tok):
  # '🙂' is 4 bytes and has no merge alone: four byte tokens, each undecodable on its own.
  ids = tok.encode("🙂")
  assert len(ids) == 4
  assert tok.decode(ids[:2]) == "\ufffd"
  assert tok.decode_bytes(ids) == "🙂".encode()
  assert tok.decode(ids) == "🙂"


def test_encode_add_bos_and_bad_ids(tok):
  assert tok.encode("hi", add_bos=True)[0] == tok.bos_id
  with pytest.raises(tk.TokenizerError, match="outside the vocab"):
    tok.decode([tok.vocab_size])


def test_missing_specials_refused():
  tokens, merges = _vocab()
  with pytest.raises(tk.TokenizerError, match="special tokens"):
    tk.Tokenizer.from_vocab([t for t in tokens if t != tk.DSML], merges)


def test_token_types_mark_extra_specials():
  tokens, merges = _vocab()
  types = [1] * len(tokens)
  he = tokens.index(_u("he"))
  types[he] = 3
  t = tk.Tokenizer.from_vocab(tokens, merges, types)
  assert he in t.special_ids
  # As a special, 'he' is matched as a whole even inside a word.
  assert he in t.encode("the")


def test_chat_format(tok):
  ids = tok.chat_prompt([("system", "sys"), ("user", "hi")], thinking=False)
  assert ids[0] == tok.bos_id
  assert tok.decode(ids) == f"{tk.BOS}sys{tk.USER}hi{tk.ASSISTANT}{tk.END_THINK}"
  ids = tok.chat_prompt([("user", "hi"), ("assistant", "yo"), ("user", "again")], thinking=True)
  assert tok.decode(ids) == (f"{tk.BOS}{tk.USER}hi{tk.ASSISTANT}{tk.END_THINK}yo{tk.EOS}"
                             f"{tk.USER}again{tk.ASSISTANT}{tk.THINK}")
  # A follow-up turn appended to a finished transcript gives the same ids as the whole prompt.
  first = tok.chat_prompt([("user", "hi")])
  assert first + tok.encode("yo") + [tok.eos_id] + tok.user_turn("again", thinking=True) == ids
  with pytest.raises(ValueError, match="role"):
    tok.chat_prompt([("bot", "x")])
