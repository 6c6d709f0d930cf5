"""Tiny random LLaMA-family checkpoints that the tests build themselves (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llama(
    out_dir: Path, *, n_kv_head: int = 2, tie: bool = False, vocab: int = 256, seed: int = 0,
    model_type: str = "llama", rope_scaling: dict | None = None, max_shard_size: str | None = None,
    sliding_window: int | None = None, layers: int = 2,
):
    """Save a random transformers LLaMA/Mistral with safetensors; returns the transformers model (float32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=n_kv_head, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
    )
    if model_type == "mistral":
        cfg = MistralConfig(sliding_window=sliding_window, **kw)
        model = MistralForCausalLM(cfg)
    else:
        if rope_scaling:
            kw["rope_scaling"] = rope_scaling
        cfg = LlamaConfig(**kw)
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than default init so differences are visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            else:
                p.uniform_(0.8, 1.2)
    model = model.float().eval()
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kwargs)
    return model
