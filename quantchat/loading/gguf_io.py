"""GGUF files: read them (metadata, dequantized tensors) and convert them to a Hugging Face folder.

Dequantization is delegated to ``gguf.quants.dequantize``; the conversion writes
``config.json``, ``generation_config.json``, ``model.safetensors`` (float32, HF names), the tokenizer
files and ``quantchat_source.json``, atomically (temp dir + rename).

Architectures (``GGUF_ARCHITECTURES``: GGUF tensor names -> HF names, per llama.cpp's
convert_hf_to_gguf.py and gguf-py tensor_mapping.py), and what llama.cpp changed on conversion that is
undone here:

* ``llama`` (LlamaForCausalLM): q/k rows permuted into the rope layout (``unpermute_qk``).
* ``qwen2`` (Qwen2ForCausalLM): nothing (q/k/v biases; llama.cpp permutes only llama-style models).
* ``gemma3`` (Gemma3ForCausalLM, text only): every ``*norm.weight`` stored as HF's weight + 1
  (Gemma3RMSNorm computes ``x * (1 + w)``); q/k not permuted.
* ``gpt2`` (GPT2LMHeadModel): the Conv1D weights (c_attn, c_proj, c_fc) stored transposed to [out, in];
  transposed back to Conv1D's [in, out].
* ``falcon`` (FalconForCausalLM): the fused query_key_value rows reordered from n_kv groups of
  (n_head/n_kv q heads, k, v) to [q; k; v]; written back as the 7B layout (multi_query, one kv head:
  [q; k; v] is that layout) or regrouped for ``new_decoder_architecture``. ALiBi Falcon is refused.
* ``mpt`` (MptForCausalLM): nothing; ALiBi max bias and clip_kqv from the metadata. MPT without ALiBi,
  with biases, grouped kv heads, qk LayerNorm or activation scales is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from quantchat.errors import ModelLoadError
from quantchat.paths import quantchat_home
from quantchat.progress import Progress as Bar

CONVERTER_VERSION = 1
SOURCE_FILE = "quantchat_source.json"
WEIGHTS_FILE = "model.safetensors"
REQUIRED_FILES = ("config.json", "generation_config.json", WEIGHTS_FILE, SOURCE_FILE)

Progress = Callable[[str], None] | None

_LLAMA_LAYER = {  # llama, qwen2
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# gemma3 (llama.cpp gguf-py constants.py MODEL_TENSORS[GEMMA3]; HF Gemma3DecoderLayer)
_GEMMA3_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GPT2_LAYER = {
    "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
_GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
             "output_norm": "transformer.ln_f", "output": "lm_head"}
_MPT_LAYER = {
    "attn_norm": "norm_1", "attn_qkv": "attn.Wqkv", "attn_output": "attn.out_proj",
    "ffn_norm": "norm_2", "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj",
}
_MPT_TOP = {"token_embd": "transformer.wte", "output_norm": "transformer.norm_f", "output": "lm_head"}
# Falcon: llama.cpp maps input_layernorm (7B) and ln_mlp (40B) to attn_norm, ln_attn (40B) to attn_norm_2
_FALCON_LAYER = {
    "attn_norm": "input_layernorm", "attn_norm_2": "ln_attn",
    "attn_qkv": "self_attention.query_key_value", "attn_output": "self_attention.dense",
    "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h",
}
_FALCON_TOP = {"token_embd": "transformer.word_embeddings", "output_norm": "transformer.ln_f",
               "output": "lm_head"}
GEMMA_NORM_OFFSET = 1.0  # llama.cpp's Gemma3Model.norm_shift: added to every *norm.weight on conversion
_ATTN_PARTS = ("attn_q", "attn_k", "attn_v", "attn_output")
_MLP_PARTS = ("ffn_gate", "ffn_up", "ffn_down")


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class TensorInfo(NamedTuple):
    """One tensor of a GGUF file: GGML type name and shape in PyTorch/HF order ([out, in] for 2D)."""

    type: str
    shape: tuple[int, ...]
    n_bytes: int
    offset: int


@dataclass
class GGUFFile:
    """An opened GGUF file: metadata as Python values, tensors dequantized on demand."""

    path: Path
    reader: Any = field(repr=False)  # gguf.GGUFReader
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._tensors = {t.name: t for t in self.reader.tensors}

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def _get(self, name: str) -> Any:
        t = self._tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path}: no tensor named '{name}'")
        return t

    def tensor_info(self, name: str) -> TensorInfo:
        """Type name and HF-order shape of a tensor (no data is read)."""
        t = self._get(name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return TensorInfo(t.tensor_type.name, shape, int(t.n_bytes), int(t.data_offset))

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to a new float32 array in PyTorch/HF orientation."""
        from gguf import GGMLQuantizationType as T
        from gguf.quants import dequantize

        t = self._get(name)
        shape = self.tensor_info(name).shape
        try:
            if t.tensor_type == T.F32:
                arr = np.array(t.data, dtype=np.float32)
            elif t.tensor_type in (T.F64, T.I8, T.I16, T.I32, T.I64):
                arr = np.asarray(t.data, dtype=np.float32)
            else:
                arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            return arr.reshape(shape)
        except NotImplementedError:
            raise ModelLoadError(
                f"{self.path}: tensor '{name}' uses GGML type {t.tensor_type.name}, which this gguf package "
                "cannot dequantize"
            ) from None
        except (ValueError, TypeError, IndexError) as e:
            raise ModelLoadError(f"{self.path}: tensor '{name}' is corrupt ({_one_line(e)})") from None


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open a GGUF file; a missing, non-GGUF, truncated or corrupt file raises ModelLoadError."""
    import gguf

    p = Path(path).expanduser()
    try:
        if not p.exists():
            raise ModelLoadError(f"{p}: no such file")
        if p.is_dir():
            raise ModelLoadError(f"{p}: is a directory, expected a .gguf file")
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"{p}: cannot read ({_one_line(e)})") from None
    if size == 0:
        raise ModelLoadError(f"{p}: empty file, not a GGUF model")
    if head != b"GGUF":
        raise ModelLoadError(f"{p}: not a GGUF file (starts with {head!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(p)
    except MemoryError:
        raise ModelLoadError(f"{p}: corrupt GGUF file (header asks for an impossible amount of memory)") from None
    except Exception as e:  # GGUFReader raises ValueError/KeyError/IndexError/... on bad data
        raise ModelLoadError(f"{p}: corrupt or truncated GGUF file ({_one_line(e)})") from None
    if reader.byte_order != "I":
        raise ModelLoadError(f"{p}: big-endian GGUF files are not supported")
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelLoadError(
                f"{p}: truncated GGUF file: tensor '{t.name}' ends at byte {end} but the file has {size} bytes"
            )
    try:
        metadata = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:
        raise ModelLoadError(f"{p}: corrupt GGUF metadata ({_one_line(e)})") from None
    return GGUFFile(path=p, reader=reader, metadata=metadata)


# ---------------------------------------------------------------- config


def _meta(g: GGUFFile, key: str, default: Any = None, *, required: bool = False) -> Any:
    if key in g.metadata:
        return g.metadata[key]
    if required:
        raise ModelLoadError(f"{g.path}: missing GGUF metadata key '{key}'")
    return default


def _meta_int(g: GGUFFile, key: str, default: int | None = None, *, required: bool = False) -> int | None:
    v = _meta(g, key, default, required=required)
    if isinstance(v, list):  # per-layer values (some GGUFs): accept only when uniform
        if not v or any(x != v[0] for x in v):
            raise ModelLoadError(f"{g.path}: per-layer values for '{key}' ({v}) are not supported")
        v = v[0]
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        raise ModelLoadError(f"{g.path}: metadata '{key}' should be an integer, got {v!r}") from None


def _rope_scaling(g: GGUFFile, arch: str) -> dict[str, Any] | None:
    pre = f"{arch}.rope.scaling."
    rtype = _meta(g, pre + "type")
    factor = _meta(g, pre + "factor")
    if rtype is None and _meta(g, f"{arch}.rope.scale_linear") is not None:  # older GGUFs
        rtype, factor = "linear", _meta(g, f"{arch}.rope.scale_linear")
    if rtype in (None, "none", "") or (rtype == "linear" and factor in (None, 1.0)):
        return None
    if factor is None:
        raise ModelLoadError(f"{g.path}: rope scaling '{rtype}' without {pre}factor")
    if rtype == "linear":
        return {"type": "linear", "rope_type": "linear", "factor": float(factor)}
    if rtype == "yarn":
        out: dict[str, Any] = {"type": "yarn", "rope_type": "yarn", "factor": float(factor)}
        orig = _meta(g, pre + "original_context_length")
        if orig is not None:
            out["original_max_position_embeddings"] = int(orig)
        for src, dst in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if _meta(g, pre + src) is not None:
                out[dst] = float(_meta(g, pre + src))
        return out
    raise ModelLoadError(f"{g.path}: unsupported rope scaling type '{rtype}' (supported: none, linear, yarn)")


def hf_config_from_gguf(g: GGUFFile) -> dict[str, Any]:
    """A Hugging Face config.json dict (the family's transformers class, see ``GGUF_ARCHITECTURES``) from
    GGUF metadata and tensor list."""
    arch = g.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{g.path}: unsupported GGUF architecture '{arch or 'missing'}'; "
            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    if (_meta_int(g, "split.count", 1) or 1) > 1:
        raise ModelLoadError(f"{g.path}: split GGUF files are not supported; merge them with llama-gguf-split first")
    if "token_embd.weight" not in set(g.tensor_names):
        raise ModelLoadError(f"{g.path}: missing tensor 'token_embd.weight'")
    return GGUF_ARCHITECTURES[arch].config(g)


def _positive(g: GGUFFile, *values: int | None) -> None:
    if any(not v or v < 0 for v in values):
        raise ModelLoadError(f"{g.path}: model dimensions in the metadata must be positive")


def _llama_dims(g: GGUFFile) -> dict[str, Any]:
    """The dimensions of a llama-style (RMSNorm, RoPE, gated MLP) GGUF: llama, qwen2, gemma3."""
    arch = g.architecture
    names = set(g.tensor_names)
    if "rope_freqs.weight" in names:
        raise ModelLoadError(
            f"{g.path}: per-dimension rope frequency factors (rope_freqs.weight, Llama-3.1-style scaling) "
            "are not supported"
        )
    dim = _meta_int(g, f"{arch}.embedding_length", required=True)
    n_layer = _meta_int(g, f"{arch}.block_count", required=True)
    n_head = _meta_int(g, f"{arch}.attention.head_count", required=True)
    n_kv = _meta_int(g, f"{arch}.attention.head_count_kv", n_head)
    ffn = _meta_int(g, f"{arch}.feed_forward_length", required=True)
    ctx = _meta_int(g, f"{arch}.context_length", required=True)
    _positive(g, dim, n_layer, n_head, n_kv, ffn, ctx)
    if n_head % n_kv:
        raise ModelLoadError(f"{g.path}: head_count {n_head} is not a multiple of head_count_kv {n_kv}")
    head_dim = _meta_int(g, f"{arch}.attention.key_length", dim // n_head)
    v_len = _meta_int(g, f"{arch}.attention.value_length", head_dim)
    if v_len != head_dim:
        raise ModelLoadError(f"{g.path}: key_length {head_dim} != value_length {v_len} is not supported")
    rope_dim = _meta_int(g, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ModelLoadError(f"{g.path}: partial rotary embeddings (rope dim {rope_dim} < head dim {head_dim}) "
                             "are not supported")
    if head_dim % 2:
        raise ModelLoadError(f"{g.path}: head dimension {head_dim} must be even")
    vocab = g.tensor_info("token_embd.weight").shape[0]
    return dict(dim=dim, n_layer=n_layer, n_head=n_head, n_kv=n_kv, ffn=ffn, ctx=ctx, head_dim=head_dim,
                vocab=vocab)


def _token_ids(g: GGUFFile, cfg: dict[str, Any]) -> dict[str, Any]:
    cfg["bos_token_id"] = _meta_int(g, "tokenizer.ggml.bos_token_id")
    cfg["eos_token_id"] = _meta_int(g, "tokenizer.ggml.eos_token_id")
    pad = _meta_int(g, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        cfg["pad_token_id"] = pad
    cfg["torch_dtype"] = "float32"
    return cfg


def _rms_rope_config(g: GGUFFile, arch_name: str, model_type: str, eps: float, theta: float) -> dict[str, Any]:
    """The keys llama-layout configs share (RMSNorm, RoPE, SwiGLU), from the GGUF's dimensions."""
    arch = g.architecture
    d = _llama_dims(g)
    return {
        "architectures": [arch_name],
        "model_type": model_type,
        "hidden_size": d["dim"],
        "intermediate_size": d["ffn"],
        "num_hidden_layers": d["n_layer"],
        "num_attention_heads": d["n_head"],
        "num_key_value_heads": d["n_kv"],
        "head_dim": d["head_dim"],
        "hidden_act": "silu",
        "rms_norm_eps": float(_meta(g, f"{arch}.attention.layer_norm_rms_epsilon", eps)),
        "rope_theta": float(_meta(g, f"{arch}.rope.freq_base", theta)),
        "rope_scaling": _rope_scaling(g, arch),
        "max_position_embeddings": d["ctx"],
        "vocab_size": d["vocab"],
        "tie_word_embeddings": "output.weight" not in set(g.tensor_names),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }


def _llama_config(g: GGUFFile) -> dict[str, Any]:
    """LlamaForCausalLM (biases as the tensors have them)."""
    names = set(g.tensor_names)
    cfg = _rms_rope_config(g, "LlamaForCausalLM", "llama", 1e-5, 10000.0)
    cfg.update(attention_bias=any(f"blk.0.{p}.bias" in names for p in _ATTN_PARTS),
               mlp_bias=any(f"blk.0.{p}.bias" in names for p in _MLP_PARTS), pretraining_tp=1)
    return _token_ids(g, cfg)


def _qwen2_config(g: GGUFFile) -> dict[str, Any]:
    """Qwen2ForCausalLM: the llama layout with q/k/v biases, no sliding window."""
    cfg = _rms_rope_config(g, "Qwen2ForCausalLM", "qwen2", 1e-6, 1_000_000.0)
    cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg["num_hidden_layers"])
    return _token_ids(g, cfg)


def _shape0(g: GGUFFile, name: str) -> int:
    if name not in set(g.tensor_names):
        raise ModelLoadError(f"{g.path}: missing tensor '{name}'")
    return g.tensor_info(name).shape[0]


def _basic_dims(g: GGUFFile) -> tuple[int, int, int, int, int, int]:
    """(dim, n_layer, n_head, ctx, ffn, vocab) of a LayerNorm family (gpt2, mpt, falcon); the MLP width
    comes from the tensors (llama.cpp writes 4 * dim for Falcon whatever the model has)."""
    arch = g.architecture
    dim = _meta_int(g, f"{arch}.embedding_length", required=True)
    n_layer = _meta_int(g, f"{arch}.block_count", required=True)
    n_head = _meta_int(g, f"{arch}.attention.head_count", required=True)
    ctx = _meta_int(g, f"{arch}.context_length", required=True)
    _positive(g, dim, n_layer, n_head, ctx)
    if dim % n_head:
        raise ModelLoadError(f"{g.path}: embedding_length {dim} is not a multiple of head_count {n_head}")
    ffn = _shape0(g, "blk.0.ffn_up.weight")
    return dim, n_layer, n_head, ctx, ffn, g.tensor_info("token_embd.weight").shape[0]


def _no_kv_groups(g: GGUFFile, n_head: int) -> None:
    n_kv = _meta_int(g, f"{g.architecture}.attention.head_count_kv", n_head)
    if n_kv != n_head:
        raise ModelLoadError(f"{g.path}: {g.architecture} with grouped key/value heads (head_count_kv {n_kv} "
                             f"!= head_count {n_head}) is not supported")


def _gpt2_config(g: GGUFFile) -> dict[str, Any]:
    """GPT2LMHeadModel: learned positions (their count from position_embd), LayerNorm, GELU (tanh)."""
    dim, n_layer, n_head, ctx, ffn, vocab = _basic_dims(g)
    _no_kv_groups(g, n_head)
    names = set(g.tensor_names)
    n_pos = _shape0(g, "position_embd.weight")
    cfg: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": dim,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_inner": ffn,
        "n_positions": n_pos,
        "n_ctx": n_pos,
        "vocab_size": vocab,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": float(_meta(g, "gpt2.attention.layer_norm_epsilon", 1e-5)),
        "scale_attn_weights": True,
        "tie_word_embeddings": "output.weight" not in names,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    return _token_ids(g, cfg)


def _mpt_config(g: GGUFFile) -> dict[str, Any]:
    """MptForCausalLM (ALiBi, no biases, MLP 4 * d_model: what transformers' MPT implements)."""
    dim, n_layer, n_head, ctx, ffn, vocab = _basic_dims(g)
    names = set(g.tensor_names)
    _no_kv_groups(g, n_head)
    if "position_embd.weight" in names:
        raise ModelLoadError(f"{g.path}: MPT with learned positions (position_embd) is not supported")
    # llama.cpp names MPT's ffn.act.scales blk.N.ffn.act.scales
    for part, what in (("ffn", "activation scales (ffn.act.scales)"),
                       ("attn_q_norm", "qk LayerNorm (attn_config.qk_ln)")):
        if any(n.startswith("blk.") and n.split(".")[2] == part for n in names):
            raise ModelLoadError(f"{g.path}: MPT with {what} is not supported")
    if any(n.endswith(".bias") for n in names):
        raise ModelLoadError(f"{g.path}: MPT with biases (no_bias false) is not supported")
    if ffn != 4 * dim:
        raise ModelLoadError(f"{g.path}: MPT with an MLP width {ffn} other than 4 * {dim} is not supported")
    alibi_max = _meta_float(g, "mpt.attention.max_alibi_bias")
    if not alibi_max:
        raise ModelLoadError(f"{g.path}: MPT without ALiBi (mpt.attention.max_alibi_bias "
                             f"{alibi_max if alibi_max is not None else 'missing'}) is not supported")
    clip = _meta_float(g, "mpt.attention.clamp_kqv")
    cfg: dict[str, Any] = {
        "architectures": ["MptForCausalLM"],
        "model_type": "mpt",
        "d_model": dim,
        "n_heads": n_head,
        "n_layers": n_layer,
        "expansion_ratio": 4,
        "max_seq_len": ctx,
        "vocab_size": vocab,
        "no_bias": True,
        "layer_norm_epsilon": float(_meta(g, "mpt.attention.layer_norm_epsilon", 1e-5)),
        # transformers' MptAttentionConfig types alibi_bias_max as int (MPT models use 8)
        "attn_config": {"alibi": True, "alibi_bias_max": int(alibi_max) if alibi_max.is_integer() else alibi_max,
                        "clip_qkv": clip or None, "softmax_scale": None, "qk_ln": False, "prefix_lm": False,
                        "attn_uses_sequence_id": False, "attn_type": "multihead_attention"},
        "tie_word_embeddings": "output.weight" not in names,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    return _token_ids(g, cfg)


def _falcon_config(g: GGUFFile) -> dict[str, Any]:
    """FalconForCausalLM, rotary, parallel attention + MLP: the 7B layout (multi_query, one shared norm)
    for one kv head and one norm, else ``new_decoder_architecture`` (grouped q/k/v) with one or two norms."""
    dim, n_layer, n_head, ctx, ffn, vocab = _basic_dims(g)
    names = set(g.tensor_names)
    n_kv = _meta_int(g, "falcon.attention.head_count_kv", n_head)
    _positive(g, n_kv)
    if n_head % n_kv:
        raise ModelLoadError(f"{g.path}: head_count {n_head} is not a multiple of head_count_kv {n_kv}")
    if _meta_float(g, "falcon.attention.max_alibi_bias"):
        raise ModelLoadError(f"{g.path}: Falcon with ALiBi (falcon-rw) is not supported; rotary Falcon models are")
    if "blk.0.ffn_norm.weight" in names:
        raise ModelLoadError(f"{g.path}: Falcon with sequential attention and MLP (parallel_attn false) "
                             "is not supported")
    two_norms = "blk.0.attn_norm_2.weight" in names
    new = two_norms or n_kv > 1
    head_dim = dim // n_head
    if head_dim % 2:
        raise ModelLoadError(f"{g.path}: head dimension {head_dim} must be even")
    cfg: dict[str, Any] = {
        "architectures": ["FalconForCausalLM"],
        "model_type": "falcon",
        "hidden_size": dim,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_kv_heads": n_kv,
        "ffn_hidden_size": ffn,
        "vocab_size": vocab,
        "layer_norm_epsilon": float(_meta(g, "falcon.attention.layer_norm_epsilon", 1e-5)),
        "new_decoder_architecture": new,
        "multi_query": not new,
        "parallel_attn": True,
        "alibi": False,
        "bias": "blk.0.attn_qkv.bias" in names,
        "activation": "gelu",
        "rope_theta": float(_meta(g, "falcon.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(g, "falcon"),
        "max_position_embeddings": ctx,
        "tie_word_embeddings": "output.weight" not in names,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if new:
        cfg["num_ln_in_parallel_attn"] = 2 if two_norms else 1
    return _token_ids(g, cfg)


def _meta_float(g: GGUFFile, key: str) -> float | None:
    v = _meta(g, key)
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ModelLoadError(f"{g.path}: metadata '{key}' should be a number, got {v!r}") from None


def _gemma3_layer_types(g: GGUFFile, n_layer: int, window: int | None) -> list[str]:
    """Sliding/full attention per layer, as llama.cpp's gemma3 loader decides: no sliding window = all
    full; ``attention.sliding_window_pattern`` either a per-layer bool array (true = sliding) or a
    period n (every n-th layer full), default 6."""
    if not window:
        return ["full_attention"] * n_layer
    key = "gemma3.attention.sliding_window_pattern"
    pat = _meta(g, key, 6)
    if isinstance(pat, list):
        if len(pat) != n_layer:
            raise ModelLoadError(f"{g.path}: '{key}' has {len(pat)} entries for {n_layer} layers")
        return ["sliding_attention" if bool(x) else "full_attention" for x in pat]
    try:
        n = int(pat)
    except (TypeError, ValueError):
        raise ModelLoadError(f"{g.path}: metadata '{key}' should be an integer, got {pat!r}") from None
    if n < 0:
        raise ModelLoadError(f"{g.path}: metadata '{key}' must not be negative")
    # llama.cpp set_swa_pattern: swa when n == 0 or il % n < n - 1
    return ["sliding_attention" if n == 0 or i % n < n - 1 else "full_attention" for i in range(n_layer)]


def _gemma3_config(g: GGUFFile) -> dict[str, Any]:
    """Gemma3TextConfig fields (transformers' ``gemma3_text``) from gemma3 GGUF metadata."""
    arch = "gemma3"
    d = _llama_dims(g)
    dim, n_layer, n_head, n_kv, ffn, ctx = d["dim"], d["n_layer"], d["n_head"], d["n_kv"], d["ffn"], d["ctx"]
    head_dim, vocab = d["head_dim"], d["vocab"]
    names = set(g.tensor_names)
    window = _meta_int(g, f"{arch}.attention.sliding_window")
    layer_types = _gemma3_layer_types(g, n_layer, window)
    rope_theta = float(_meta(g, f"{arch}.rope.freq_base", 1_000_000.0))
    rope_local = float(_meta(g, f"{arch}.rope.freq_base_swa", 10_000.0))  # llama.cpp's default
    scaling = _rope_scaling(g, arch)  # applies to the global (full attention) layers
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    if scaling:
        full.update({k: v for k, v in scaling.items() if k != "type"})
    # llama.cpp: f_attention_scale = 1/sqrt(head_dim), except 1/sqrt(n_embd/n_head) for the 27B (62 layers)
    query_pre_attn_scalar = dim // n_head if n_layer == 62 else head_dim
    cfg: dict[str, Any] = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": dim,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": float(_meta(g, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_local_base_freq": rope_local,
        "rope_scaling": scaling,
        "rope_parameters": {"full_attention": full,
                            "sliding_attention": {"rope_type": "default", "rope_theta": rope_local}},
        "sliding_window": window or None,
        "layer_types": layer_types,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "final_logit_softcapping": _meta_float(g, f"{arch}.final_logit_softcapping"),
        "attn_logit_softcapping": _meta_float(g, f"{arch}.attn_logit_softcapping"),
        "max_position_embeddings": ctx,
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_bidirectional_attention": False,
        "use_cache": True,
        "bos_token_id": _meta_int(g, "tokenizer.ggml.bos_token_id", 2),
        "eos_token_id": _meta_int(g, "tokenizer.ggml.eos_token_id", 1),
        "pad_token_id": _meta_int(g, "tokenizer.ggml.padding_token_id", 0),
        "torch_dtype": "float32",
    }
    for n in range(1, n_layer + 1):  # the period, when layer_types has one (older transformers read it)
        if layer_types == ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(n_layer)]:
            cfg["sliding_window_pattern"] = n
            break
    return cfg


def generation_eos_ids(g: GGUFFile, cfg: dict[str, Any]) -> int | list[int] | None:
    """eos for generation_config.json: the GGUF's eos, plus ``<end_of_turn>`` for gemma3 (the chat turn's
    end, which llama.cpp also treats as end of generation)."""
    eos = cfg["eos_token_id"]
    if cfg.get("model_type") != "gemma3_text":
        return eos
    tokens = _meta(g, "tokenizer.ggml.tokens") or []
    ids = [eos] if eos is not None else []
    try:
        eot = tokens.index("<end_of_turn>")
    except ValueError:
        return eos
    return ids + [eot] if eot not in ids else ids


# ---------------------------------------------------------------- tensors


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rope permutation of q_proj/k_proj rows (as transformers' GGUF loader does)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def falcon_grouped_qkv(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's Falcon [q; k; v] rows (weight or bias) back to HF's grouped layout: n_kv groups of
    (n_head/n_kv q heads, k, v), the inverse of FalconModel.modify_tensors in convert_hf_to_gguf.py."""
    hd = w.shape[0] // (n_head + 2 * n_kv)
    rest = w.shape[1:]
    q = w[: n_head * hd].reshape(n_kv, n_head // n_kv, hd, *rest)
    k = w[n_head * hd: (n_head + n_kv) * hd].reshape(n_kv, 1, hd, *rest)
    v = w[(n_head + n_kv) * hd:].reshape(n_kv, 1, hd, *rest)
    return np.concatenate([q, k, v], axis=1).reshape(w.shape)


class _Planned(NamedTuple):
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]  # HF shape
    qk_heads: int | None  # n_head for the q/k un-permute, None otherwise
    offset: float = 0.0  # subtracted from the stored values (gemma3 norms: GEMMA_NORM_OFFSET)
    transpose: bool = False  # stored [out, in], HF wants [in, out] (GPT-2's Conv1D)
    fix: Callable[[np.ndarray], np.ndarray] | None = None  # any other shape-preserving layout change

    @property
    def gguf_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transpose else self.shape


class _Part(NamedTuple):
    """One GGUF tensor stem of an architecture: its shape (GGUF/PyTorch orientation), whether a ``.bias``
    goes with it, and what undoes llama.cpp's changes (applied to the weight; ``fix`` to the bias too)."""

    shape: tuple[int, ...]
    bias: bool = False
    qk_heads: int | None = None
    offset: float = 0.0
    transpose: bool = False
    fix: Callable[[np.ndarray], np.ndarray] | None = None
    hf: str | None = None  # the HF name when it differs from the table's


Parts = tuple[dict[str, _Part], dict[str, _Part]]  # (layer parts, global parts)


def _top(cfg: dict[str, Any], vocab: int, dim: int, **parts: _Part) -> dict[str, _Part]:
    """The global tensors: the token embedding, ``parts`` (the final norm, ...), and the LM head unless tied."""
    top = {"token_embd": _Part((vocab, dim)), **parts}
    if not cfg["tie_word_embeddings"]:
        top["output"] = _Part((vocab, dim))
    return top


def _llama_parts(cfg: dict[str, Any]) -> Parts:
    dim, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n_head, n_kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    qwen2 = cfg["model_type"] == "qwen2"
    attn_bias, mlp_bias = bool(cfg.get("attention_bias")), bool(cfg.get("mlp_bias"))
    # llama.cpp permutes q/k rows for llama (LlamaModel.permute), not for qwen2
    layer = {
        "attn_norm": _Part((dim,)), "ffn_norm": _Part((dim,)),
        "attn_q": _Part((n_head * hd, dim), attn_bias or qwen2, None if qwen2 else n_head),
        "attn_k": _Part((n_kv * hd, dim), attn_bias or qwen2, None if qwen2 else n_kv),
        "attn_v": _Part((n_kv * hd, dim), attn_bias or qwen2),
        "attn_output": _Part((dim, n_head * hd), attn_bias),
        "ffn_gate": _Part((ffn, dim), mlp_bias), "ffn_up": _Part((ffn, dim), mlp_bias),
        "ffn_down": _Part((dim, ffn), mlp_bias),
    }
    return layer, _top(cfg, vocab, dim, output_norm=_Part((dim,)))


def _gemma3_parts(cfg: dict[str, Any]) -> Parts:
    dim, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n_head, n_kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    norm = _Part((dim,), offset=GEMMA_NORM_OFFSET)
    layer = {
        "attn_norm": norm, "post_attention_norm": norm, "ffn_norm": norm, "post_ffw_norm": norm,
        "attn_q_norm": _Part((hd,), offset=GEMMA_NORM_OFFSET), "attn_k_norm": _Part((hd,), offset=GEMMA_NORM_OFFSET),
        "attn_q": _Part((n_head * hd, dim)), "attn_k": _Part((n_kv * hd, dim)), "attn_v": _Part((n_kv * hd, dim)),
        "attn_output": _Part((dim, n_head * hd)),
        "ffn_gate": _Part((ffn, dim)), "ffn_up": _Part((ffn, dim)), "ffn_down": _Part((dim, ffn)),
    }
    return layer, _top(cfg, vocab, dim, output_norm=norm)


def _gpt2_parts(cfg: dict[str, Any]) -> Parts:
    dim, ffn, vocab = cfg["n_embd"], cfg["n_inner"], cfg["vocab_size"]
    # llama.cpp's GPT2Model transposes c_attn, c_proj and c_fc (Conv1D [in, out]) to [out, in]
    layer = {
        "attn_norm": _Part((dim,), True), "ffn_norm": _Part((dim,), True),
        "attn_qkv": _Part((3 * dim, dim), True, transpose=True),
        "attn_output": _Part((dim, dim), True, transpose=True),
        "ffn_up": _Part((ffn, dim), True, transpose=True), "ffn_down": _Part((dim, ffn), True, transpose=True),
    }
    return layer, _top(cfg, vocab, dim, position_embd=_Part((cfg["n_positions"], dim)),
                       output_norm=_Part((dim,), True))


def _mpt_parts(cfg: dict[str, Any]) -> Parts:
    dim, vocab = cfg["d_model"], cfg["vocab_size"]
    ffn = cfg["expansion_ratio"] * dim
    layer = {
        "attn_norm": _Part((dim,)), "ffn_norm": _Part((dim,)), "attn_qkv": _Part((3 * dim, dim)),
        "attn_output": _Part((dim, dim)), "ffn_up": _Part((ffn, dim)), "ffn_down": _Part((dim, ffn)),
    }
    return layer, _top(cfg, vocab, dim, output_norm=_Part((dim,)))


def _falcon_parts(cfg: dict[str, Any]) -> Parts:
    dim, ffn, vocab = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["vocab_size"]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_kv_heads"]
    hd, bias = dim // n_head, bool(cfg["bias"])
    new = bool(cfg["new_decoder_architecture"])
    two_norms = new and cfg.get("num_ln_in_parallel_attn") == 2
    # llama.cpp reorders query_key_value to [q; k; v]: the 7B layout (one kv head) is already that
    fix = (lambda w: falcon_grouped_qkv(w, n_head, n_kv)) if new and n_kv > 1 else None
    layer = {
        "attn_norm": _Part((dim,), True, hf="ln_mlp" if two_norms else None),
        "attn_qkv": _Part(((n_head + 2 * n_kv) * hd, dim), bias, fix=fix),
        "attn_output": _Part((dim, dim), bias),
        "ffn_up": _Part((ffn, dim), bias), "ffn_down": _Part((dim, ffn), bias),
    }
    if two_norms:
        layer["attn_norm_2"] = _Part((dim,), True)
    return layer, _top(cfg, vocab, dim, output_norm=_Part((dim,), True))


@dataclass(frozen=True)
class GGUFArch:
    """One GGUF architecture (``general.architecture``): its GGUF -> HF tensor names, the config.json it
    becomes, and its tensors' shapes and layout changes for that config."""

    hf_architecture: str
    layer_prefix: str  # HF name prefix of layer {i}
    layer: dict[str, str]  # GGUF layer tensor stem (after "blk.N.") -> HF name inside the layer
    top: dict[str, str]  # GGUF global tensor stem -> HF name
    config: Callable[[GGUFFile], dict[str, Any]]
    parts: Callable[[dict[str, Any]], Parts]


GGUF_ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", "model.layers.{i}.", _LLAMA_LAYER, _LLAMA_TOP, _llama_config,
                      _llama_parts),
    "qwen2": GGUFArch("Qwen2ForCausalLM", "model.layers.{i}.", _LLAMA_LAYER, _LLAMA_TOP, _qwen2_config,
                      _llama_parts),
    "gemma3": GGUFArch("Gemma3ForCausalLM", "model.layers.{i}.", _GEMMA3_LAYER, _LLAMA_TOP, _gemma3_config,
                       _gemma3_parts),
    "gpt2": GGUFArch("GPT2LMHeadModel", "transformer.h.{i}.", _GPT2_LAYER, _GPT2_TOP, _gpt2_config, _gpt2_parts),
    "mpt": GGUFArch("MptForCausalLM", "transformer.blocks.{i}.", _MPT_LAYER, _MPT_TOP, _mpt_config, _mpt_parts),
    "falcon": GGUFArch("FalconForCausalLM", "transformer.h.{i}.", _FALCON_LAYER, _FALCON_TOP, _falcon_config,
                       _falcon_parts),
}
SUPPORTED_GGUF_ARCHITECTURES = tuple(GGUF_ARCHITECTURES)


def _planned(gguf_stem: str, hf_stem: str, part: _Part) -> list[_Planned]:
    hf_shape = part.shape[::-1] if part.transpose else part.shape
    out = [_Planned(f"{gguf_stem}.weight", f"{hf_stem}.weight", hf_shape, part.qk_heads, part.offset,
                    part.transpose, part.fix)]
    if part.bias:
        # llama.cpp permutes a q/k bias like its weight (LlamaModel.modify_tensors)
        out.append(_Planned(f"{gguf_stem}.bias", f"{hf_stem}.bias", part.shape[:1], part.qk_heads, 0.0, False,
                            part.fix))
    return out


def _tensor_plan(g: GGUFFile, cfg: dict[str, Any]) -> list[_Planned]:
    """GGUF -> HF tensor mapping, checking that every tensor is known, present and of the right shape."""
    arch = GGUF_ARCHITECTURES[g.architecture or "llama"]
    layer_parts, top_parts = arch.parts(cfg)
    plan: list[_Planned] = []
    for stem, part in top_parts.items():
        plan += _planned(stem, part.hf or arch.top[stem], part)
    n_layer = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("n_layers")
    for i in range(n_layer):
        prefix = arch.layer_prefix.format(i=i)
        for stem, part in layer_parts.items():
            plan += _planned(f"blk.{i}.{stem}", prefix + (part.hf or arch.layer[stem]), part)
    expected = {p.gguf_name: p for p in plan}
    names = g.tensor_names
    unknown = [n for n in names if n not in expected]
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise ModelLoadError(f"{g.path}: unexpected tensors for a {g.architecture or 'llama'} model: "
                             f"{', '.join(unknown[:3])}{more}")
    missing = [n for n in expected if n not in set(names)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ModelLoadError(f"{g.path}: missing tensors: {', '.join(missing[:3])}{more}")
    for p in expected.values():
        shape = g.tensor_info(p.gguf_name).shape
        if shape != p.gguf_shape:
            raise ModelLoadError(f"{g.path}: tensor '{p.gguf_name}' has shape {list(shape)}, "
                                 f"expected {list(p.gguf_shape)} from the metadata")
    return sorted(expected.values(), key=lambda p: p.hf_name)


def hf_tensor(g: GGUFFile, p: _Planned) -> np.ndarray:
    """One tensor of the plan, dequantized to float32 and put back in HF's layout, checked finite."""
    w = g.tensor(p.gguf_name)
    if p.qk_heads is not None:
        w = unpermute_qk(w, p.qk_heads)
    if p.offset:
        w = w - np.float32(p.offset)
    if p.fix is not None:
        w = p.fix(w)
    if p.transpose:
        w = w.T
    if not np.isfinite(w).all():
        raise ModelLoadError(f"{g.path}: tensor '{p.gguf_name}' contains NaN or infinite values (corrupt file?)")
    return np.ascontiguousarray(w, dtype="<f4")


def _write_safetensors(g: GGUFFile, plan: list[_Planned], out: Path) -> None:
    """Stream float32 tensors into a safetensors file, one tensor in memory at a time (a progress bar
    over the tensors on stderr, see quantchat.progress)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in plan:
        n = 4 * int(np.prod(p.shape, dtype=np.int64))
        header[p.hf_name] = {"dtype": "F32", "shape": list(p.shape), "data_offsets": [offset, offset + n]}
        offset += n
    hdr = json.dumps(header, separators=(",", ":")).encode()
    hdr += b" " * (-len(hdr) % 8)
    with open(out, "wb") as f, Bar(len(plan), f"converting {g.path.name}", unit="tensor") as bar:
        f.write(struct.pack("<Q", len(hdr)))
        f.write(hdr)
        for p in plan:
            w = hf_tensor(g, p)
            f.write(memoryview(w).cast("B"))
            del w
            bar.update()


# ---------------------------------------------------------------- conversion


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_tokenizer(reader: Any, out_dir: Path) -> None:
    """Tokenizer files from GGUF metadata (quantchat.tokenizer.gguf_tokenizer)."""
    from quantchat.tokenizer.gguf_tokenizer import write_tokenizer_files

    write_tokenizer_files(reader, out_dir)


def _is_complete(out_dir: Path) -> bool:
    """True when out_dir holds a finished conversion by this converter version."""
    try:
        src = json.loads((out_dir / SOURCE_FILE).read_text())
        if src.get("converter_version") != CONVERTER_VERSION:
            return False
        files = src.get("files") or {}
        if any(f not in files for f in REQUIRED_FILES if f != SOURCE_FILE):
            return False
        return all((out_dir / name).is_file() and (out_dir / name).stat().st_size == size
                   for name, size in files.items())
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def _rmtree(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


def convert_gguf_to_hf(path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                       progress: Progress = None) -> Path:
    """Convert a GGUF (an architecture of ``GGUF_ARCHITECTURES``) into a Hugging Face folder (float32 safetensors); returns out_dir.

    ``progress`` gets a few status lines (start, tokenizer, hashing, done); the per-tensor progress is a
    bar on stderr (quantchat.progress)."""
    start = time.perf_counter()
    g = read_gguf(path)
    cfg = hf_config_from_gguf(g)
    plan = _tensor_plan(g, cfg)
    out = Path(out_dir).expanduser().absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes it 0700
    except OSError as e:
        raise ModelLoadError(f"{out}: cannot create the conversion folder ({_one_line(e)})") from None
    try:
        if progress:
            progress(f"converting {g.path.name} ({len(plan)} tensors) to {out}")
        _write_safetensors(g, plan, tmp / WEIGHTS_FILE)
        if progress:
            progress("writing tokenizer files")
        try:
            _write_tokenizer(g.reader, tmp)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{g.path}: cannot build the tokenizer ({_one_line(e)})") from e
        # config.json last-but-one: a half-written temp folder never looks like a model folder
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": generation_eos_ids(g, cfg)}
        if "pad_token_id" in cfg:
            gen["pad_token_id"] = cfg["pad_token_id"]
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if progress:
            progress("hashing the source file")
        st = g.path.stat()
        source = {
            "source": str(g.path.absolute()),
            "size": st.st_size,
            "mtime": st.st_mtime,
            "sha256": _sha256(g.path),
            "architecture": g.architecture,
            "tensor_types": {n: g.tensor_info(n).type for n in g.tensor_names},
            "converter_version": CONVERTER_VERSION,
            "conversion_seconds": round(time.perf_counter() - start, 3),
            "files": {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()},
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        _install(tmp, out)
    except OSError as e:
        _rmtree(tmp)
        raise ModelLoadError(f"{out}: cannot write the converted model ({_one_line(e)})") from None
    except BaseException:
        _rmtree(tmp)
        raise
    if progress:
        progress(f"converted in {time.perf_counter() - start:.1f}s")
    return out


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished tmp folder to out, replacing a stale out (a concurrent finished one wins)."""
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        try:
            os.rename(out, old)
        except FileNotFoundError:
            old = None
    try:
        os.rename(tmp, out)
    except OSError:
        if _is_complete(out):  # another process finished the same conversion first
            _rmtree(tmp)
        else:
            raise
    finally:
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                _rmtree(old)
            else:
                old.unlink(missing_ok=True)


def cache_key(path: str | os.PathLike[str]) -> str:
    """First 12 hex of sha256 of (absolute path, size, mtime) of a GGUF file."""
    p = Path(path).expanduser().absolute()
    try:
        st = p.stat()
    except OSError as e:
        raise ModelLoadError(f"{p}: {'no such file' if isinstance(e, FileNotFoundError) else _one_line(e)}") from None
    return hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]


def _converted_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser().absolute()
    return quantchat_home() / "converted" / f"{p.stem}-{cache_key(p)}"


def converted_dir_for_gguf(path: str | os.PathLike[str], progress: Progress = None) -> Path:
    """The cached HF conversion of a GGUF under quantchat_home()/converted; converts when missing."""
    out = _converted_path(path)
    if _is_complete(out):
        return out
    return convert_gguf_to_hf(Path(path).expanduser().absolute(), out, progress=progress)


def cached_conversion(path: str | os.PathLike[str]) -> Path | None:
    """The GGUF's complete cached conversion folder, or None (nothing converted yet)."""
    out = _converted_path(path)
    return out if _is_complete(out) else None


def gguf_summary(path: str | os.PathLike[str]) -> tuple[str, dict[str, int]]:
    """(architecture, tensor type -> number of tensors) of a GGUF file. Read from its cached conversion
    when there is one: parsing a GGUF's metadata (a 49k-token vocabulary) takes seconds."""
    out = _converted_path(path)
    if _is_complete(out):
        try:
            src = json.loads((out / SOURCE_FILE).read_text())
            return src["architecture"], dict(Counter(src["tensor_types"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # an older or damaged record: read the file itself
    g = read_gguf(path)
    return g.architecture, dict(Counter(g.tensor_info(n)[0] for n in g.tensor_names))


def gguf_types(path: str | os.PathLike[str]) -> dict[str, int]:
    """Tensor type -> number of tensors in a GGUF file."""
    return gguf_summary(path)[1]


def gguf_main_type(types: dict[str, int]) -> str:
    """The weights' type: the most common non-float type (F32/F16/BF16 when the file is all float)."""
    floats = {"F32", "F16", "BF16"}
    quant = {t: n for t, n in types.items() if t not in floats}
    pool = quant or types
    return max(pool, key=lambda t: pool[t]) if pool else "?"
