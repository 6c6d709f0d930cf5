"""Every model family against transformers on the same random weights (float32): GPT-2, MPT (ALiBi),
Falcon (7B "RW" layout, the new decoder architecture, sequential), Qwen2, Gemma 3 (sliding layers, q/k
norms, sandwich norms; soft-capping), built by transformers itself and saved as safetensors."""

from __future__ import annotations

import json

import pytest
import torch

from quantchat.engine.generate import Engine
from quantchat.engine.fused_decode import unsupported_reason
from quantchat.errors import ModelLoadError
from quantchat.loading.hf_loader import load_model
from quantchat.model.families import FAMILIES, config_from_hf
from quantchat.quant.quantize import QuantSpec, quantize_model
from quantchat.sampling.sampling import SamplingParams
from test_fused_decode import check_steps

TOL = 1e-4
VOCAB = 96


def _gpt2(**kw):
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, **kw))


def _mpt(**kw):
    from transformers import MptConfig, MptForCausalLM
    attn = {"alibi": True, "alibi_bias_max": 8, **kw.pop("attn", {})}
    cfg = dict(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, max_seq_len=128, attn_config=attn)
    cfg.update(kw)
    return MptForCausalLM(MptConfig(**cfg))


def _falcon(**kw):
    from transformers import FalconConfig, FalconForCausalLM
    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1,
               eos_token_id=2)
    cfg.update(kw)
    return FalconForCausalLM(FalconConfig(**cfg))


def _qwen2(**kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        bos_token_id=1, eos_token_id=2, **kw))


def _gemma3(**kw):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
               query_pre_attn_scalar=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(kw)
    return Gemma3ForCausalLM(Gemma3TextConfig(**cfg))


CASES = {
    "gpt2": lambda: _gpt2(),
    "gpt2-untied": lambda: _gpt2(tie_word_embeddings=False),
    "mpt": lambda: _mpt(),
    "mpt-6heads-clip": lambda: _mpt(d_model=48, n_heads=6, attn={"clip_qkv": 0.5}),
    "falcon-7b-layout": lambda: _falcon(multi_query=True, parallel_attn=True, new_decoder_architecture=False),
    "falcon-new-arch": lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2, bias=True),
    "falcon-sequential": lambda: _falcon(multi_query=False, parallel_attn=False, new_decoder_architecture=False),
    "qwen2": lambda: _qwen2(),
    "gemma3": lambda: _gemma3(),
    "gemma3-softcap": lambda: _gemma3(final_logit_softcapping=3.0, attn_logit_softcapping=5.0),
}


def build(tmp_path, case: str):
    """The transformers model (float32, eval, larger-than-default random weights) saved in tmp_path."""
    torch.manual_seed(0)
    ref = CASES[case]().float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "norm" in name or "ln" in name:  # Gemma norms store weight - 1: around 0
                p.uniform_(-0.2, 0.2) if case.startswith("gemma") else p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.05)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    return ref


@pytest.fixture(params=sorted(CASES))
def case(request):
    return request.param


def _ref_logits(ref, seq: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref(seq).logits


def test_prefill_and_cached_decode_match_transformers(tmp_path, case):
    ref = build(tmp_path, case)
    model = load_model(tmp_path)
    assert model.config.family == case.split("-")[0]
    model.setup_caches(1, 64)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(3, VOCAB, (1, 11), generator=g)
    with torch.no_grad():
        want = _ref_logits(ref, seq)
        assert (want - model(seq)).abs().max().item() <= TOL  # plain causal forward
        got = model(seq, torch.arange(11)[None], kv_len=11)
        assert (want - got).abs().max().item() <= TOL
        for _ in range(20):
            nxt = torch.randint(3, VOCAB, (1, 1), generator=g)
            seq = torch.cat([seq, nxt], dim=1)
            pos = seq.shape[1] - 1
            got = model(nxt, torch.tensor([[pos]]), kv_len=pos + 1)[:, -1]
            assert (_ref_logits(ref, seq)[:, -1] - got).abs().max().item() <= TOL, f"decode at {pos}"


def test_batched_decode_of_different_lengths_matches_transformers(tmp_path, case):
    """Two sequences of different lengths in their own cache slots, decoded together in one batch."""
    ref = build(tmp_path, case)
    model = load_model(tmp_path)
    model.setup_caches(2, 64)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, VOCAB, (1, n), generator=g) for n in (5, 12)]
    with torch.no_grad():
        for i, s in enumerate(seqs):
            model(s, torch.arange(s.shape[1])[None], kv_len=s.shape[1], slot=i)
        for _ in range(8):
            nxt = torch.randint(3, VOCAB, (2, 1), generator=g)
            seqs = [torch.cat([s, nxt[i:i + 1]], dim=1) for i, s in enumerate(seqs)]
            pos = torch.tensor([[s.shape[1] - 1] for s in seqs])
            got = model(nxt, pos, kv_len=int(pos.max()) + 1)[:, -1]
            for i, s in enumerate(seqs):
                assert (_ref_logits(ref, s)[0, -1] - got[i]).abs().max().item() <= TOL


class _IdsOnly:
    eos_ids = {2}


def test_engine_batch_equals_single_and_reports_the_decode_path(tmp_path, case):
    build(tmp_path, case)
    model = load_model(tmp_path)
    engine = Engine(model, _IdsOnly(), max_seq_len=64, max_batch=3)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (4, 9, 6)]
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    assert engine.generate_batch(prompts, params) == [engine.generate_batch([p], params)[0] for p in prompts]
    assert unsupported_reason(model) is None and engine.fused is not None  # every family decodes fused


def test_fused_step_matches_the_models_forward(tmp_path, case):
    """The fused C++ step (every family's layout: LayerNorm, ALiBi, learned positions, parallel blocks,
    q/k and sandwich norms, local rope, sliding layers, GeGLU, soft-capping) against the model's own batched
    forward over rows of different lengths (past Gemma's window of 6), and the KV caches it writes."""
    build(tmp_path, case)
    model = load_model(tmp_path)
    check_steps(model, [5, 12, 3], steps=4)


@pytest.mark.parametrize("method", ["int8", "int4-asym"])
@pytest.mark.parametrize("case_name", ["gpt2", "mpt-6heads-clip", "falcon-7b-layout", "gemma3"])
def test_quantized_fused_step_matches_the_models_forward(tmp_path, case_name, method):
    build(tmp_path, case_name)
    model = load_model(tmp_path, cpu_layout=False)
    quantize_model(model, QuantSpec.for_method(method, 32))
    # int8 linears round their activations to int16 on both paths: inputs a float32 ulp apart may round one
    # step apart, and Gemma's q/k and sandwich norms carry that further (2e-4 of the logits' size seen)
    check_steps(model, [4, 9], steps=2, atol=1e-4 if method == "int8" else 1e-5,
                tol=5e-4 if method == "int8" else 1e-4)


def test_quantized_families_stay_close(tmp_path, case):
    """int8 / int4 (g32) weights of every block linear: logits within twice the per-linear bounds of the
    quantization tests (0.02 / 0.2, tests/test_quant_kernels.py: two or three layers add up), int4 further
    than int8 (the weights were quantized), most greedy tokens kept."""
    ref = build(tmp_path, case)
    seq = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = _ref_logits(ref, seq)
    rels = {}
    for method, bound, agree in (("int8", 0.04, 0.8), ("int4-asym", 0.4, 0.5)):
        model = load_model(tmp_path, cpu_layout=False)
        quantize_model(model, QuantSpec.for_method(method, 32))
        with torch.no_grad():
            got = model(seq)
        rels[method] = ((want - got).norm() / want.norm()).item()
        assert rels[method] < bound, (method, rels[method])
        assert (want.argmax(-1) == got.argmax(-1)).float().mean().item() >= agree, method
    assert rels["int4-asym"] > 2 * rels["int8"] > 0, rels


def test_every_family_is_in_the_table():
    assert set(FAMILIES) == {"llama", "qwen2", "gemma3", "gpt2", "mpt", "falcon"}


def test_unknown_architecture_names_the_families():
    with pytest.raises(ModelLoadError) as e:
        config_from_hf({"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    msg = str(e.value)
    assert "\n" not in msg and "BertForMaskedLM" in msg and all(f in msg for f in FAMILIES)


@pytest.mark.parametrize("cfg, needle", [
    ({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
      "intermediate_size": 8, "vocab_size": 10, "rope_scaling": {"rope_type": "longrope"}}, "longrope"),
    ({"architectures": ["FalconForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
      "vocab_size": 10, "alibi": True}, "ALiBi"),
    ({"architectures": ["MptForCausalLM"], "d_model": 64, "n_heads": 4, "n_layers": 1, "vocab_size": 10,
      "max_seq_len": 32, "attn_config": {"alibi": True, "qk_ln": True}}, "qk_ln"),
    ({"architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_head": 4, "n_layer": 1, "vocab_size": 10,
      "n_positions": 32, "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_head": 4, "n_layer": 1, "vocab_size": 10,
      "n_positions": 32, "activation_function": "relu6"}, "relu6"),
], ids=["rope-type", "falcon-alibi", "mpt-qk-ln", "gpt2-layer-scaling", "activation"])
def test_unsupported_features_are_clear_errors(cfg, needle):
    with pytest.raises(ModelLoadError, match=needle):
        config_from_hf(cfg)


def test_a_stray_tensor_is_a_clear_error(tmp_path):
    build(tmp_path, "gpt2")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors["transformer.h.0.mystery.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="mystery"):
        load_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2"


@pytest.mark.parametrize("case_name", ["gpt2", "falcon-new-arch", "gemma3", "mpt"])
def test_quantized_checkpoint_round_trips(tmp_path, case_name):
    """Save an int4 checkpoint of the family and load it back packed: the same logits as in memory."""
    from quantchat.quant.checkpoint import load_quantized, save_quantized

    src = tmp_path / "float"
    build(src, case_name)
    model = load_model(src, cpu_layout=False)
    spec = QuantSpec.for_method("int4-asym", 32)
    codes = quantize_model(model, spec, keep_codes=True)
    out = save_quantized(tmp_path / "q", model, spec, codes, src)
    again = load_quantized(out)
    assert again.config.family == case_name.split("-")[0]
    seq = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(model(seq), again(seq), atol=1e-5)


@pytest.mark.parametrize("case_name", ["gpt2", "falcon-7b-layout", "gemma3"])
def test_gptq_and_awq_run_on_each_family(tmp_path, case_name):
    """The calibrated methods on non-LLaMA blocks (AWQ per family: tests/test_awq_families.py)."""
    ref = build(tmp_path, case_name)
    calib = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(6))
    seq = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = _ref_logits(ref, seq)
    for method in ("gptq", "awq"):
        model = load_model(tmp_path, cpu_layout=False)
        quantize_model(model, QuantSpec.for_method(method, 32), calib=calib)
        with torch.no_grad():
            got = model(seq)
        assert ((want - got).norm() / want.norm()).item() < 0.4, method
