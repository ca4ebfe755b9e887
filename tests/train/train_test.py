"""ds4jax.train: the training forward is the inference model, the loss falls, a resume is
bit-exact, the export is the trained model, the tokenizer round-trips, the quantisers work."""

import importlib.util
import json
import pathlib

import gguf
import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from ds4jax.config import LayerRange
from ds4jax.gguf import quantize as qz
from ds4jax.runtime.load import stage_from_tensors
from ds4jax.runtime.runner import StageRunner
from ds4jax.testing import tiny, tiny_vocab
from ds4jax.tokenizer import Tokenizer
from ds4jax.train import data, export
from ds4jax.train import model as train_model
from ds4jax.train.trainer import Trainer, model_config

REPO = pathlib.Path(__file__).resolve().parents[2]
jax.config.update("jax_numpy_rank_promotion", "raise")


def _config(variant="tiny"):
  spec = importlib.util.spec_from_file_location("train_docs", REPO / "configs" / "train_docs.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def test_training_forward_is_the_inference_forward():
  """batch_logits (grouped training MoE, vmapped attention) == StageRunner.forward (the
  inference MoE's grouped branch at this length), per sequence."""
  cfg = model_config(_config())
  stage = stage_from_tensors(cfg, "all", tiny.build_tensors(cfg, seed=3, experts="q8"))
  tokens_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 48)).astype(np.int32)
  logits_BTV, experts = jax.jit(lambda s, x: train_model.batch_logits(s, x, block=16))(
      stage, tokens_BT)
  assert len(experts) == cfg.n_layers and experts[0].shape == (96, cfg.n_experts_used)
  runner = StageRunner(stage, ctx_size=48, max_chunk=64)
  for b in range(2):
    ref_TV, _ = runner.forward(runner.init_state(), tokens_BT[b], None, 0)
    np.testing.assert_allclose(np.asarray(logits_BTV[b]), ref_TV, atol=2e-5, rtol=0)


def test_vocab_is_ds4_and_round_trips():
  train, _ = data.split_topics()
  vocab = data.train_vocab(list(train.values())[:20], 400)
  tok = vocab.tokenizer()
  assert tok.vocab_size == 400 and tok.bos_id == 0 and tok.eos_id == 1
  text = 'The "assert" statement\n   assert_stmt ::= "assert" expression\n'
  ids = tok.encode(text)
  assert tok.decode(ids) == text and len(ids) < len(text.encode())
  assert tok.chat_prompt([("user", "Hi")])[:2] == [tok.bos_id, tok.user_id]
  assert data.Vocab.from_json(vocab.to_json()) == vocab


def test_held_out_topics_share_no_line_with_training():
  train, held = data.split_topics()
  assert set(held) == set(data.HELD_OUT) and not set(held) & set(train)
  train_text = "\n".join(train.values())
  for k, text in held.items():
    assert not [l for l in text.splitlines() if len(l) > 40 and l in train_text], k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A straight 8-step run, and one stopped at step 4 and resumed from its checkpoint."""
  c = _config()
  straight = Trainer(c, str(tmp_path_factory.mktemp("straight")), say=lambda m: None)
  straight.run()
  wd = str(tmp_path_factory.mktemp("resumed"))
  first = Trainer(c, wd, say=lambda m: None)
  first.run(4)
  resumed = Trainer(c, wd, say=lambda m: None)
  assert int(resumed.state.step) == 4
  resumed.run()
  return straight, resumed


def test_loss_falls(runs):
  straight, _ = runs
  losses = [h["loss"] for h in straight.history]
  assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses
  evals = [h["eval_loss"] for h in straight.history if "eval_loss" in h]
  assert len(evals) == 2 and evals[1] < evals[0]


def test_resume_is_bit_exact(runs):
  straight, resumed = runs
  assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
  assert resumed.history[-1]["eval_loss"] == straight.history[-1]["eval_loss"]
  for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_is_the_trained_model(runs, tmp_path):
  """The f32 GGUF through inference gives the trainer's held-out loss; Q8_0 experts stay
  close; the report has what the README quotes."""
  trainer, _ = runs
  rep = export.export_run(trainer, str(tmp_path / "m.gguf"), str(tmp_path / "m.json"),
                          command="test", wall_s=1.0, say=lambda m: None)
  study = rep["study"]
  assert abs(study["f32"]["heldout_loss"] - trainer.history[-1]["eval_loss"]) < 1e-4
  assert abs(study["q8"]["heldout_loss"] - study["f32"]["heldout_loss"]) < 0.02
  assert "q2" not in study  # the tiny config's widths are not multiples of 256
  f = gguf.GGUFReader(str(tmp_path / "m.gguf"))
  types = {t.name: t.tensor_type for t in f.tensors}
  assert types["blk.1.ffn_gate_exps.weight"] == Q.Q8_0
  assert types["blk.1.attn_q_a.weight"] == Q.Q8_0 and types["token_embd.weight"] == Q.F16
  assert Tokenizer.from_gguf(str(tmp_path / "m.gguf")).vocab_size == trainer.cfg.vocab_size
  saved = json.loads((tmp_path / "m.json").read_text())
  for k in ("final_train_loss", "final_heldout_loss", "unigram_heldout_ppl", "train_tok_s",
            "history", "study"):
    assert k in saved, k


def test_q2_variant(tmp_path):
  """ds4's q2 recipe on the tiny preset's float weights: IQ2_XXS gate/up, Q2_K down, the rest
  untouched; the logits stay correlated with the f32 ones."""
  cfg = tiny.preset_config("tiny", n_experts=2, n_layers=3, compress_ratios=(0, 0, 4))
  tensors = tiny.build_tensors(cfg, seed=0, experts="q8")
  v = tiny_vocab.build_vocab(cfg.vocab_size)
  vocab = data.Vocab(v.tokens, v.merges)
  paths = {v: export.write_model(str(tmp_path / f"{v}.gguf"), tensors, cfg, vocab, experts=v)
           for v in ("f32", "q2")}
  types = {t.name: t.tensor_type for t in gguf.GGUFReader(paths["q2"]).tensors}
  assert types["blk.2.ffn_gate_exps.weight"] == Q.IQ2_XXS
  assert types["blk.2.ffn_up_exps.weight"] == Q.IQ2_XXS
  assert types["blk.2.ffn_down_exps.weight"] == Q.Q2_K
  assert types["blk.2.ffn_gate_shexp.weight"] == Q.Q8_0
  from ds4jax.build import load_model
  ids = np.arange(1, 33)
  f32_TV, q2_TV = (load_model(paths[v], ctx_size=64).logits(ids) for v in ("f32", "q2"))
  assert np.corrcoef(f32_TV.ravel(), q2_TV.ravel())[0, 1] > 0.7  # 0.84 on these random weights


@pytest.mark.parametrize("qtype,bound", [(Q.Q2_K, 0.30), (Q.IQ2_XXS, 0.36)])
def test_quantisers_round_trip(qtype, bound):
  x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
  b = qz.quantize(x, qtype)
  assert b.dtype == np.uint8 and b.shape == tuple(
      gguf.quants.quant_shape_to_byte_shape(x.shape, qtype))
  y = gguf.quants.dequantize(b, qtype)
  rel = float(np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean()))
  assert rel < bound, rel
  # What a block can represent, it represents almost exactly.
  y2 = gguf.quants.dequantize(qz.quantize(y, qtype), qtype)
  assert float(np.sqrt(((y2 - y) ** 2).mean() / (y ** 2).mean())) < 0.1 * rel
  with pytest.raises(ValueError, match="multiple of 256"):
    qz.quantize(x[:, :100], qtype)


def test_train_config_variants():
  full, small = _config(None), _config("tiny")
  for c in (full, small):
    cfg = model_config(c)
    assert cfg.compress_ratios == (0, 0, 4, 16) and cfg.n_hash_layers == 1
    assert LayerRange.parse("all", cfg.n_layers).has_output
  assert model_config(full).d_model % 256 == 0 and model_config(full).expert_ff % 256 == 0
  with pytest.raises(ValueError, match="unknown variant"):
    _config("huge")
