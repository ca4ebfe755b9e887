"""`Generator`: prompts, chat format, stop conditions and streaming over any `Backend`.

The same code drives a `LocalBackend` and a split `Coordinator`, so a generation gives the same
tokens, text and telemetry fields either way.

    gen = Generator(backend, tokenizer)
    res = gen.generate("Why is the sky blue?", max_new_tokens=64, chat=True)
    res.text, res.tokens, res.timings
    for piece in gen.stream("Tell me a story", max_new_tokens=64, stop=["\\n\\n"]):
      print(piece, end="", flush=True)

    chat = gen.chat(system="Be brief.")
    chat.send("Hi!").text          # the 2nd turn computes only its new tokens
    chat.send("And then?").n_computed

Text is decoded with an incremental UTF-8 decoder over the tokens' raw bytes, so a character
split across tokens is emitted whole, and the streamed pieces always join to `result.text`.
Stop strings are matched on that text; the streamed text is held back while it could still be
the start of a stop string.
"""

from __future__ import annotations

import codecs
import dataclasses
import time
from typing import Any, Iterator, Sequence

from ds4jax.runtime.capture import Captured, CaptureSpec
from ds4jax.runtime.edits import Interventions
from ds4jax.runtime.progress import heartbeat
from ds4jax.runtime.sampling import SamplingMethod, SamplingParams
from ds4jax.runtime.types import Backend, HopTelemetry


@dataclasses.dataclass
class GenerationResult:
  """One finished generation.

  `tokens` are the sampled ids, including the one that stopped it (EOS, a stop token, or the
  token that completed a stop string). `text` is their decoded text without the EOS/stop token
  and cut before a matched stop string. `finish_reason` is "eos", "stop" or "length".
  """

  tokens: list[int]
  text: str
  finish_reason: str
  prompt_tokens: list[int]
  # Tokens the backend actually ran for the prompt (the rest came from the reused KV prefix).
  n_prefill_computed: int
  timings: dict[str, float]
  # One list of per-hop telemetry per backend step (the first step is the prefill).
  telemetry: list[list[HopTelemetry]]
  logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
  # With `capture=`: the asked points of every position the model processed, in order (the
  # prompt, then each sampled token fed back), a `runtime.capture.Captured`.
  captured: Captured | None = None

  @property
  def cached_prompt_tokens(self) -> int:
    """Prompt tokens whose state was reused, not computed: the session's own prefix, a
    restored snapshot, or ds4's disk KV cache (0 for a fresh session without a hit)."""
    return len(self.prompt_tokens) - self.n_prefill_computed

  def hop_summary(self) -> list[dict[str, Any]]:
    """Per-hop totals: prefill and decode compute time, queue time and bytes."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for i, hops in enumerate(self.telemetry):
      phase = "prefill" if i == 0 else "decode"
      for h in hops:
        row = rows.setdefault((h.stage, h.host), dict(
            stage=h.stage, host=h.host, prefill_s=0.0, decode_s=0.0, queue_s=0.0, bytes_in=0,
            bytes_out=0, decode_steps=0))
        row[f"{phase}_s"] += h.compute_s
        row["queue_s"] += h.queue_s
        row["bytes_in"] += h.bytes_in
        row["bytes_out"] += h.bytes_out
        row["decode_steps"] += phase == "decode"
    return list(rows.values())

  def to_dict(self) -> dict[str, Any]:
    return {
        "tokens": self.tokens,
        "text": self.text,
        "finish_reason": self.finish_reason,
        "prompt_tokens": self.prompt_tokens,
        "n_prefill_computed": self.n_prefill_computed,
        "cached_prompt_tokens": self.cached_prompt_tokens,
        "timings": self.timings,
        "hops": self.hop_summary(),
        "telemetry": [[h.to_dict() for h in hops] for hops in self.telemetry],
        "logprobs": [[list(p) for p in lp] for lp in self.logprobs],
    }


class TextStream:
  """An iterator of text pieces; `.result` holds the `GenerationResult` once exhausted."""

  def __init__(self, gen: Iterator[str]):
    self._gen = gen
    self.result: GenerationResult | None = None

  def __iter__(self):
    return self

  def __next__(self) -> str:
    try:
      return next(self._gen)
    except StopIteration as stop:
      self.result = stop.value
      raise

  def close(self):
    self._gen.close()


class Generator:
  """Generation over a `Backend` with a `Tokenizer`."""

  # Period of the "prefilling N prompt tokens: 12s" line for backends without their own.
  progress_every_s = 5.0

  def __init__(self, backend: Backend, tokenizer):
    self.backend = backend
    self.tokenizer = tokenizer

  # --------------------------------------------------------------------------- prompts
  def prompt_ids(self, prompt: str | None = None, prompt_tokens: Sequence[int] | None = None,
                 *, chat: bool = False, system: str | None = None,
                 thinking: bool = False) -> list[int]:
    """The transcript for a prompt: raw ids, BOS + text, or the ds4 chat format."""
    if (prompt is None) == (prompt_tokens is None):
      raise ValueError("give exactly one of prompt and prompt_tokens")
    if prompt_tokens is not None:
      ids = [int(t) for t in prompt_tokens]
      if not ids:
        raise ValueError("prompt_tokens is empty")
      return ids
    return self.tokenizer.prompt(prompt, chat=chat, system=system if chat else None,
                                 thinking=thinking)

  # ------------------------------------------------------------------------ generation
  def generate(self, prompt: str | None = None, *, prompt_tokens: Sequence[int] | None = None,
               max_new_tokens: int = 64, sampling: SamplingMethod | None = None,
               stop: Sequence[str] = (), stop_tokens: Sequence[int] = (), chat: bool = False,
               system: str | None = None, thinking: bool = False, top_logprobs: int = 0,
               sid: str | None = None, capture: CaptureSpec | None = None,
               edits: Interventions | None = None) -> GenerationResult:
    """Generates to completion; same arguments as `stream`."""
    it = self.stream(prompt, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens,
                     sampling=sampling, stop=stop, stop_tokens=stop_tokens, chat=chat,
                     system=system, thinking=thinking, top_logprobs=top_logprobs, sid=sid,
                     capture=capture, edits=edits)
    for _ in it:
      pass
    return it.result

  def stream(self, prompt: str | None = None, *, prompt_tokens: Sequence[int] | None = None,
             max_new_tokens: int = 64, sampling: SamplingMethod | None = None,
             stop: Sequence[str] = (), stop_tokens: Sequence[int] = (), chat: bool = False,
             system: str | None = None, thinking: bool = False, top_logprobs: int = 0,
             sid: str | None = None, capture: CaptureSpec | None = None,
             edits: Interventions | None = None) -> TextStream:
    """Streams text pieces; the returned iterator's `.result` is set at the end.

    Args:
      prompt / prompt_tokens: a text prompt, or the exact transcript ids.
      max_new_tokens: stop after this many sampled tokens.
      sampling: a `SamplingMethod` (default greedy).
      stop: strings that end the generation; the text is cut before the match.
      stop_tokens: ids that end it besides EOS (not part of the text).
      chat / system / thinking: wrap `prompt` in the ds4 chat format.
      top_logprobs: also collect the k most likely (id, logprob) per step.
      sid: an existing backend session to reuse (its KV prefix); None uses a fresh one that is
        closed at the end.
      capture: named points to keep on every step (`result.captured`); with a reused `sid`
        the rows start where the session's reused prefix ends.
      edits: interventions applied on every step (`runtime.edits.Interventions`, e.g. ds4's
        directional steering), checked against the model before anything runs.
    """
    if edits is not None:
      edits.resolve(self.backend.cfg)
    ids = self.prompt_ids(prompt, prompt_tokens, chat=chat, system=system, thinking=thinking)
    # Checked here, not on the first next(), so a bad call fails where it is made.
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ctx = int(self.backend.ctx_size)
    if len(ids) > ctx:
      raise ValueError(f"the prompt has {len(ids)} tokens, more than the context size {ctx} "
                       "(--ctx_size)")
    if isinstance(stop, str):
      stop = [stop]
    if any(not s for s in stop):
      raise ValueError("stop strings must be non-empty")
    return TextStream(self._run(ids, max_new_tokens, sampling, stop, stop_tokens, top_logprobs,
                                sid, capture, edits))

  def _run(self, transcript: list[int], max_new_tokens: int, sampling, stop, stop_tokens,
           top_logprobs: int, sid: str | None, capture: CaptureSpec | None = None,
           edits: Interventions | None = None):
    params = (sampling or SamplingParams()).to_params()
    end_ids = {self.tokenizer.eos_id, *map(int, stop_tokens)}
    own_session = sid is None
    sid = self.backend.new_session() if own_session else sid
    prompt = list(transcript)
    transcript = list(transcript)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    longest_stop = max((len(s) for s in stop), default=0)
    text, emitted = "", 0
    tokens: list[int] = []
    telemetry: list[list[HopTelemetry]] = []
    logprobs: list[list[tuple[int, float]]] = []
    captured: list[Captured] = []
    kw = {} if capture is None else {"capture": capture}  # backends without capture: as before
    if edits is not None:
      kw["edits"] = edits
    finish, n_prefill, cut = "length", 0, False
    # Backend time only: what the consumer does between pieces is not the model's speed.
    prefill_s = decode_s = 0.0
    t0 = time.perf_counter()
    # The context holds the prompt and every token fed back: the last step that fits runs
    # ctx tokens and samples one more, then the generation stops at "length".
    max_new_tokens = min(max_new_tokens, int(self.backend.ctx_size) - len(transcript) + 1)
    try:
      for i in range(max_new_tokens):
        t_step = time.perf_counter()
        if i == 0 and not self.backend.reports_prefill_progress:
          # One step runs the whole prompt: say it is alive if that takes a while.
          with heartbeat(f"prefilling {len(transcript)} prompt tokens", self.progress_every_s):
            res = self.backend.step(sid, transcript, params, i, top_logprobs=top_logprobs,
                                    **kw)
        else:
          res = self.backend.step(sid, transcript, params, i, top_logprobs=top_logprobs, **kw)
        if i == 0:
          prefill_s, n_prefill = time.perf_counter() - t_step, res.n_computed
        else:
          decode_s += time.perf_counter() - t_step
        telemetry.append(res.telemetry)
        if capture is not None:
          captured.append(res.captured)
        if top_logprobs:
          logprobs.append(res.logprobs)
        tokens.append(res.token)
        transcript.append(res.token)
        if res.token in end_ids:
          finish = "eos" if res.token == self.tokenizer.eos_id else "stop"
          break
        text += decoder.decode(self.tokenizer.token_bytes(res.token))
        if stop:
          # Only the tail can hold a new match: search from just before the emitted text.
          lo = max(0, emitted - longest_stop)
          hits = [j for j in (text.find(s, lo) for s in stop) if j >= 0]
          if hits:
            text, finish, cut = text[:min(hits)], "stop", True
            break
          hold = _stop_prefix_len(text, stop)
        else:
          hold = 0
        if len(text) - hold > emitted:
          yield text[emitted:len(text) - hold]
          emitted = len(text) - hold
      if not cut:
        text += decoder.decode(b"", final=True)
    finally:
      if own_session:
        self.backend.close_session(sid)
    if len(text) > emitted:
      yield text[emitted:]
    t_end = time.perf_counter()
    n_decode = len(tokens) - 1
    timings = {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_tokens": n_prefill,
        "decode_tokens": n_decode,
        "prefill_tok_s": n_prefill / prefill_s if prefill_s > 0 else 0.0,
        "decode_tok_s": n_decode / decode_s if n_decode and decode_s > 0 else 0.0,
        "total_s": t_end - t0,
    }
    return GenerationResult(tokens=tokens, text=text, finish_reason=finish, prompt_tokens=prompt,
                            n_prefill_computed=n_prefill, timings=timings, telemetry=telemetry,
                            logprobs=logprobs,
                            captured=None if capture is None else Captured.concat(captured))

  # ------------------------------------------------------------------------------- chat
  def chat(self, *, system: str | None = None, thinking: bool = False) -> "ChatSession":
    return ChatSession(self, system=system, thinking=thinking)


class ChatSession:
  """A multi-turn chat whose transcript, and so the backend's KV prefix, carries over.

  Each turn appends `<｜User｜>text<｜Assistant｜></think>` (or `<think>`) to the exact ids
  generated so far, so the backend only computes the new turn. Reasoning of earlier turns is
  kept as generated (not re-rendered) for the same reason.
  """

  def __init__(self, generator: Generator, *, system: str | None = None, thinking: bool = False):
    self.generator = generator
    self.thinking = thinking
    self.tokenizer = generator.tokenizer
    self.sid = generator.backend.new_session()
    self.transcript: list[int] = [self.tokenizer.bos_id]
    if system:
      self.transcript += self.tokenizer.encode(system)
    self.turns: list[GenerationResult] = []

  def _next_prompt(self, text: str) -> list[int]:
    return self.transcript + self.tokenizer.user_turn(text, thinking=self.thinking)

  def stream(self, text: str, **kw) -> TextStream:
    """Streams the assistant's reply to `text`; the transcript updates when it ends."""
    ids = self._next_prompt(text)
    inner = self.generator.stream(prompt_tokens=ids, sid=self.sid, **kw)

    def run():
      yield from inner
      res = inner.result
      self.transcript = ids + res.tokens
      if res.finish_reason != "eos":
        # Close the turn so the next one reads as a new user message (and its KV is reused).
        self.transcript.append(self.tokenizer.eos_id)
      self.turns.append(res)
      return res

    return TextStream(run())

  def send(self, text: str, **kw) -> GenerationResult:
    it = self.stream(text, **kw)
    for _ in it:
      pass
    return it.result

  def close(self):
    self.generator.backend.close_session(self.sid)


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
  """Length of the longest tail of `text` that is a proper prefix of a stop string."""
  best = 0
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), best, -1):
      if text.endswith(s[:k]):
        best = k
        break
  return best


__all__ = ["Generator", "GenerationResult", "TextStream", "ChatSession"]
