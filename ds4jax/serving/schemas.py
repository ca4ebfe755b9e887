"""OpenAI-compatible request bodies (validated) and response builders.

Requests are pydantic models that reject what the server cannot honour with a clear message
(for example `n > 1` or an unknown field), so a client learns at once instead of getting a
silently different answer. Responses are plain dicts in the OpenAI shapes, built by the
functions at the bottom; the `openai` client parses them.
"""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any, Callable, Literal, Optional, Union

import pydantic
from pydantic import Field

from ds4jax.runtime.capture import CaptureError, CaptureSpec
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.serving.research import plain_name

# Generation bounds. The context window caps the real length; this only rejects absurd values.
MAX_TOKENS_LIMIT = 1 << 20
MAX_STOP_STRINGS = 4
_NO_LOGPROBS = "logprobs are not supported yet"


class _Body(pydantic.BaseModel):
  # Unknown fields are errors: a misspelt `max_token` must not be silently ignored.
  model_config = pydantic.ConfigDict(extra="forbid")


def _refuse(*fields: str, message: str, accept: Callable[[Any], bool] = lambda v: not v):
  """A field validator for an option the server cannot honour: any value but the unset one
  (falsy, or what `accept` allows) is a 400 with `message`, not a silently different answer."""

  def check(cls, v):
    if not accept(v):
      raise ValueError(message)
    return v

  return pydantic.field_validator(*fields)(classmethod(check))


class StreamOptions(_Body):
  include_usage: bool = False


_Scale = Optional[float]


class Steering(_Body):
  """The `steering` extension: ds4's options, each overriding the server's flag of that name
  (docs/serving.md). Files are plain names in the server's --steering_dir; a file of null
  turns that file off; scales of 0 turn their file off."""

  dir_steering_file: Optional[str] = None
  dir_steering_ffn: _Scale = Field(default=None, allow_inf_nan=False)
  dir_steering_attn: _Scale = Field(default=None, allow_inf_nan=False)
  expert_steering_file: Optional[str] = None
  expert_steering_scale: _Scale = Field(default=None, allow_inf_nan=False)

  @pydantic.field_validator("dir_steering_file", "expert_steering_file")
  @classmethod
  def _plain(cls, v):
    if v is not None and not plain_name(v):
      raise ValueError(f"a plain file name in the server's --steering_dir, got {v!r}")
    return v

  def options(self) -> dict[str, Any]:
    """The options the request gave (an explicit null included)."""
    return self.model_dump(exclude_unset=True)


class Capture(_Body):
  """The `capture` extension: generate.py's --capture / --capture_layers spellings."""

  points: Union[str, list[str]]  # "ffn_out,router_ids" or a list of names
  layers: Union[str, list[int]] = "all"  # "all", "A:B" (inclusive), "i,j" or a list
  positions: Union[str, list[int]] = "all"  # "all", "last", "A:B", "i,j" or a list

  @pydantic.model_validator(mode="after")
  def _parse(self):
    try:
      CaptureSpec.parse(self.points, self.layers, self.positions)
    except CaptureError as e:
      raise ValueError(str(e)) from None
    return self


class _Sampling(_Body):
  """Fields shared by both endpoints."""

  model: Optional[str] = None
  max_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
  temperature: float = Field(default=1.0, ge=0.0, le=100.0)
  top_p: float = Field(default=1.0, gt=0.0, le=1.0)
  # Not in the OpenAI API, but llama.cpp/vLLM servers accept it; 0 disables.
  top_k: int = Field(default=0, ge=0)
  seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
  stop: Union[str, list[str], None] = None
  stream: bool = False
  stream_options: Optional[StreamOptions] = None
  n: int = 1
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: Optional[dict[str, float]] = None
  user: Optional[str] = None
  # Extensions (docs/serving.md): absent steering = the server's; null = none.
  steering: Optional[Steering] = None
  capture: Optional[Capture] = None

  _one_choice = _refuse("n", message="only n=1 is supported", accept=lambda v: v == 1)
  _no_penalty = _refuse("presence_penalty", "frequency_penalty",
                        message="presence/frequency penalties are not supported (must be 0)")
  _no_bias = _refuse("logit_bias", message="logit_bias is not supported")

  @pydantic.field_validator("stop")
  @classmethod
  def _stops(cls, v):
    if v is None:
      return v
    stops = [v] if isinstance(v, str) else v
    if len(stops) > MAX_STOP_STRINGS:
      raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
    if any(s == "" for s in stops):
      raise ValueError("stop strings must be non-empty")
    return v

  def stop_list(self) -> list[str]:
    if self.stop is None:
      return []
    return [self.stop] if isinstance(self.stop, str) else list(self.stop)

  def sampling(self) -> SamplingParams:
    # No seed means a fresh random stream, as OpenAI does; greedy ignores the seed anyway.
    seed = self.seed if self.seed is not None else secrets.randbits(62)
    return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                          seed=seed)

  def include_usage(self) -> bool:
    return bool(self.stream_options and self.stream_options.include_usage)

  def research(self) -> dict[str, Any]:
    """The job's `steering` (None: the server's; null: every file off) and `capture`."""
    if "steering" not in self.model_fields_set:
      steering = None
    elif self.steering is None:
      steering = {"dir_steering_file": None, "expert_steering_file": None}
    else:
      steering = self.steering.options()
    capture = None if self.capture is None else self.capture.model_dump()
    return {"steering": steering, "capture": capture}


class CompletionRequest(_Sampling):
  """POST /v1/completions. `prompt` is one string or one list of token ids (no batches)."""

  prompt: Union[str, list[int], list[str]]
  max_tokens: Optional[int] = Field(default=16, ge=1, le=MAX_TOKENS_LIMIT)
  logprobs: Optional[int] = Field(default=None, ge=0, le=20)
  echo: bool = False
  suffix: Optional[str] = None
  best_of: Optional[int] = None

  @pydantic.field_validator("prompt")
  @classmethod
  def _one_prompt(cls, v):
    if isinstance(v, list):
      if not v:
        raise ValueError("prompt must not be empty")
      if all(isinstance(x, str) for x in v):
        if len(v) != 1:
          raise ValueError("batched prompts are not supported: send one prompt per request")
        return v[0]
      if any(isinstance(x, bool) or x < 0 for x in v):
        raise ValueError("token ids must be non-negative integers")
    return v

  _no_logprobs = _refuse("logprobs", message=_NO_LOGPROBS)
  _no_echo = _refuse("echo", message="echo is not supported")
  _no_suffix = _refuse("suffix", message="suffix is not supported")
  _no_best_of = _refuse("best_of", message="best_of is not supported",
                        accept=lambda v: v in (None, 1))


class TextPart(_Body):
  type: Literal["text"]
  text: str


class ChatMessage(_Body):
  role: Literal["system", "developer", "user", "assistant"]
  content: Union[str, list[TextPart], None] = None
  name: Optional[str] = None

  def text(self) -> str:
    if self.content is None:
      return ""
    if isinstance(self.content, str):
      return self.content
    return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
  """POST /v1/chat/completions."""

  messages: list[ChatMessage] = Field(min_length=1)
  max_completion_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
  logprobs: bool = False
  top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)

  _no_logprobs = _refuse("logprobs", "top_logprobs", message=_NO_LOGPROBS)

  def max_new_tokens(self, default: int) -> int:
    return self.max_completion_tokens or self.max_tokens or default

  def message_dicts(self) -> list[dict[str, str]]:
    # "developer" is OpenAI's newer name for the system role.
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages]


# ---- responses --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
  """OpenAI's usage object; `cached_tokens`: prompt tokens whose state was reused (the
  session's prefix or ds4's disk KV cache), OpenAI's `prompt_tokens_details.cached_tokens`."""
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens,
          "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion(rid: str, model: str, text: str, finish_reason: Optional[str],
               use: Optional[dict[str, int]] = None, created: Optional[int] = None,
               logprobs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """A `text_completion` object; also the streaming chunk shape (with `use` None)."""
  body = {"id": rid, "object": "text_completion", "created": created or int(time.time()),
          "model": model,
          "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                       "finish_reason": finish_reason}]}
  if use is not None:
    body["usage"] = use
  return body


def chat_completion(rid: str, model: str, text: str, finish_reason: str, use: dict[str, int],
                    created: Optional[int] = None,
                    logprobs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  return {"id": rid, "object": "chat.completion", "created": created or int(time.time()),
          "model": model,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                       "logprobs": logprobs, "finish_reason": finish_reason}],
          "usage": use}


def chat_chunk(rid: str, model: str, created: int, delta: Optional[dict[str, str]],
               finish_reason: Optional[str] = None,
               use: Optional[dict[str, int]] = None) -> dict[str, Any]:
  """A `chat.completion.chunk`. `delta` None makes the usage-only chunk (empty choices)."""
  choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                       "finish_reason": finish_reason}]
  body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
          "choices": choices}
  if use is not None:
    body["usage"] = use
  return body


def error(message: str, type_: str, code: Optional[str] = None, **extra) -> dict[str, Any]:
  """The OpenAI error envelope; `extra` fields (e.g. missing_layers) go inside `error`."""
  return {"error": {"message": message, "type": type_, "param": None, "code": code, **extra}}
