"""The fused C++ decode step (engine/fused_decode.py) against the Python model and transformers."""

from __future__ import annotations

import os

import pytest
import torch

from quantchat.engine import fused_decode
from quantchat.engine.fused_decode import FusedDecoder
from quantchat.engine.generate import Engine
from quantchat.kernels import cpu, defs
from quantchat.loading.hf_loader import load_model
from quantchat.model.config import ModelConfig
from quantchat.model.transformer import Transformer
from quantchat.quant.linear import QuantizedLinear
from quantchat.quant.quantize import QuantSpec, quantize_model
from quantchat.sampling.sampling import SamplingParams
from tiny_models import make_tiny_llama

pytestmark = pytest.mark.skipif(not cpu.available(), reason="quantchat's CPU kernels unavailable")
TOL = 1e-4


def random_model(seed: int = 0, **kw) -> Transformer:
    """A quantchat Transformer with random weights (no transformers needed; any shapes)."""
    cfg = dict(vocab_size=300, dim=72, n_layer=2, n_head=4, n_kv_head=2, head_dim=18, intermediate_size=100,
               max_position_embeddings=512)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            else:
                p.uniform_(0.8, 1.2)
    return model.eval()


def fill_slots(model: Transformer, lengths: list[int], seed: int = 0) -> None:
    """Prefill slot i with ``lengths[i]`` random tokens."""
    g = torch.Generator().manual_seed(seed)
    for slot, n in enumerate(lengths):
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g)
        model(ids, torch.arange(n)[None], kv_len=n, slot=slot)


def python_step(model: Transformer, tokens: torch.Tensor, pos: torch.Tensor, slot: int | None = None) -> torch.Tensor:
    return model(tokens[:, None], pos[:, None], kv_len=int(pos.max()) + 1, slot=slot)[:, -1]


def check_steps(model: Transformer, lengths: list[int], steps: int = 3, kv_dtype: torch.dtype | None = None,
                atol: float = 1e-5, tol: float = TOL) -> None:
    """Batched fused steps == the model's own batched forward; the caches stay equal too."""
    B = len(lengths)
    model.setup_caches(B, 256, kv_dtype)
    fused = FusedDecoder(model)
    for m in model.modules():  # int4 linears were re-laid for the step's int8-activation kernel, int8 ones
        if isinstance(m, QuantizedLinear) and m.r8:  # run on int16 activations there: the Python path runs
            assert m.r8_path == cpu.R8_PREFILL  # the same kernels, to compare
            m.r8_path = cpu.R8_Q8
        elif isinstance(m, QuantizedLinear) and m.bits == 8 and m.own_kernel and not os.environ.get("QUANTCHAT_NO_Q8"):
            assert m.i8_path == cpu.PATH_PREFILL
            m.i8_path = cpu.PATH_GEMV_I16
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        fill_slots(model, lengths)
        caches = [(lay.attention.kv_cache.k_cache.clone(), lay.attention.kv_cache.v_cache.clone())
                  for lay in model.layers]
        pos = torch.tensor(lengths)
        for _ in range(steps):
            tok = torch.randint(0, model.config.vocab_size, (B,), generator=g)
            got = fused.step(tok, pos)
            fused_caches = [(lay.attention.kv_cache.k_cache.clone(), lay.attention.kv_cache.v_cache.clone())
                            for lay in model.layers]
            for lay, (k, v) in zip(model.layers, caches):  # rerun the step on the Python path from the old cache
                lay.attention.kv_cache.k_cache.copy_(k)
                lay.attention.kv_cache.v_cache.copy_(v)
            want = python_step(model, tok, pos)
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())
            rtol = 2e-3 if kv_dtype == torch.float16 else 1e-5  # float16: a float32 difference may flip an ulp
            for lay, (k, v) in zip(model.layers, fused_caches):
                assert k.dtype == (kv_dtype or torch.float32)
                # atol is per unit of the cache's magnitude: an activation rounded one int16 step (absmax /
                # 32767 of its row) apart moves the outputs in proportion to the rows' size
                for got_c, want_c in ((lay.attention.kv_cache.k_cache, k), (lay.attention.kv_cache.v_cache, v)):
                    scale = max(1.0, want_c.float().abs().max().item())
                    assert torch.allclose(got_c.float(), want_c.float(), atol=atol * scale, rtol=rtol)
            caches = fused_caches
            pos = pos + 1


@pytest.mark.parametrize("kw", [
    {}, {"n_kv_head": 4}, {"n_kv_head": 1}, {"tie_word_embeddings": True},
    {"attention_bias": True, "mlp_bias": True}, {"sliding_window": 6, "model_type": "mistral"},
    {"dim": 64, "head_dim": 16, "intermediate_size": 128},
    {"dim": 192, "n_head": 3, "n_kv_head": 1, "head_dim": 64, "intermediate_size": 128},
    {"dim": 256, "n_head": 2, "n_kv_head": 2, "head_dim": 128, "intermediate_size": 128},
], ids=["gqa", "mha", "mqa", "tied", "bias", "window", "hd16", "hd64", "hd128"])
def test_float_fused_matches_python_path(kw):
    check_steps(random_model(**kw), [5, 17, 9, 30])


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 6, "model_type": "mistral"},
                                {"dim": 192, "n_head": 3, "n_kv_head": 1, "head_dim": 64, "intermediate_size": 128}],
                         ids=["gqa-hd18", "window", "hd64"])
def test_float16_cache_fused_matches_python_path(kw):
    """A float16 KV cache: the step writes the same rounded keys / values as the Python path and
    attends over them (the generic and the 8-wide head-dim kernels)."""
    check_steps(random_model(**kw), [5, 17, 9, 30], kv_dtype=torch.float16)


def test_float16_cache_is_half_the_size_and_bfloat16_falls_back():
    model = random_model()
    model.setup_caches(2, 64)
    full = model.layers[0].attention.kv_cache.k_cache.nbytes
    eng = Engine(model, IdsOnlyTokenizer(), max_seq_len=64, max_batch=2, kv_dtype=torch.float16)
    assert model.layers[0].attention.kv_cache.k_cache.nbytes * 2 == full and eng.fused is not None
    assert Engine(model, IdsOnlyTokenizer(), max_seq_len=64, max_batch=2, kv_dtype=torch.bfloat16).fused is None
    assert "float16 KV cache" in fused_decode.unsupported_reason(model)


@pytest.mark.parametrize("method,group", [("int4-asym", 32), ("int4-sym", 64), ("int8", None)])
def test_quantized_fused_matches_python_path(method, group):
    model = random_model(dim=128, head_dim=32, intermediate_size=192)
    quantize_model(model, QuantSpec.for_method(method, group))
    # int8 linears round activations to int16 on both paths: inputs a float32 ulp apart (the step's own
    # RMSNorm) may round one element a step (absmax / 32767) apart
    check_steps(model, [3, 40, 11], steps=2, atol=1e-4 if method == "int8" else 1e-5)
    # int4 linears run the step's int8-activation kernel (rows interleaved), int8 ones keep their layout
    assert all(m.r8 == (m.bits == 4) for m in model.modules() if isinstance(m, QuantizedLinear))


def test_one_slot_and_long_context():
    model = random_model()
    model.setup_caches(3, 256)
    fused = FusedDecoder(model)
    with torch.inference_mode():
        fill_slots(model, [4, 200, 7])
        tok, pos = torch.tensor([11]), torch.tensor([200])
        saved = [lay.attention.kv_cache.k_cache.clone() for lay in model.layers]
        got = fused.step(tok, pos, first_slot=1)
        for lay, k in zip(model.layers, saved):
            lay.attention.kv_cache.k_cache.copy_(k)
        want = python_step(model, tok, pos, slot=1)
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("kw", [{"n_kv_head": 2}, {"n_kv_head": 4, "tie": True},
                                {"model_type": "mistral", "sliding_window": 8},
                                {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 64}}],
                         ids=["gqa", "mha-tied", "mistral-window", "yarn"])
def test_fused_matches_transformers(tmp_path, kw):
    ref = make_tiny_llama(tmp_path, **kw)
    model = load_model(tmp_path)  # float32 on CPU: wide layers transposed (TransposedLinear)
    model.setup_caches(1, 64)
    fused = FusedDecoder(model)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(3, model.config.vocab_size, (1, 12), generator=g)
    with torch.inference_mode():
        model(seq, torch.arange(12)[None], kv_len=12)
        for _ in range(10):
            nxt = torch.randint(3, model.config.vocab_size, (1,), generator=g)
            got = fused.step(nxt, torch.tensor([seq.shape[1]]))
            seq = torch.cat([seq, nxt[None]], dim=1)
            want = ref(seq).logits[:, -1]
            assert (want - got).abs().max().item() <= TOL


class IdsOnlyTokenizer:
    eos_ids: set[int] = set()

    def stream_decoder(self, skip_special_tokens: bool = True):
        class D:
            def push(self, t):
                return ""

            def flush(self):
                return ""
        return D()


def test_engine_uses_fused_and_generates_the_same(monkeypatch):
    model = random_model(dim=128, head_dim=32, intermediate_size=192)
    quantize_model(model, QuantSpec.for_method("int4-asym", 32))
    params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    prompt = [5, 9, 200, 17, 3]
    fast = Engine(model, IdsOnlyTokenizer(), max_seq_len=128)
    assert fast.fused is not None
    calls = []
    real = fast.fused.step
    monkeypatch.setattr(fast.fused, "step", lambda *a: calls.append(1) or real(*a))
    got = [c.token for c in fast.generate(prompt, params) if c.token is not None]
    assert len(calls) == 23
    slow = Engine(model, IdsOnlyTokenizer(), max_seq_len=128, fused=False)
    assert slow.fused is None
    want = [c.token for c in slow.generate(prompt, params) if c.token is not None]
    assert got == want


def test_batched_engine_generation_is_unchanged():
    model = random_model(dim=128, head_dim=32, intermediate_size=192, n_kv_head=1)
    quantize_model(model, QuantSpec.for_method("int8"))
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [250]]
    fast = Engine(model, IdsOnlyTokenizer(), max_seq_len=64, max_batch=3).generate_batch(prompts, params)
    slow = Engine(model, IdsOnlyTokenizer(), max_seq_len=64, max_batch=3, fused=False).generate_batch(prompts, params)
    assert fast == slow


def test_unsupported_models_fall_back_with_a_reason(monkeypatch):
    model = random_model().to(torch.bfloat16)
    model.setup_caches(1, 32)
    assert "float32" in fused_decode.unsupported_reason(model)
    assert FusedDecoder.build(model) is None
    with pytest.raises(ValueError, match="float32"):
        FusedDecoder(model)
    model = random_model()
    assert "KV cache" in fused_decode.unsupported_reason(model)
    model.setup_caches(1, 32)
    assert fused_decode.unsupported_reason(model) is None
    monkeypatch.setenv("QUANTCHAT_NO_FUSED", "1")
    assert "QUANTCHAT_NO_FUSED" in fused_decode.unsupported_reason(model)
    assert Engine(model, IdsOnlyTokenizer(), max_seq_len=32).fused is None


def test_plan_layout_mismatch_is_a_clear_error(monkeypatch):
    """The plan is filled by the field names of kernels/defs.py: a field the decoder does not fill is a
    PlanMismatch naming it (not a fallback, not a crash); lists of the wrong length are refused by DecodePlan."""
    model = random_model()
    model.setup_caches(1, 32)
    meta, floats, tensors = fused_decode._plan_inputs(model)
    with pytest.raises(RuntimeError, match="tensor count"):
        cpu.decode_plan_class()(meta, floats, tensors[:-1])
    with pytest.raises(RuntimeError, match="meta size"):
        cpu.decode_plan_class()(meta[:-1], floats, tensors)
    with pytest.raises(RuntimeError, match="floats"):
        cpu.decode_plan_class()(meta, floats[:-1], tensors)
    monkeypatch.setattr(defs, "LAYER", defs.LAYER + (("extra_norm", defs.TENSOR),))
    with pytest.raises(defs.PlanMismatch, match="missing \\['extra_norm'\\]"):
        FusedDecoder.build(model)


def test_rebuilt_cache_is_noticed_and_bad_positions_refused():
    model = random_model()
    eng = Engine(model, IdsOnlyTokenizer(), max_seq_len=32, max_batch=2)
    assert eng.fused.matches(model)
    with pytest.raises(RuntimeError, match="position"):
        eng.fused.step(torch.tensor([1]), torch.tensor([32]))
    with pytest.raises(RuntimeError, match="slots"):
        eng.fused.step(torch.tensor([1, 2]), torch.tensor([3, 4]), 1)
    old_plan = eng.fused
    model.setup_caches(2, 16)  # a new cache: the plan no longer matches; the next decode builds a new one
    assert not old_plan.matches(model)
    eng.decode(torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert eng.fused is not old_plan and eng.fused.matches(model)


def test_plan_follows_quantization_after_engine_creation():
    """Quantizing the model after the engine was made swaps its linears: decode rebuilds the plan."""
    model = random_model(dim=128, head_dim=32, intermediate_size=192)
    eng = Engine(model, IdsOnlyTokenizer(), max_seq_len=64)
    float_plan = eng.fused
    quantize_model(model, QuantSpec.for_method("int8"))
    assert not float_plan.matches(model)
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]), torch.arange(3)[None], kv_len=3)
        got = eng.decode(torch.tensor([9]), torch.tensor([3]))
        assert eng.fused is not float_plan
        eng.fused = None  # the Python path on the same (quantized) model and cache
        want = eng.decode(torch.tensor([9]), torch.tensor([3]))
    assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("method,group", [("int4-asym", 32), ("int8", None)])
def test_no_q8_keeps_float_activations(monkeypatch, method, group):
    """QUANTCHAT_NO_Q8=1: int4 linears keep their layout and the step (int8 linears too) its float
    activations (exact)."""
    monkeypatch.setenv("QUANTCHAT_NO_Q8", "1")
    model = random_model(dim=128, head_dim=32, intermediate_size=192)
    quantize_model(model, QuantSpec.for_method(method, group))
    check_steps(model, [3, 9], steps=2)  # the exact Python path: float32 rounding apart
    assert not any(m.r8 for m in model.modules() if isinstance(m, QuantizedLinear))


def test_kv_cache_dtype_choice():
    import torch

    from quantchat.errors import QuantchatError
    from quantchat.engine.build import pick_kv_dtype

    assert pick_kv_dtype("auto", torch.float32, torch.device("cpu")) == torch.float16
    assert pick_kv_dtype("auto", torch.float32, torch.device("cuda")) == torch.float32  # SDPA would convert per step
    assert pick_kv_dtype("auto", torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    assert pick_kv_dtype("float32", torch.float32, torch.device("cpu")) == torch.float32
    with pytest.raises(QuantchatError, match="KV cache dtype"):
        pick_kv_dtype("int3", torch.float32)
