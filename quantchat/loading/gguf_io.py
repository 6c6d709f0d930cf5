"""GGUF files: read them (metadata, dequantized tensors) and convert them to a Hugging Face folder.

Dequantization is delegated to ``gguf.quants.dequantize``; the conversion writes
``config.json``, ``generation_config.json``, ``model.safetensors`` (float32, HF names,
llama.cpp's rope permutation of q/k undone for llama), the tokenizer files and
``quantchat_source.json``, atomically (temp dir + rename).

Architectures: ``llama`` (LlamaForCausalLM) and ``gemma3`` (Gemma3ForCausalLM, text only). For gemma3,
llama.cpp's converter stores every ``*norm.weight`` as HF's weight + 1 (Gemma3RMSNorm computes
``x * (1 + w)``), so 1 is subtracted here; gemma3's q/k are not permuted (llama.cpp permutes only
llama-style architectures).
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
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "gemma3")
SOURCE_FILE = "quantchat_source.json"
WEIGHTS_FILE = "model.safetensors"
REQUIRED_FILES = ("config.json", "generation_config.json", WEIGHTS_FILE, SOURCE_FILE)

Progress = Callable[[str], None] | None

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
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
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# gemma3 (llama.cpp gguf-py constants.py MODEL_TENSORS[GEMMA3]; HF Gemma3DecoderLayer)
_GEMMA3_LAYER_NAMES = {
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
    """A Hugging Face config.json dict (LlamaForCausalLM or Gemma3ForCausalLM) from GGUF metadata and
    tensor list."""
    arch = g.architecture
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{g.path}: unsupported GGUF architecture '{arch or 'missing'}'; "
            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    if (_meta_int(g, "split.count", 1) or 1) > 1:
        raise ModelLoadError(f"{g.path}: split GGUF files are not supported; merge them with llama-gguf-split first")
    names = set(g.tensor_names)
    if "rope_freqs.weight" in names:
        raise ModelLoadError(
            f"{g.path}: per-dimension rope frequency factors (rope_freqs.weight, Llama-3.1-style scaling) "
            "are not supported"
        )
    if "token_embd.weight" not in names:
        raise ModelLoadError(f"{g.path}: missing tensor 'token_embd.weight'")
    dim = _meta_int(g, f"{arch}.embedding_length", required=True)
    n_layer = _meta_int(g, f"{arch}.block_count", required=True)
    n_head = _meta_int(g, f"{arch}.attention.head_count", required=True)
    n_kv = _meta_int(g, f"{arch}.attention.head_count_kv", n_head)
    ffn = _meta_int(g, f"{arch}.feed_forward_length", required=True)
    ctx = _meta_int(g, f"{arch}.context_length", required=True)
    if not (dim and n_layer and n_head and n_kv and ffn and ctx) or min(dim, n_layer, n_head, n_kv, ffn, ctx) < 0:
        raise ModelLoadError(f"{g.path}: model dimensions in the metadata must be positive")
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
    if arch == "gemma3":
        return _gemma3_config(g, dim=dim, n_layer=n_layer, n_head=n_head, n_kv=n_kv, ffn=ffn, ctx=ctx,
                              head_dim=head_dim, vocab=vocab)
    attention_bias = any(f"blk.0.{p}.bias" in names for p in _ATTN_PARTS)
    mlp_bias = any(f"blk.0.{p}.bias" in names for p in _MLP_PARTS)
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_meta(g, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_meta(g, f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(g, arch),
        "max_position_embeddings": ctx,
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": mlp_bias,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": _meta_int(g, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta_int(g, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    pad = _meta_int(g, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        cfg["pad_token_id"] = pad
    return cfg


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


def _gemma3_config(g: GGUFFile, *, dim: int, n_layer: int, n_head: int, n_kv: int, ffn: int, ctx: int,
                   head_dim: int, vocab: int) -> dict[str, Any]:
    """Gemma3TextConfig fields (transformers' ``gemma3_text``) from gemma3 GGUF metadata."""
    arch = "gemma3"
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


class _Planned(NamedTuple):
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    qk_heads: int | None  # n_head for the q/k un-permute, None otherwise
    offset: float = 0.0  # subtracted from the stored values (gemma3 norms: GEMMA_NORM_OFFSET)


def _tensor_plan(g: GGUFFile, cfg: dict[str, Any]) -> list[_Planned]:
    """GGUF -> HF tensor mapping, checking that every tensor is known, present and of the right shape."""
    dim, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n_head, n_kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    gemma = cfg.get("model_type") == "gemma3_text"
    layer_names = _GEMMA3_LAYER_NAMES if gemma else _LAYER_NAMES
    norm_offset = GEMMA_NORM_OFFSET if gemma else 0.0
    part_shapes = {
        "attn_norm": (dim,), "ffn_norm": (dim,), "post_attention_norm": (dim,), "post_ffw_norm": (dim,),
        "attn_q_norm": (hd,), "attn_k_norm": (hd,),
        "attn_q": (n_head * hd, dim), "attn_k": (n_kv * hd, dim), "attn_v": (n_kv * hd, dim),
        "attn_output": (dim, n_head * hd),
        "ffn_gate": (ffn, dim), "ffn_up": (ffn, dim), "ffn_down": (dim, ffn),
    }
    expected: dict[str, _Planned] = {
        "token_embd.weight": _Planned("token_embd.weight", _GLOBAL_NAMES["token_embd.weight"], (vocab, dim), None),
        "output_norm.weight": _Planned("output_norm.weight", _GLOBAL_NAMES["output_norm.weight"], (dim,), None,
                                       norm_offset),
    }
    if not cfg["tie_word_embeddings"]:
        expected["output.weight"] = _Planned("output.weight", "lm_head.weight", (vocab, dim), None)
    for i in range(cfg["num_hidden_layers"]):
        for part, hf in layer_names.items():
            suffixes = [".weight"]
            if (cfg.get("attention_bias") and part in _ATTN_PARTS) or (cfg.get("mlp_bias") and part in _MLP_PARTS):
                suffixes.append(".bias")
            for suf in suffixes:
                shape = part_shapes[part] if suf == ".weight" else part_shapes[part][:1]
                # llama.cpp permutes q/k rows only for llama-style architectures (not gemma3)
                heads = None if gemma else n_head if part == "attn_q" else n_kv if part == "attn_k" else None
                offset = norm_offset if part.endswith("norm") else 0.0
                name = f"blk.{i}.{part}{suf}"
                expected[name] = _Planned(name, f"model.layers.{i}.{hf}{suf}", shape, heads, offset)
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
        if shape != p.shape:
            raise ModelLoadError(f"{g.path}: tensor '{p.gguf_name}' has shape {list(shape)}, "
                                 f"expected {list(p.shape)} from the metadata")
    return sorted(expected.values(), key=lambda p: p.hf_name)


def hf_tensor(g: GGUFFile, p: _Planned) -> np.ndarray:
    """One tensor of the plan, dequantized to float32 and un-permuted, checked finite."""
    w = g.tensor(p.gguf_name)
    if p.qk_heads is not None:
        w = unpermute_qk(w, p.qk_heads)
    if p.offset:
        w = w - np.float32(p.offset)
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
    """Convert a llama or gemma3 GGUF into a Hugging Face folder (float32 safetensors); returns out_dir.

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
