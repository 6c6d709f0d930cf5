"""Our LLaMA implementation against transformers on the same random weights (float32)."""

from __future__ import annotations

import pytest
import torch

from quantchat.engine.generate import Engine
from quantchat.loading.hf_loader import load_model
from quantchat.sampling.sampling import SamplingParams
from tiny_models import make_tiny_llama

TOL = 1e-4


class IdsOnlyTokenizer:
    eos_ids = {2}


def compare_prefill_and_decode(tmp_path, steps: int = 20, prompt_len: int = 11, **kw) -> None:
    ref = make_tiny_llama(tmp_path, **kw)
    model = load_model(tmp_path)
    model.setup_caches(1, 64)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=g)
    with torch.no_grad():
        want = ref(seq).logits
        got = model(seq, torch.arange(prompt_len)[None], kv_len=prompt_len)
        assert (want - got).abs().max().item() <= TOL
        assert (want - model(seq)).abs().max().item() <= TOL  # no-cache path
        for _ in range(steps):
            nxt = torch.randint(3, model.config.vocab_size, (1, 1), generator=g)
            seq = torch.cat([seq, nxt], dim=1)
            pos = seq.shape[1] - 1
            got = model(nxt, torch.tensor([[pos]]), kv_len=pos + 1)[:, -1]
            want = ref(seq).logits[:, -1]
            assert (want - got).abs().max().item() <= TOL, f"decode step at position {pos}"


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_logits_match_transformers(tmp_path, n_kv_head, tie):
    compare_prefill_and_decode(tmp_path, n_kv_head=n_kv_head, tie=tie)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
], ids=["linear", "llama3", "yarn"])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    compare_prefill_and_decode(tmp_path, steps=5, rope_scaling=scaling)


def test_mistral_sliding_window_matches_transformers(tmp_path):
    # window 8 < sequence length: old tokens must drop out of attention in prefill and in decode
    compare_prefill_and_decode(tmp_path, steps=8, prompt_len=12, model_type="mistral", sliding_window=8)


def test_sharded_checkpoint_loads(tmp_path):
    ref = make_tiny_llama(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = load_model(tmp_path)
    seq = torch.randint(3, 256, (1, 9))
    with torch.no_grad():
        assert (ref(seq).logits - model(seq)).abs().max().item() <= TOL


def test_batched_generation_equals_single(tmp_path):
    make_tiny_llama(tmp_path, n_kv_head=2)
    model = load_model(tmp_path)
    engine = Engine(model, IdsOnlyTokenizer(), max_seq_len=64, max_batch=3)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 13, 8)]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    batched = engine.generate_batch(prompts, params)
    single = [engine.generate_batch([p], params)[0] for p in prompts]
    assert batched == single
    assert all(len(o) == 12 for o in batched)


def test_batched_decode_logits_match_transformers(tmp_path):
    """Rows at different positions in one decode step see only their own history."""
    ref = make_tiny_llama(tmp_path, n_kv_head=2)
    model = load_model(tmp_path)
    engine = Engine(model, IdsOnlyTokenizer(), max_seq_len=64, max_batch=2)
    a, b = [5, 6, 7, 8, 9, 10, 11], [20, 21, 22]
    engine.prefill(a, slot=0)
    engine.prefill(b, slot=1)
    logits = engine.decode(torch.tensor([30, 31]), torch.tensor([len(a), len(b)]))
    with torch.no_grad():
        want_a = ref(torch.tensor([a + [30]])).logits[0, -1]
        want_b = ref(torch.tensor([b + [31]])).logits[0, -1]
    assert (logits[0] - want_a).abs().max().item() <= TOL
    assert (logits[1] - want_b).abs().max().item() <= TOL


def test_bfloat16_close_to_float32(tmp_path):
    make_tiny_llama(tmp_path)
    m32, m16 = load_model(tmp_path), load_model(tmp_path, dtype=torch.bfloat16)
    seq = torch.randint(3, 256, (1, 16))
    with torch.no_grad():
        a, b = m32(seq), m16(seq).float()
    assert b.dtype == torch.float32 and m16.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
