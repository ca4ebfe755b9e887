"""The ds4 tokenizer, built from a GGUF's `tokenizer.ggml.*` metadata with HF `tokenizers`.

DeepSeek V4 uses GPT-2 style byte-level BPE: every byte maps to one printable code point, the
vocab and the merges are written in that alphabet, and the merge rank is the index in
`tokenizer.ggml.merges`. The pre-tokenizer is DeepSeek V3's (ds4 calls it "joyai-llm"): three
`Isolated` regex splits, each re-splitting the pieces of the previous one (digits in runs of
at most 3; CJK/kana runs; then words, punctuation and whitespace). Special tokens are added
tokens, so `"<｜User｜>"` in a text encodes to its one id and is never split.

    tok = Tokenizer.from_gguf("model.gguf")
    ids = tok.encode("Hello, 世界")
    tok.decode(ids)                                  # 'Hello, 世界'
    tok.chat_prompt([("user", "Hi")], thinking=False)  # BOS <｜User｜>Hi<｜Assistant｜></think>

`decode` works on raw bytes (`token_bytes`), so decoding a prefix of a generation may end in
the middle of a UTF-8 character; `generate.loop` streams through an incremental UTF-8 decoder
for that reason.
"""

from __future__ import annotations

import functools
import os
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"
# ds4 refuses a vocab without these (ds4-architecture.md §4.5).
REQUIRED_SPECIALS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK, DSML)

# DeepSeek V3 / ds4 "joyai-llm" pre-tokenizer: three Isolated splits, applied in sequence.
SPLIT_PATTERNS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
    r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+",
)

# llama.cpp token types (tokenizer.ggml.token_type): 3 control, 4 user-defined.
_SPECIAL_TYPES = (3, 4)


class TokenizerError(ValueError):
  """The GGUF has no usable tokenizer metadata, or a token id is out of range."""


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable code point table."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(bs, cs)}


@functools.lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
  return {c: b for b, c in byte_to_unicode().items()}


class Tokenizer:
  """Byte-level BPE with ds4's specials and chat format.

  Build it with `from_gguf(path)` or `from_vocab(tokens, merges, token_types)`.
  """

  def __init__(self, tokens: Sequence[str], merges: Sequence[str],
               token_types: Sequence[int] | None = None):
    tokens = [str(t) for t in tokens]
    if not tokens:
      raise TokenizerError("tokenizer.ggml.tokens is empty")
    missing = [s for s in REQUIRED_SPECIALS if s not in tokens]
    if missing:
      raise TokenizerError(f"vocab lacks the ds4 special tokens {missing}")
    self.tokens = tokens
    self.vocab_size = len(tokens)
    # The first occurrence of a duplicated string wins, as in llama.cpp's token_to_id.
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
      vocab.setdefault(t, i)
    self._vocab = vocab
    pairs = []
    for rank, m in enumerate(merges):
      parts = str(m).split(" ")
      if len(parts) != 2:
        raise TokenizerError(f"tokenizer.ggml.merges[{rank}] = {m!r} is not an 'a b' pair")
      pairs.append((parts[0], parts[1]))

    alphabet = unicode_to_byte()
    specials = set(REQUIRED_SPECIALS)
    if token_types is not None:
      if len(token_types) != len(tokens):
        raise TokenizerError(
            f"tokenizer.ggml.token_type has {len(token_types)} entries, tokens has {len(tokens)}")
      specials.update(t for t, ty in zip(tokens, token_types) if int(ty) in _SPECIAL_TYPES)
    # A token outside the byte alphabet can only ever be produced as a whole (e.g. the
    # '<｜place▁holder▁no▁N｜>' family), so it is special even without a type table.
    specials.update(t for t in tokens if any(c not in alphabet for c in t))
    self.special_ids = frozenset(vocab[s] for s in specials)

    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in SPLIT_PATTERNS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    # Longest first, so a special that contains another (none in ds4, but cheap) wins.
    hf.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for s in sorted(specials, key=len,
                                                                         reverse=True)])
    self.hf = hf

    # Whether the model was trained on ds4's chat format (`chat_model_of`): the scripts'
    # --chat default. A vocabulary alone cannot tell; from_gguf reads the model's metadata.
    self.chat_model = True
    self.bos_id = vocab[BOS]
    self.eos_id = vocab[EOS]
    self.user_id = vocab[USER]
    self.assistant_id = vocab[ASSISTANT]
    self.think_id = vocab[THINK]
    self.end_think_id = vocab[END_THINK]
    self._bytes = [self._to_bytes(i, t, alphabet) for i, t in enumerate(tokens)]

  def _to_bytes(self, i: int, t: str, alphabet: dict[str, int]) -> bytes:
    if i in self.special_ids or any(c not in alphabet for c in t):
      return t.encode("utf-8")
    return bytes(alphabet[c] for c in t)

  # ------------------------------------------------------------------------------- builders
  @classmethod
  def from_vocab(cls, tokens: Sequence[str], merges: Sequence[str],
                 token_types: Sequence[int] | None = None) -> "Tokenizer":
    return cls(tokens, merges, token_types)

  @classmethod
  def from_gguf(cls, path: str | os.PathLike, *, open_reader=None) -> "Tokenizer":
    """Reads `tokenizer.ggml.tokens`, `merges` and (if present) `token_type` of a GGUF file.
    `open_reader(path)` opens it (default `gguf.GGUFReader`; `runtime.sources` passes
    `gguf.lean.LeanReader`, which builds no numpy view per vocabulary entry).

    A checkpoint directory keeps its GGUF's vocabulary: open either kind with
    `ds4jax.runtime.sources.open_tokenizer(path)` (this package never imports the checkpoints).
    """
    import gguf  # deferred: the tokenizer is usable without a GGUF on disk

    path = os.fspath(path)
    if os.path.isdir(path):
      raise TokenizerError(f"{path} is a directory, not a GGUF file (open a checkpoint's "
                           "tokenizer with ds4jax.runtime.sources.open_tokenizer)")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
      reader = (open_reader or gguf.GGUFReader)(path)
    except Exception as e:  # gguf raises bare ValueError/struct errors on bad files
      raise TokenizerError(f"{path}: not a readable GGUF file ({e})") from None
    tokens = _string_array(reader, "tokenizer.ggml.tokens", path)
    merges = _string_array(reader, "tokenizer.ggml.merges", path)
    chat = chat_model_of(reader)
    field = reader.get_field("tokenizer.ggml.token_type")
    types = None
    if field is not None:
      types = [int(v) for v in field.contents()]
    tok = cls(tokens, merges, types)
    tok.chat_model = chat
    return tok

  # ------------------------------------------------------------------------ encode / decode
  def prompt(self, text: str, *, chat: bool = False, system: str | None = None,
             thinking: bool = False) -> list[int]:
    """The transcript a prompt starts, exactly as the scripts, the server and
    `Generator.generate` build it: BOS + text, or with `chat` ds4's chat format (an optional
    system message, the user turn, then the assistant's). Use it for `model.logits(...)`
    to see what generate.py computes; `encode` is the bare text, with no BOS."""
    if chat:
      return self.chat_prompt(([("system", system)] if system else []) + [("user", text)],
                              thinking=thinking)
    if system:
      raise ValueError("a system message needs chat=True")
    return self.encode(text, add_bos=True)

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
    """Text -> ids, with no BOS unless `add_bos` (`prompt` is what a generation starts
    from). Special-token strings in `text` become their single ids."""
    ids = self.hf.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] + ids) if add_bos else ids

  def token_bytes(self, token_id: int) -> bytes:
    """The raw bytes one id stands for (a special token: its UTF-8 text)."""
    if not 0 <= int(token_id) < self.vocab_size:
      raise TokenizerError(f"token id {token_id} is outside the vocab [0, {self.vocab_size})")
    return self._bytes[int(token_id)]

  def decode_bytes(self, ids: Iterable[int], *, skip_special: bool = False) -> bytes:
    ids = [int(i) for i in np.asarray(list(ids), dtype=np.int64).reshape(-1)]
    if skip_special:
      ids = [i for i in ids if i not in self.special_ids]
    return b"".join(self.token_bytes(i) for i in ids)

  def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
    """Ids -> text; an incomplete UTF-8 sequence decodes to U+FFFD."""
    return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

  def id_of(self, token: str) -> int:
    if token not in self._vocab:
      raise TokenizerError(f"{token!r} is not in the vocab")
    return self._vocab[token]

  # ---------------------------------------------------------------------------- chat format
  def chat_prompt(self, messages: Sequence[tuple[str, str]], *, thinking: bool = False,
                  add_bos: bool = True) -> list[int]:
    """ds4's chat format, ready for the assistant's next turn.

    `BOS [system] <｜User｜>u1<｜Assistant｜></think>a1<｜end▁of▁sentence｜><｜User｜>u2
    <｜Assistant｜>` then `<think>` when thinking, else `</think>`. `messages` are
    (role, text) pairs with role in {"system", "user", "assistant"}; the system message, if
    any, comes first.
    """
    ids = [self.bos_id] if add_bos else []
    for k, (role, text) in enumerate(messages):
      if role == "system":
        if k != 0:
          raise ValueError("the system message must come first")
        ids += self.encode(text)
      elif role == "user":
        ids += [self.user_id] + self.encode(text)
      elif role == "assistant":
        ids += [self.assistant_id, self.end_think_id] + self.encode(text) + [self.eos_id]
      else:
        raise ValueError(f"unknown chat role {role!r}: expected system, user or assistant")
    return ids + self.assistant_turn(thinking)

  def user_turn(self, text: str, *, thinking: bool = False) -> list[int]:
    """The ids that follow a finished assistant turn: `<｜User｜>text<｜Assistant｜><think>`."""
    return [self.user_id] + self.encode(text) + self.assistant_turn(thinking)

  def assistant_turn(self, thinking: bool = False) -> list[int]:
    return [self.assistant_id, self.think_id if thinking else self.end_think_id]

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size}, specials={len(self.special_ids)})"


def chat_model_of(reader) -> bool:
  """Whether a GGUF's model speaks ds4's chat format: its `ds4jax.chat` key if it has one;
  else False for a model ds4jax trained (`ds4jax.train.*`: plain text), True otherwise
  (ds4's GGUFs are chat models)."""
  field = reader.get_field("ds4jax.chat")
  if field is not None:
    return bool(field.parts[field.data[0]][0])
  return reader.get_field("ds4jax.train.command") is None


def _string_array(reader, key: str, path: str) -> list[str]:
  field = reader.get_field(key)
  if field is None:
    raise TokenizerError(f"{path}: missing GGUF metadata key {key!r}")
  try:
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
  except UnicodeDecodeError as e:
    raise TokenizerError(f"{path}: {key} holds a string that is not UTF-8 ({e})") from None
