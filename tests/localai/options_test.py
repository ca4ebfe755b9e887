"""LoadModel options: ds4's keys and messages (LocalAI PR #10098), ds4jax's additions, and the
model file checks. No gRPC and no model process: `options.load_spec` on plain objects."""

import socket
import types

import gguf
import pytest

from ds4jax.localai import options
from ds4jax.localai.options import LoadError, fit_to_model, load_spec, parse_options
from ds4jax.localai.tokenizer_proc import TokenizerProcess

TINY = {"n_layers": 4, "context_length": 4096}  # the tiny preset


def req(path="", *opts, model="tiny", ctx=0, model_path=""):
  return types.SimpleNamespace(Model=model, ModelFile=path, ModelPath=model_path,
                               ContextSize=ctx, Threads=4, Options=list(opts))


def coord(path, *extra, layers="0:1", listen="127.0.0.1:45678", **kw):
  return req(path, "ds4_role:coordinator", f"ds4_layers:{layers}", f"ds4_listen:{listen}",
             *extra, **kw)


def test_parse_options_splits_at_the_first_colon():
  got = parse_options(["ds4_listen:0.0.0.0:1234", "ssd_streaming", " a : b ", "", "k:"])
  assert got == {"ds4_listen": "0.0.0.0:1234", "ssd_streaming": True, "a": "b", "k": ""}


def test_single_node_defaults(tiny_gguf):
  spec = load_spec(req(tiny_gguf, "unknown_key:1", "mtp_path:/x", "ds4_role:worker"))
  assert not spec.coordinator and spec.layers == "all" and spec.listen is None
  assert spec.route_timeout == 60 and spec.identity == "tiny"
  assert spec.ctx_size == 32768  # ContextSize 0 -> ds4's default
  assert fit_to_model(spec, **TINY).ctx_size == 4096  # capped at the model's context length
  assert spec.ignored == ("mtp_path",) and spec.streaming is None
  args = spec.model_args("/c")
  assert f"--gguf={tiny_gguf}" in args and "--layers=all" in args and "--cache_dir=/c" in args
  assert not any(a.startswith(("--listen", "--ssd")) for a in args)


def test_ssd_streaming_options_become_flags(tiny_gguf):
  spec = load_spec(req(tiny_gguf, "ssd_streaming", "ssd_streaming_cache_experts:12GB",
                       "ssd_streaming_preload_experts:64", "ssd_streaming_cold"))
  assert spec.streaming == ("12GB", 64, True) and spec.ignored == ()
  args = spec.model_args()
  assert args[-4:] == ["--ssd_streaming", "--ssd_streaming_cache_experts=12GB",
                       "--ssd_streaming_preload_experts=64", "--ssd_streaming_cold"]
  assert load_spec(req(tiny_gguf, "ssd_streaming")).streaming == ("32GB", 0, False)
  assert load_spec(req(tiny_gguf, "ssd_streaming_cache_experts:1GB")).streaming is None
  with pytest.raises(LoadError, match=r"^ds4: ssd_streaming_cache_experts='lots': expected a "
                     "size"):
    load_spec(req(tiny_gguf, "ssd_streaming", "ssd_streaming_cache_experts:lots"))


def test_coordinator_spec(tiny_gguf, tmp_path):
  key = tmp_path / "bridge.key"
  key.write_text("0123456789abcdef0123456789abcdef\n")
  spec = load_spec(coord(tiny_gguf, "ds4_route_timeout:7", "ds4_activation_dtype:16",
                         "ds4_key_file:bridge.key", "prefill_chunk:64", ctx=256,
                         model_path=str(tmp_path)))
  assert spec.coordinator and spec.layers == "0:1" and spec.listen == ("127.0.0.1", 45678)
  assert spec.route_timeout == 7 and spec.activation_dtype == "bf16" and spec.ctx_size == 256
  assert spec.key_file == str(key) and spec.prefill_chunk == 64
  args = spec.model_args()
  for a in ("--layers=0:1", "--listen=127.0.0.1:45678", "--route_timeout=7.0",
            "--activation_dtype=bf16", f"--key_file={key}", "--prefill_chunk=64"):
    assert a in args, args


def test_model_file_relative_to_the_models_dir(tiny_gguf):
  import os
  d, name = os.path.split(tiny_gguf)
  assert load_spec(req("", model=name, model_path=d)).path == tiny_gguf
  with pytest.raises(LoadError, match="ds4: ModelOptions.Model or .ModelFile must be set"):
    load_spec(req("", model=""))


ROLE = "ds4_role:coordinator"
LAYERS = "ds4_layers:0:1"
LISTEN = "ds4_listen:127.0.0.1:45679"


@pytest.mark.parametrize("opts, needle", [
    ([ROLE], "ds4: ds4_role:coordinator requires ds4_layers and ds4_listen"),
    ([ROLE, LAYERS], "ds4: ds4_role:coordinator requires ds4_layers and ds4_listen"),
    ([ROLE, LISTEN], "ds4: ds4_role:coordinator requires ds4_layers and ds4_listen"),
    ([ROLE, LISTEN, "ds4_layers:0:x"], "ds4: invalid ds4_layers (want START:END or "
     "START:output)"),
    ([ROLE, LISTEN, "ds4_layers:0"], "ds4: invalid ds4_layers"),
    ([ROLE, LISTEN, "ds4_layers:0:1:2"], "ds4: invalid ds4_layers"),
    ([ROLE, LISTEN, "ds4_layers:3:1"], "END is before START"),
    ([ROLE, LISTEN, "ds4_layers:1:2"], "ds4: coordinator layer range must start at layer 0"),
    ([ROLE, LISTEN, "ds4_layers:0:9"], "ends past the final model layer 3"),
    ([ROLE, LAYERS, "ds4_listen:127.0.0.1"], "ds4: ds4_listen must be host:port"),
    ([ROLE, LAYERS, "ds4_listen::1234"], "ds4: ds4_listen must be host:port"),
    ([ROLE, LAYERS, "ds4_listen:127.0.0.1:0"], "ds4: ds4_listen port must be a positive "
     "integer"),
    ([ROLE, LAYERS, "ds4_listen:127.0.0.1:http"], "ds4: ds4_listen port must be a positive"),
    ([ROLE, LAYERS, "ds4_listen:127.0.0.1:70000"], "ds4: ds4_listen port must be a positive"),
    (["ds4_route_timeout:0"], "ds4: ds4_route_timeout must be a positive integer"),
    (["ds4_route_timeout:soon"], "ds4: ds4_route_timeout must be a positive integer"),
    ([ROLE, LAYERS, LISTEN, "ds4_activation_dtype:f8"], "ds4_activation_dtype must be f32, "
     "bf16 or int8"),
    ([ROLE, LAYERS, LISTEN, "ds4_key_file:/nonexistent/k"], "ds4_key_file file not found: "
     "/nonexistent/k"),
    ([ROLE, LAYERS, LISTEN, "ds4_tls_key:" + __file__], "ds4_tls_key needs ds4_tls_cert"),
])
def test_bad_options_are_one_line(tiny_gguf, opts, needle):
  with pytest.raises(LoadError) as e:
    fit_to_model(load_spec(req(tiny_gguf, *opts)), **TINY)
  msg = str(e.value)
  assert needle in msg and "\n" not in msg, msg


def test_missing_and_wrong_files(tmp_path):
  with pytest.raises(LoadError, match="ds4: model file not found: /nonexistent/m.gguf"):
    load_spec(req("/nonexistent/m.gguf"))
  with pytest.raises(LoadError, match="is a directory, not a GGUF file"):
    load_spec(req(str(tmp_path)))
  # The contents are checked by the tokenizer process (the first thing LoadedModel.start runs).
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"definitely not a gguf file")
  with pytest.raises(LoadError, match="not a GGUF file") as e:
    TokenizerProcess(load_spec(req(str(junk))).path)
  assert "junk.gguf" in str(e.value) and str(e.value).startswith("ds4: ")
  llama = tmp_path / "llama.gguf"  # a valid GGUF, another architecture
  w = gguf.GGUFWriter(str(llama), "llama")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(LoadError) as e:
    TokenizerProcess(str(llama))
  assert str(e.value).startswith("ds4: ") and "\n" not in str(e.value), e.value


def test_listen_port_in_use(tiny_gguf):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    with pytest.raises(LoadError, match=f"cannot listen on 127.0.0.1:{port}: address already "
                       "in use"):
      load_spec(coord(tiny_gguf, listen=f"127.0.0.1:{port}"))


def test_ds4_engine_keys_are_known():
  assert "mtp_path" in options.DS4_ENGINE_KEYS and "ssd_streaming" not in options.DS4_ENGINE_KEYS


def test_kv_cache_dir_is_the_disk_kv_cache(tiny_gguf, tmp_path):
  """ds4's kv_cache_dir (relative: to the models dir) becomes the model process's
  --kv_disk_dir (issue 23 item 3), no longer an ignored key."""
  spec = load_spec(req(tiny_gguf, "kv_cache_dir:kv", model_path=str(tmp_path)))
  assert spec.kv_cache_dir == str(tmp_path / "kv") and spec.ignored == ()
  assert f"--kv_disk_dir={tmp_path / 'kv'}" in spec.model_args()
  assert not any(a.startswith("--kv_disk") for a in load_spec(req(tiny_gguf)).model_args())
  (tmp_path / "f").write_text("x")
  with pytest.raises(LoadError, match="kv_cache_dir .* is a file, not a directory"):
    load_spec(req(tiny_gguf, "kv_cache_dir:f", model_path=str(tmp_path)))
  with pytest.raises(LoadError, match="kv_cache_dir needs a directory"):
    load_spec(req(tiny_gguf, "kv_cache_dir"))


def test_tokenizer_process_matches_the_tokenizer(tiny_gguf):
  from ds4jax.tokenizer import Tokenizer
  tok, child = Tokenizer.from_gguf(tiny_gguf), TokenizerProcess(tiny_gguf)
  try:
    assert (child.n_layers, child.context_length) == (4, 4096)
    assert child.vocab_size == tok.vocab_size and len(child.layer_bytes[1]) == 4
    assert child.encode("Hello, 世界", add_bos=True) == tok.encode("Hello, 世界", add_bos=True)
    msgs = [("system", "Be brief."), ("user", "Hi")]
    assert child.chat_prompt(msgs, thinking=True) == tok.chat_prompt(msgs, thinking=True)
    ids = tok.encode("Hello, 世界")
    assert child.decode(ids) == tok.decode(ids)
    with pytest.raises(ValueError, match="unknown chat role"):
      child.chat_prompt([("robot", "x")])
  finally:
    child.close()
  assert child.proc.returncode == 0


def test_directional_steering_options_reach_the_model_process(tiny_gguf, tmp_path):
  """Issue 22 item 6: ds4's directional_steering_* (a path relative to the model directory,
  as ds4 takes it) become the model process's --dir_steering_* flags."""
  (tmp_path / "dir.f32").write_bytes(b"\0" * 16)  # its size is checked against the model later
  r = req(tiny_gguf, "directional_steering_file:dir.f32", "directional_steering_ffn:0.5",
          model_path=str(tmp_path))
  spec = load_spec(r)
  assert spec.steering == (str(tmp_path / "dir.f32"), 0.5, None) and spec.ignored == ()
  args = spec.model_args()
  assert f"--dir_steering_file={tmp_path / 'dir.f32'}" in args
  assert "--dir_steering_ffn=0.5" in args and not any("steering_attn" in a for a in args)
  with pytest.raises(LoadError, match="need directional_steering_file"):
    load_spec(req(tiny_gguf, "directional_steering_attn:1"))
  with pytest.raises(LoadError, match="directional_steering_file file not found"):
    load_spec(req(tiny_gguf, "directional_steering_file:nope.f32", model_path=str(tmp_path)))
  with pytest.raises(LoadError, match="directional_steering_ffn must be a number"):
    load_spec(req(tiny_gguf, "directional_steering_file:dir.f32",
                  "directional_steering_ffn:lots", model_path=str(tmp_path)))
