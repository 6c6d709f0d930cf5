"""Tiny random LLaMA-family checkpoints that the tests build themselves (no hub)."""

from __future__ import annotations

from pathlib import Path

import json

import torch

from quantchat.tokenizer.gguf_tokenizer import bytes_to_unicode


def make_tiny_llama(
    out_dir: Path, *, n_kv_head: int = 2, tie: bool = False, vocab: int = 256, seed: int = 0,
    model_type: str = "llama", rope_scaling: dict | None = None, max_shard_size: str | None = None,
    sliding_window: int | None = None, layers: int = 2, max_positions: int = 256,
):
    """Save a random transformers LLaMA/Mistral with safetensors; returns the transformers model (float32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=n_kv_head, max_position_embeddings=max_positions,
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


BOS, EOS = "<s>", "</s>"
VOCAB = 258  # 256 byte tokens (id == byte value) + <s> (256) + </s> (257)
# Greedy output of the random tiny model is limited to these bytes (readable, no newlines): see make_tiny_chat_model.
PRINTABLE = b"abcdefghijklmnopqrstuvwxyz "
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode alphabet, in byte order (the ByteLevel pre-tokenizer's symbols)."""
    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def write_byte_tokenizer(out_dir: Path, chat_template: str | None = CHAT_TEMPLATE) -> None:
    """A byte-level BPE (no merges): byte b is token b, then <s> = 256 and </s> = 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_chars())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    assert (tok.token_to_id(BOS), tok.token_to_id(EOS), tok.get_vocab_size()) == (256, 257, VOCAB)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))


def make_tiny_chat_model(out_dir: Path, max_positions: int = 256) -> None:
    """A random tiny LLaMA with a byte tokenizer whose greedy output is lowercase letters and spaces.

    The lm_head rows of all other tokens are zeroed: their logits are exactly 0 while the maximum over
    the 27 allowed random logits is positive, so greedy decoding never leaves PRINTABLE (nor hits EOS).
    """
    model = make_tiny_llama(out_dir, vocab=VOCAB, max_positions=max_positions)
    keep = torch.zeros(VOCAB, dtype=torch.bool)
    keep[list(PRINTABLE)] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0.0
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id = 256, 257
    model.save_pretrained(out_dir, safe_serialization=True)
    write_byte_tokenizer(out_dir)


OUTLIER_CHANNELS = [3, 17, 40, 51]


def with_outliers(model, channels: list[int] = OUTLIER_CHANNELS, factor: float = 20.0):
    """A model's input norms x``factor`` on a few channels (in place): each block linear's input has a few
    huge channels, as in real LLMs, so AWQ's scale search picks real scales."""
    with torch.no_grad():
        for layer in model.layers:
            for name in ("attention_norm", "ffn_norm"):
                if hasattr(layer, name):
                    getattr(layer, name).weight[channels] *= factor
    return model


def random_tokens(n: int, t: int, seed: int, vocab: int = 256) -> torch.Tensor:
    """[n, t] token ids below ``vocab`` from a seeded generator."""
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
