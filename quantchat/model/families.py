"""The model families quantchat runs: one entry per family, nothing else to touch to add one.

Each ``Family`` names its Hugging Face ``architectures`` / ``model_type`` values, translates a config.json
into a ``ModelConfig`` (the decoder's layout fields), and maps each of its checkpoint tensors to the
decoder's parameter (and, for fused weights, the part), with a transform where the stored layout differs
(GPT-2's Conv1D weights are transposed, Falcon's fused q/k/v is reordered to [q; k; v], Gemma's norms
store ``weight - 1``). Torch-free to import (``quantchat models`` reads it); the transforms get tensors.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantchat.errors import ModelLoadError
from quantchat.model.config import ModelConfig

if TYPE_CHECKING:
    from torch import Tensor

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# HF activation names -> ours
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}

Transform = Callable[["Tensor", ModelConfig, dict], "Tensor"]


@dataclass(frozen=True)
class Rule:
    """Where one checkpoint tensor goes: our parameter, the part of a fused weight (None: all of it), and
    how to turn the stored tensor into ours."""

    ours: str
    part: int | None = None
    transform: Transform | None = None


@dataclass(frozen=True)
class Family:
    name: str
    hf_architectures: tuple[str, ...]
    hf_model_types: tuple[str, ...]
    config: Callable[[dict[str, Any], str], ModelConfig]
    layer_pattern: re.Pattern  # group 1: the layer index, group 2: the name inside the layer
    layer_tensors: dict[str, Rule]
    top_tensors: dict[str, Rule]
    ignored: re.Pattern = re.compile(r"rotary_emb\.inv_freq$")
    gguf_architecture: str | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def map_name(self, name: str) -> tuple[str, Rule] | None:
        """(our parameter name, rule) for a checkpoint tensor name; None if it is not one of ours."""
        if name in self.top_tensors:
            rule = self.top_tensors[name]
            return rule.ours, rule
        m = self.layer_pattern.match(name)
        if m and m.group(2) in self.layer_tensors:
            rule = self.layer_tensors[m.group(2)]
            return f"layers.{m.group(1)}.{rule.ours}", rule
        return None


# ---------------------------------------------------------------- config helpers


def _need(cfg: dict[str, Any], source: str, *keys: str) -> list[int]:
    try:
        return [int(cfg[k]) for k in keys]
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{source}: missing or invalid field {e}") from None


def _eos_ids(cfg: dict[str, Any]) -> list[int]:
    eos = cfg.get("eos_token_id")
    return [int(x) for x in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]


def _activation(name: str | None, source: str, default: str) -> str:
    name = name or default
    if name not in _ACTIVATIONS:
        raise ModelLoadError(f"{source}: unsupported activation '{name}'; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _rope(cfg: dict[str, Any], source: str, layer_type: str | None = None) -> tuple[float, dict | None]:
    """(rope theta, rope scaling or None) of a config, transformers 4 or 5 layout; ``layer_type`` picks one
    entry of a per-layer-type ``rope_parameters`` (Gemma 3)."""
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            scaling = params
    if scaling:
        rtype = scaling.get("rope_type") or scaling.get("type") or "default"
        if rtype not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"{source}: unsupported rope scaling '{rtype}'; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        scaling = None if rtype == "default" else dict(scaling, rope_type=rtype)
    return float(theta if theta is not None else 10000.0), scaling


def _heads(source: str, n_head: int, n_kv: int) -> None:
    if n_head % n_kv:
        raise ModelLoadError(f"{source}: num_attention_heads {n_head} not a multiple of num_key_value_heads {n_kv}")


# ---------------------------------------------------------------- config translations


def _llama_config(cfg: dict[str, Any], source: str) -> ModelConfig:
    """LLaMA, Mistral, Qwen2: RMSNorm, RoPE, SwiGLU (Qwen2: biases on q/k/v only)."""
    dim, n_head, n_layer, ffn, vocab = _need(cfg, source, "hidden_size", "num_attention_heads",
                                             "num_hidden_layers", "intermediate_size", "vocab_size")
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    _heads(source, n_head, n_kv)
    theta, scaling = _rope(cfg, source)
    model_type = cfg.get("model_type") or "llama"
    archs = cfg.get("architectures") or []
    window = None
    if model_type == "mistral" or "MistralForCausalLM" in archs:
        window = cfg.get("sliding_window")
    elif model_type == "qwen2" and cfg.get("use_sliding_window"):
        raise ModelLoadError(f"{source}: Qwen2 with use_sliding_window (sliding layers from max_window_layers) "
                             "is not supported")
    qwen2 = model_type == "qwen2"
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv,
        head_dim=int(cfg.get("head_dim") or dim // n_head), intermediate_size=ffn,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=int(window) if window else None,
        attention_bias=bool(cfg.get("attention_bias", False)), qkv_bias=True if qwen2 else None,
        mlp_bias=bool(cfg.get("mlp_bias", False)), model_type=model_type,
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_eos_ids(cfg),
        family="qwen2" if qwen2 else "llama",
        activation=_activation(cfg.get("hidden_act"), source, "silu"),
    )


def _gemma3_config(cfg: dict[str, Any], source: str) -> ModelConfig:
    """Gemma 3 (text): Gemma RMSNorm (1 + w), q/k norms, sandwich norms, GeGLU, scaled embeddings, sliding
    layers with their own rope base."""
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
    dim, n_head, n_layer, ffn, vocab = _need(cfg, source, "hidden_size", "num_attention_heads",
                                             "num_hidden_layers", "intermediate_size", "vocab_size")
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    _heads(source, n_head, n_kv)
    types = cfg.get("layer_types")
    if not types:
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layer)]
    if len(types) != n_layer or set(types) - {"full_attention", "sliding_attention"}:
        raise ModelLoadError(f"{source}: layer_types must name full_attention or sliding_attention per layer")
    theta, scaling = _rope(cfg, source, "full_attention")
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict):  # transformers 5
        local_theta, local_scaling = _rope(cfg, source, "sliding_attention")
        if local_scaling:
            raise ModelLoadError(f"{source}: rope scaling on sliding-window layers is not supported")
    else:
        local_theta = float(cfg.get("rope_local_base_freq", 10000.0))
    head_dim = int(cfg.get("head_dim") or dim // n_head)
    scalar = cfg.get("query_pre_attn_scalar") or head_dim
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, head_dim=head_dim,
        intermediate_size=ffn, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        rope_scaling=scaling, max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
        attention_bias=bool(cfg.get("attention_bias", False)), model_type=cfg.get("model_type") or "gemma3_text",
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_eos_ids(cfg), family="gemma3",
        activation=_activation(cfg.get("hidden_activation") or cfg.get("hidden_act"), source, "gelu_pytorch_tanh"),
        qk_norm=True, sandwich_norm=True, embedding_scale=math.sqrt(dim), attn_scale=float(scalar) ** -0.5,
        final_softcap=cfg.get("final_logit_softcapping"),  # attn_logit_softcapping: unused by Gemma 3 (as in
        # transformers' Gemma3 attention, which never applies it)
        sliding_layers=[t == "sliding_attention" for t in types], rope_local_theta=local_theta,
    )


def _gpt2_config(cfg: dict[str, Any], source: str) -> ModelConfig:
    """GPT-2: LayerNorm with bias, learned absolute positions, MHA with biases, GELU (tanh) MLP."""
    dim, n_head, n_layer, vocab = _need(cfg, source, "n_embd", "n_head", "n_layer", "vocab_size")
    ctx = int(cfg.get("n_positions", 1024))  # GPT2Config's default
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise ModelLoadError(f"{source}: GPT-2 with scale_attn_by_inverse_layer_idx is not supported")
    if cfg.get("add_cross_attention"):
        raise ModelLoadError(f"{source}: GPT-2 with cross-attention is not supported")
    head_dim = dim // n_head
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_head, head_dim=head_dim,
        intermediate_size=int(cfg.get("n_inner") or 4 * dim), norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        max_position_embeddings=ctx, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        attention_bias=True, mlp_bias=True, model_type="gpt2", bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg), family="gpt2", norm="layer", norm_bias=True, position="learned",
        mlp_gated=False, activation=_activation(cfg.get("activation_function"), source, "gelu_new"),
        attn_scale=None if cfg.get("scale_attn_weights", True) else 1.0,
    )


def _mpt_config(cfg: dict[str, Any], source: str) -> ModelConfig:
    """MPT: LayerNorm without bias, ALiBi (or learned positions), fused q/k/v, clip_qkv, GELU MLP."""
    dim, n_head, n_layer, vocab, ctx = _need(cfg, source, "d_model", "n_heads", "n_layers", "vocab_size",
                                             "max_seq_len")
    attn = cfg.get("attn_config") or {}
    if attn.get("qk_ln"):
        raise ModelLoadError(f"{source}: MPT with qk_ln is not supported")
    if attn.get("prefix_lm") or attn.get("attn_uses_sequence_id"):
        raise ModelLoadError(f"{source}: MPT with prefix_lm or attn_uses_sequence_id is not supported")
    if not attn.get("alibi", False):
        raise ModelLoadError(f"{source}: MPT without ALiBi (learned positions) is not supported")
    bias = not cfg.get("no_bias", True)
    scale = attn.get("softmax_scale")
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_head, head_dim=dim // n_head,
        intermediate_size=int(cfg.get("expansion_ratio", 4) * dim), norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        max_position_embeddings=ctx, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        attention_bias=bias, mlp_bias=bias, model_type="mpt", bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg), family="mpt", norm="layer", norm_bias=bias, position="alibi",
        alibi_bias_max=float(attn.get("alibi_bias_max", 8)), mlp_gated=False, activation="gelu",
        clip_qkv=float(attn["clip_qkv"]) if attn.get("clip_qkv") else None,
        attn_scale=float(scale) if scale else None,
    )


def _falcon_layout(cfg: dict[str, Any]) -> tuple[str, int]:
    """("grouped" | "multi_query" | "interleaved", number of key/value heads) of Falcon's fused q/k/v."""
    n_head = int(cfg["num_attention_heads"])
    if cfg.get("new_decoder_architecture"):
        return "grouped", int(cfg.get("num_kv_heads") or n_head)
    if cfg.get("multi_query", True):
        return "multi_query", 1
    return "interleaved", int(cfg.get("num_kv_heads") or n_head)


def _falcon_config(cfg: dict[str, Any], source: str) -> ModelConfig:
    """Falcon: LayerNorm with bias, RoPE, multi-query or grouped attention, parallel attention + MLP (one
    shared norm in the 7B "RW" layout, two in the new decoder architecture), GELU MLP."""
    dim, n_head, n_layer, vocab = _need(cfg, source, "hidden_size", "num_attention_heads", "num_hidden_layers",
                                        "vocab_size")
    if cfg.get("alibi"):
        raise ModelLoadError(f"{source}: Falcon with ALiBi (falcon-rw) is not supported; rotary Falcon models are")
    layout, n_kv = _falcon_layout(cfg)
    _heads(source, n_head, n_kv)
    new = bool(cfg.get("new_decoder_architecture"))
    n_ln = cfg.get("num_ln_in_parallel_attn") or (2 if new else 1)
    parallel = new or bool(cfg.get("parallel_attn", True))
    theta, scaling = _rope(cfg, source)
    bias = bool(cfg.get("bias", False))
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, head_dim=dim // n_head,
        intermediate_size=int(cfg.get("ffn_hidden_size") or 4 * dim), norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        rope_theta=theta, rope_scaling=scaling, max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)), attention_bias=bias, mlp_bias=bias,
        model_type="falcon", bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_eos_ids(cfg), family="falcon",
        norm="layer", norm_bias=True, mlp_gated=False, activation=_activation(cfg.get("activation"), source, "gelu"),
        parallel_block=parallel, shared_block_norm=parallel and (not new or n_ln == 1),
    )


# ---------------------------------------------------------------- tensor transforms


def _t(w: Tensor, cfg: ModelConfig, hf: dict) -> Tensor:
    """GPT-2's Conv1D stores [in, out]: ours is [out, in] (a bias passes unchanged)."""
    return w.t() if w.dim() == 2 else w


def _plus_one(w: Tensor, cfg: ModelConfig, hf: dict) -> Tensor:
    """Gemma's RMSNorm scales by (1 + weight): ours by weight."""
    return w.float().add(1.0).to(w.dtype)


def _falcon_qkv(w: Tensor, cfg: ModelConfig, hf: dict) -> Tensor:
    """Falcon's fused q/k/v rows (grouped per key/value head, or interleaved per head) as [q; k; v]."""
    layout, n_kv = _falcon_layout(hf)
    if layout == "multi_query":
        return w
    hd, n_head = cfg.head_dim, cfg.n_head
    rest = w.shape[1:]
    if layout == "grouped":
        g = w.reshape(n_kv, n_head // n_kv + 2, hd, *rest)
        q, k, v = g[:, :-2], g[:, -2], g[:, -1]
    else:
        g = w.reshape(n_head, 3, hd, *rest)
        q, k, v = g[:, 0], g[:, 1], g[:, 2]
    import torch  # here, not at the top: the table itself stays torch-free

    return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)])


def _both(stem: str, ours: str, part: int | None = None, transform: Transform | None = None,
          bias_transform: Transform | None = None) -> dict[str, Rule]:
    """Rules for ``stem.weight`` and ``stem.bias``."""
    return {f"{stem}.weight": Rule(f"{ours}.weight", part, transform),
            f"{stem}.bias": Rule(f"{ours}.bias", part, bias_transform)}


_LLAMA_LAYER = {
    **_both("self_attn.q_proj", "attention.wqkv", 0), **_both("self_attn.k_proj", "attention.wqkv", 1),
    **_both("self_attn.v_proj", "attention.wqkv", 2), **_both("self_attn.o_proj", "attention.wo"),
    **_both("mlp.gate_proj", "feed_forward.w13", 0), **_both("mlp.up_proj", "feed_forward.w13", 1),
    **_both("mlp.down_proj", "feed_forward.w2"),
    "input_layernorm.weight": Rule("attention_norm.weight"),
    "post_attention_layernorm.weight": Rule("ffn_norm.weight"),
}
_LLAMA_TOP = {
    "model.embed_tokens.weight": Rule("tok_embeddings.weight"),
    "model.norm.weight": Rule("norm.weight"),
    "lm_head.weight": Rule("output.weight"),
}
_LLAMA_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

_GEMMA_LAYER = {
    **{k: v for k, v in _LLAMA_LAYER.items() if "layernorm" not in k},
    "input_layernorm.weight": Rule("attention_norm.weight", None, _plus_one),
    "post_attention_layernorm.weight": Rule("post_attention_norm.weight", None, _plus_one),
    "pre_feedforward_layernorm.weight": Rule("ffn_norm.weight", None, _plus_one),
    "post_feedforward_layernorm.weight": Rule("post_ffn_norm.weight", None, _plus_one),
    "self_attn.q_norm.weight": Rule("attention.q_norm.weight", None, _plus_one),
    "self_attn.k_norm.weight": Rule("attention.k_norm.weight", None, _plus_one),
}

_GPT2_LAYER = {
    **_both("ln_1", "attention_norm"), **_both("ln_2", "ffn_norm"),
    **_both("attn.c_attn", "attention.wqkv", None, _t), **_both("attn.c_proj", "attention.wo", None, _t),
    **_both("mlp.c_fc", "feed_forward.w1", None, _t), **_both("mlp.c_proj", "feed_forward.w2", None, _t),
}
_GPT2_TOP = {
    **{f"{p}wte.weight": Rule("tok_embeddings.weight") for p in ("transformer.", "")},
    **{f"{p}wpe.weight": Rule("pos_embeddings.weight") for p in ("transformer.", "")},
    **{f"{p}ln_f.{w}": Rule(f"norm.{w}") for p in ("transformer.", "") for w in ("weight", "bias")},
    "lm_head.weight": Rule("output.weight"),
}

_MPT_LAYER = {
    **_both("norm_1", "attention_norm"), **_both("norm_2", "ffn_norm"),
    **_both("attn.Wqkv", "attention.wqkv"), **_both("attn.out_proj", "attention.wo"),
    **_both("ffn.up_proj", "feed_forward.w1"), **_both("ffn.down_proj", "feed_forward.w2"),
}
_MPT_TOP = {
    "transformer.wte.weight": Rule("tok_embeddings.weight"),
    **{f"transformer.norm_f.{w}": Rule(f"norm.{w}") for w in ("weight", "bias")},
    "lm_head.weight": Rule("output.weight"),
}

_FALCON_LAYER = {
    **_both("input_layernorm", "attention_norm"), **_both("ln_attn", "attention_norm"),
    **_both("ln_mlp", "ffn_norm"), **_both("post_attention_layernorm", "ffn_norm"),
    **_both("self_attention.query_key_value", "attention.wqkv", None, _falcon_qkv, _falcon_qkv),
    **_both("self_attention.dense", "attention.wo"),
    **_both("mlp.dense_h_to_4h", "feed_forward.w1"), **_both("mlp.dense_4h_to_h", "feed_forward.w2"),
}
_FALCON_TOP = {
    "transformer.word_embeddings.weight": Rule("tok_embeddings.weight"),
    **{f"transformer.ln_f.{w}": Rule(f"norm.{w}") for w in ("weight", "bias")},
    "lm_head.weight": Rule("output.weight"),
}

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("LlamaForCausalLM", "MistralForCausalLM"), ("llama", "mistral"), _llama_config,
           _LLAMA_LAYER_RE, _LLAMA_LAYER, _LLAMA_TOP, gguf_architecture="llama"),
    Family("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), _llama_config, _LLAMA_LAYER_RE, _LLAMA_LAYER, _LLAMA_TOP,
           gguf_architecture="qwen2"),
    Family("gemma3", ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"), ("gemma3_text", "gemma3"),
           _gemma3_config, _LLAMA_LAYER_RE, _GEMMA_LAYER, {**_LLAMA_TOP, "model.norm.weight": Rule(
               "norm.weight", None, _plus_one)}, gguf_architecture="gemma3"),
    Family("gpt2", ("GPT2LMHeadModel", "GPT2Model"), ("gpt2",), _gpt2_config,
           re.compile(r"^(?:transformer\.)?h\.(\d+)\.(.+)$"), _GPT2_LAYER, _GPT2_TOP,
           ignored=re.compile(r"\.attn\.(masked_)?bias$"), gguf_architecture="gpt2"),
    Family("mpt", ("MptForCausalLM", "MPTForCausalLM"), ("mpt",), _mpt_config,
           re.compile(r"^transformer\.blocks\.(\d+)\.(.+)$"), _MPT_LAYER, _MPT_TOP, gguf_architecture="mpt"),
    Family("falcon", ("FalconForCausalLM", "RWForCausalLM"), ("falcon", "RefinedWeb", "RefinedWebModel"),
           _falcon_config, re.compile(r"^transformer\.h\.(\d+)\.(.+)$"), _FALCON_LAYER, _FALCON_TOP,
           gguf_architecture="falcon"),
)}


def family_of(cfg: dict[str, Any], source: str = "config.json") -> Family:
    """The family of a config.json dict, by ``architectures`` then ``model_type``; a one-line error naming
    the supported families otherwise."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type") or ""
    for fam in FAMILIES.values():
        if any(a in fam.hf_architectures for a in archs):
            return fam
    for fam in FAMILIES.values():
        if model_type in fam.hf_model_types:
            return fam
    found = ", ".join(archs) or model_type or "unknown"
    names = "; ".join(f"{f.name} ({', '.join(f.hf_architectures)})" for f in FAMILIES.values())
    raise ModelLoadError(f"{source}: unsupported architecture '{found}'; supported families: {names}")


def config_from_hf(cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A ``ModelConfig`` from a Hugging Face config.json dict (ModelLoadError for what quantchat cannot run)."""
    fam = family_of(cfg, source)
    config = fam.config(cfg, source)
    if config.head_dim % 2 and config.position == "rope":
        raise ModelLoadError(f"{source}: head dimension {config.head_dim} must be even for rotary embeddings")
    return config


def read_hf_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return cfg


def load_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a model folder's config.json."""
    return config_from_hf(read_hf_config(path), source=str(path))
