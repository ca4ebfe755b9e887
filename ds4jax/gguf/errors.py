"""One-line errors for GGUF input. All are `ValueError`s, so callers can catch them broadly,
and every message names the file, key or tensor at fault."""

from __future__ import annotations


class GGUFError(ValueError):
  """A GGUF file or tensor set cannot be used."""


class NotGGUFError(GGUFError):
  """The file does not start with the GGUF magic."""


class TruncatedError(GGUFError):
  """The file ends before its header or tensor data does."""


class ArchitectureError(GGUFError):
  """`general.architecture` is missing or not 'deepseek4'."""


class MetadataError(GGUFError):
  """A metadata key is missing or has the wrong type or value."""


class MissingTensorError(GGUFError):
  """A tensor the requested slice needs is absent."""


class ShapeError(GGUFError):
  """A tensor's dims differ from the ones the config implies."""


class TensorTypeError(GGUFError):
  """A tensor's GGML type is not one ds4jax accepts for it."""
