"""Export a model to a GGUF file llama.cpp loads: Q4_0, Q4_1 or Q8_0 linears.

Sources: a quantchat quantized folder (each linear dequantized with its own scales -- for AWQ
these already include the folded activation scales, and the folder's norm weights carry the
inverse -- then re-quantized into GGUF's 32-weight blocks), or a float model (HF folder, .gguf,
or the embedded default). Quantization, tensor layout and metadata are written with the ``gguf``
package (``gguf.quants.quantize``, ``GGUFWriter``, ``gguf.vocab.SpecialVocab``).

Layout, as llama.cpp's ``convert_hf_to_gguf.py`` writes each architecture (the family's
``general.architecture``: llama, qwen2, gemma3, gpt2, mpt, falcon; ``GGUF_EXPORT_ARCHITECTURES``):

* ``token_embd``, ``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
  ffn_up, ffn_down}``, ``output_norm`` and ``output`` (left out for tied embeddings: llama.cpp then
  reads ``token_embd`` as the head); quantchat's fused wqkv / w13 are split back;
* llama: q and k rows permuted into llama.cpp's rope layout (the inverse of ``gguf_io.unpermute_qk``);
  qwen2: not permuted, q/k/v biases; gemma3: also ``attn_q_norm``, ``attn_k_norm``,
  ``post_attention_norm``, ``post_ffw_norm`` (quantchat's norm weights are already HF's + 1, as
  llama.cpp stores them), its sliding pattern and local rope base where they differ from llama.cpp's
  defaults;
* gpt2, mpt, falcon: one fused ``attn_qkv`` ([q; k; v] rows, Falcon's ``jploski`` layout), a plain MLP
  (``ffn_up``, ``ffn_down``), LayerNorm biases, ``position_embd`` (GPT-2), ALiBi bias and q/k/v clamp
  (MPT), Falcon's two norms as ``attn_norm`` (the MLP's) and ``attn_norm_2`` (the attention's);
* linears in the chosen type; ``token_embd`` / ``output`` in Q8_0 (quantchat keeps the LM head
  int8, and a tied embedding shares it); norms and biases F32; a linear whose input width is not a
  multiple of 32 falls back to F16 (as llama.cpp's converter does).

Metadata: the architecture's keys, ``general.*`` (name, file type, quantization version), and
the tokenizer: when the model came from a GGUF file, its ``tokenizer.*`` keys are copied verbatim;
otherwise they are built from tokenizer.json -- byte-level BPE as ``gpt2`` (tokens, merges, token
types, pre-tokenizer identified by its structure), SentencePiece-style BPE (byte fallback) as
``llama`` (scores from the merge ranks) -- plus bos/eos/pad ids, add_bos and the chat template.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType
from gguf.quants import quantize as gguf_quantize
from gguf.vocab import SpecialVocab
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models
from torch import Tensor, nn

from quantchat.errors import QuantchatError
from quantchat.loading.gguf_io import read_gguf
from quantchat.loading.hf_loader import load_model
from quantchat.loading.resolve import resolve_model
from quantchat.progress import Progress as Bar
from quantchat.quant import rtn
from quantchat.quant.checkpoint import is_quantized_dir, load_quantized, read_quant_config
from quantchat.quant.embedding import QuantizedEmbedding
from quantchat.quant.linear import QuantizedLinear
from quantchat.tokenizer.gguf_tokenizer import PRE_TOKENIZERS, _regex_pre_tokenizer
from quantchat.tokenizer.tokenizer import Tokenizer

TYPES = ("q4_0", "q4_1", "q8_0")
BLOCK = 32  # GGUF Q4_0/Q4_1/Q8_0 block length (weights along the input dimension)

Progress = Callable[[str], None] | None


@dataclass
class ExportResult:
    path: Path
    qtype: str
    source: str  # "quantized" or "float"
    tokenizer_from: str  # "gguf <path>" or "tokenizer.json"
    n_tensors: int
    size_bytes: int
    tensor_types: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def ggml_type(name: str):
    """The GGMLQuantizationType for q4_0 / q4_1 / q8_0 (QuantchatError otherwise)."""
    key = str(name).lower().replace("-", "_")
    if key not in TYPES:
        raise QuantchatError(f"unsupported GGUF type '{name}'; choose one of {', '.join(TYPES)}")
    return {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q8_0": Q.Q8_0}[key]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's rope layout (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- the source model ---------------------------------------------------------------------------

@dataclass
class _Source:
    model: nn.Module  # quantchat Transformer (float or quantized)
    hf_dir: Path  # folder with config.json and tokenizer files
    quantized: bool
    gguf: Path | None  # the GGUF the model came from, when known (tokenizer keys are copied from it)
    name: str


def _recorded_gguf(hf_dir: Path, quant_cfg: dict | None) -> Path | None:
    """The GGUF a folder was converted from: quantchat_source.json (conversions) or a recorded source."""
    candidates: list[Any] = []
    src = hf_dir / "quantchat_source.json"
    if src.is_file():
        try:
            candidates.append(json.loads(src.read_text()).get("source"))
        except (OSError, ValueError, AttributeError):
            pass
    if quant_cfg:
        s = quant_cfg.get("source")
        candidates += [s.get(k) for k in ("gguf", "origin", "model", "path")] if isinstance(s, dict) else [s]
    for c in candidates:
        if isinstance(c, str) and c.lower().endswith(".gguf") and Path(c).is_file():
            return Path(c)
    return None


def _load_source(spec: str | os.PathLike[str] | None, progress: Progress) -> _Source:
    if spec is not None and Path(spec).expanduser().is_dir() and is_quantized_dir(Path(spec).expanduser()):
        d = Path(spec).expanduser()
        q = read_quant_config(d)
        if progress:
            progress(f"loading quantized {d} ({q['method']})")
        model = load_quantized(d, device="cpu", dtype=torch.float32, keep_codes=True)
        return _Source(model, d, True, _recorded_gguf(d, q), d.name)
    source = resolve_model(None if spec is None else str(spec), progress=progress)
    if progress:
        progress(f"loading {source.name}")
    model = load_model(source.hf_dir, device="cpu", dtype=torch.float32, cpu_layout=False)
    origin = source.origin if source.origin.suffix.lower() == ".gguf" else _recorded_gguf(source.hf_dir, None)
    return _Source(model, source.hf_dir, False, origin, source.name)


def _weight(module: nn.Module) -> Tensor:
    """Float32 [out, in] (dequantized for quantized modules), CPU."""
    if isinstance(module, QuantizedLinear):
        return module.dequantized_weight().float().cpu()
    if isinstance(module, QuantizedEmbedding):
        return rtn.dequantize_int8(module.weight_int8.cpu(), module.scales.float().cpu())
    return module.weight.detach().float().cpu()


def _vec(t: Tensor | None) -> np.ndarray:
    return t.detach().float().cpu().numpy()


Planned = tuple[str, Callable[[], np.ndarray], str]  # GGUF name, its array (made when written), role


def _norm_plan(name: str, norm: nn.Module | None) -> list[Planned]:
    """A norm's weight (and LayerNorm bias) under GGUF stem ``name``."""
    if norm is None:
        return []
    out: list[Planned] = [(f"{name}.weight", lambda: _vec(norm.weight), "norm")]
    if getattr(norm, "bias", None) is not None:
        out.append((f"{name}.bias", lambda: _vec(norm.bias), "bias"))
    return out


def _linear_plan(name: str, m: nn.Module, rows: slice = slice(None), qk_heads: int = 0) -> list[Planned]:
    """Rows ``rows`` of a linear (weight, and bias where it has one) under GGUF stem ``name``; ``qk_heads``:
    permute them into llama.cpp's rope layout (the llama architecture's q and k)."""
    def fix(a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a[rows])
        return permute_qk(a, qk_heads) if qk_heads else a

    out: list[Planned] = [(f"{name}.weight", lambda: fix(_weight(m).numpy()), "linear")]
    if getattr(m, "bias", None) is not None:
        out.append((f"{name}.bias", lambda: fix(_vec(m.bias)), "bias"))
    return out


def _attention_plan(p: str, cfg, att: nn.Module, split: bool) -> list[Planned]:
    """q/k/v as attn_q/attn_k/attn_v (``split``; q/k permuted for llama) or one fused attn_qkv, then attn_output."""
    qs, kvs = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    if split:
        permute = cfg.family == "llama"
        out = (_linear_plan(p + "attn_q", att.wqkv, slice(0, qs), cfg.n_head if permute else 0)
               + _linear_plan(p + "attn_k", att.wqkv, slice(qs, qs + kvs), cfg.n_kv_head if permute else 0)
               + _linear_plan(p + "attn_v", att.wqkv, slice(qs + kvs, None)))
    else:  # gpt2, mpt, falcon: llama.cpp keeps [q; k; v] fused (Falcon's groups reordered to that by its converter)
        out = _linear_plan(p + "attn_qkv", att.wqkv)
    return out + _linear_plan(p + "attn_output", att.wo)


def _mlp_plan(p: str, ff: nn.Module) -> list[Planned]:
    if ff.gated:
        up = (_linear_plan(p + "ffn_gate", ff.w13, slice(0, ff.hidden))
              + _linear_plan(p + "ffn_up", ff.w13, slice(ff.hidden, None)))
    else:
        up = _linear_plan(p + "ffn_up", ff.w1)
    return up + _linear_plan(p + "ffn_down", ff.w2)


def _layer_plan(family: str, cfg, i: int, layer: nn.Module) -> list[Planned]:
    """One block's tensors under llama.cpp's names for the family's architecture."""
    p = f"blk.{i}."
    att, ff = layer.attention, layer.feed_forward
    split = family in ("llama", "qwen2", "gemma3")
    if family == "falcon" and hasattr(layer, "ffn_norm"):
        # two norms (new decoder architecture): llama.cpp's attn_norm is the MLP's (ln_mlp), attn_norm_2 the
        # attention's (ln_attn)
        return (_norm_plan(p + "attn_norm", layer.ffn_norm) + _attention_plan(p, cfg, att, False)
                + _norm_plan(p + "attn_norm_2", layer.attention_norm) + _mlp_plan(p, ff))
    out = _norm_plan(p + "attn_norm", layer.attention_norm) + _attention_plan(p, cfg, att, split)
    if family == "gemma3":
        out += _norm_plan(p + "attn_q_norm", att.q_norm) + _norm_plan(p + "attn_k_norm", att.k_norm)
        out += _norm_plan(p + "post_attention_norm", layer.post_attention_norm)
        out += _norm_plan(p + "ffn_norm", layer.ffn_norm) + _mlp_plan(p, ff)
        return out + _norm_plan(p + "post_ffw_norm", layer.post_ffn_norm)
    if family == "falcon":  # one norm shared by attention and MLP
        return out + _mlp_plan(p, ff)
    return out + _norm_plan(p + "ffn_norm", layer.ffn_norm) + _mlp_plan(p, ff)


def _plan(model: nn.Module) -> list[Planned]:
    cfg = model.config
    family = cfg.family
    out: list[Planned] = [("token_embd.weight", lambda: _weight(model.tok_embeddings).numpy(), "embed")]
    if cfg.position == "learned":
        out.append(("position_embd.weight", lambda: _vec(model.pos_embeddings.weight), "position"))
    for i, layer in enumerate(model.layers):
        out += _layer_plan(family, cfg, i, layer)
    out += _norm_plan("output_norm", model.norm)
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", lambda: _weight(model.output).numpy(), "head"))
    return out


def n_gguf_tensors(model: nn.Module) -> int:
    """How many tensors ``gguf_tensors`` yields for ``model``."""
    return len(_plan(model))


def gguf_tensors(model: nn.Module) -> Iterator[tuple[str, np.ndarray, str]]:
    """(GGUF name, float32 array in GGUF row order, role) for every tensor, as llama.cpp's converter names and
    lays them out for the model's architecture; role: embed, head, linear, norm, bias."""
    for name, make, role in _plan(model):
        yield name, make(), role


def encode_tensor(arr: np.ndarray, role: str, qtype) -> tuple[np.ndarray, Any]:
    """(raw array, GGML type) as written: block types for 2-D weights whose rows are multiples of 32."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if role in ("norm", "bias", "position") or arr.ndim != 2:
        return arr, Q.F32
    target = Q.Q8_0 if role in ("embed", "head") else qtype
    if arr.shape[1] % BLOCK:
        return arr.astype(np.float16), Q.F16
    return gguf_quantize(arr, target), target


# -- metadata -----------------------------------------------------------------------------------

# quantchat family -> llama.cpp's general.architecture
GGUF_EXPORT_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3", "gpt2": "gpt2", "mpt": "mpt",
                             "falcon": "falcon"}


def _export_refusal(cfg) -> str | None:
    """Why llama.cpp's graph for the family cannot run this model (None: it can)."""
    if cfg.family not in GGUF_EXPORT_ARCHITECTURES:
        return f"the {cfg.family} family has no GGUF export"
    if cfg.family == "falcon" and not cfg.parallel_block:
        return "Falcon with sequential attention and MLP: llama.cpp's falcon graph is parallel only"
    if cfg.family == "mpt" and cfg.position != "alibi":
        return "MPT without ALiBi: llama.cpp's mpt graph uses ALiBi"
    if cfg.family == "gemma3" and cfg.attn_scale is not None and abs(cfg.attn_scale * cfg.head_dim ** 0.5 - 1) > 1e-6:
        return "Gemma 3 with query_pre_attn_scalar other than head_dim: llama.cpp fixes the scale to 1/sqrt(head_dim)"
    return None


def _add_rope_scaling(w, cfg) -> None:
    sc = cfg.rope_scaling
    if not sc:
        return
    rtype = sc.get("rope_type") or sc.get("type")
    if rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(sc["factor"]))
    elif rtype == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(sc["factor"]))
        if sc.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(sc["original_max_position_embeddings"]))
        if sc.get("beta_fast"):
            w.add_rope_scaling_yarn_beta_fast(float(sc["beta_fast"]))
        if sc.get("beta_slow"):
            w.add_rope_scaling_yarn_beta_slow(float(sc["beta_slow"]))
    else:
        raise QuantchatError(f"rope scaling '{rtype}' cannot be exported to GGUF by quantchat "
                             "(supported: none, linear, yarn)")


def _add_architecture(w, cfg, warnings: list[str]) -> None:
    """The architecture's metadata keys, as llama.cpp's converter writes them (``GGUFWriter`` prefixes them
    with the architecture's name)."""
    family = cfg.family
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.dim))
    w.add_block_count(int(cfg.n_layer))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(cfg.n_head))
    if family in ("gpt2", "mpt", "falcon"):
        w.add_layer_norm_eps(float(cfg.norm_eps))
        if family == "falcon":
            w.add_head_count_kv(int(cfg.n_kv_head))
            w.add_tensor_data_layout("jploski")  # [q; k; v] rows, as its converter reorders them
        if family == "mpt":
            w.add_max_alibi_bias(float(cfg.alibi_bias_max))
            if cfg.clip_qkv is not None:
                w.add_clamp_kqv(float(cfg.clip_qkv))
        return
    w.add_head_count_kv(int(cfg.n_kv_head))
    if cfg.head_dim != cfg.dim // cfg.n_head:
        w.add_key_length(int(cfg.head_dim))
        w.add_value_length(int(cfg.head_dim))
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    _add_rope_scaling(w, cfg)
    if family == "gemma3":
        # written only where they differ from llama.cpp's gemma3 defaults (every 6th layer global, local
        # base 10000), as its converter does
        if cfg.sliding_window:
            w.add_sliding_window(int(cfg.sliding_window))
            layers = [bool(x) for x in (cfg.sliding_layers or [True] * cfg.n_layer)]
            if layers != [i % 6 < 5 for i in range(cfg.n_layer)]:
                w.add_array(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch="gemma3"), layers)
        if cfg.rope_local_theta and cfg.rope_local_theta != 10_000.0:
            w.add_float32(gguf.Keys.Rope.FREQ_BASE_SWA.format(arch="gemma3"), float(cfg.rope_local_theta))
        if cfg.final_softcap is not None:
            w.add_final_logit_softcapping(float(cfg.final_softcap))
        return
    w.add_rope_dimension_count(int(cfg.head_dim))
    w.add_vocab_size(int(cfg.vocab_size))
    if cfg.sliding_window and cfg.sliding_window < cfg.max_position_embeddings:
        warnings.append(f"sliding window {cfg.sliding_window} is not written: llama.cpp's {family} architecture "
                        "attends over the whole context")


_COPY_SKIP = ("general.architecture", "general.type", "general.file_type", "general.quantization_version",
              "general.alignment")


def gguf_fields(gguf_path: Path, prefixes: tuple[str, ...] = ("general.", "tokenizer.")) -> list[tuple]:
    """(key, value, GGUF value type, array item type) of a GGUF file's metadata keys starting with ``prefixes``."""
    g = read_gguf(gguf_path)  # parsing the metadata of a 49k-token vocabulary takes seconds: done once
    out = []
    for key, f in g.reader.fields.items():
        if not key.startswith(prefixes) or key in _COPY_SKIP or not f.types:
            continue
        val = f.contents()
        if f.types[0] == GGUFValueType.ARRAY and not val:
            continue
        out.append((key, val, f.types[0], f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None))
    return out


def _copy_fields(w, fields: list[tuple], prefix: str) -> int:
    """Add the fields starting with ``prefix`` verbatim (value types kept)."""
    n = 0
    for key, val, vtype, sub in fields:
        if key.startswith(prefix):
            w.add_key_value(key, val, vtype, sub_type=sub)
            n += 1
    return n


def _pre_steps(pt: dict | None) -> tuple:
    """A pre-tokenizer (tokenizer.json form) as a comparable tuple of steps."""
    if not pt:
        return ()
    t = pt.get("type")
    if t == "Sequence":
        return tuple(s for p in pt.get("pretokenizers", []) for s in _pre_steps(p))
    if t == "Split":
        pat = pt.get("pattern") or {}
        return (("split", pat.get("Regex", pat.get("String")), str(pt.get("behavior")).lower(),
                 bool(pt.get("invert"))),)
    if t == "Digits":
        return (("digits", bool(pt.get("individual_digits"))),)
    if t == "ByteLevel":
        return (("bytelevel", bool(pt.get("use_regex", True))),)
    return ((t,),)


# preferred names first among aliases (same regexes; llama.cpp knows "gpt-2", not "gpt2")
_PREFERRED_PRE = ("smollm", "gpt-2", "llama-bpe", "qwen2", "default")


def identify_pre_tokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` name whose splitting equals this tokenizer.json's, or None."""
    want = _pre_steps(tokenizer_json.get("pre_tokenizer"))
    ignore_merges = bool((tokenizer_json.get("model") or {}).get("ignore_merges", False))
    names = [n for n in _PREFERRED_PRE if n in PRE_TOKENIZERS] + [n for n in PRE_TOKENIZERS if n not in _PREFERRED_PRE]
    probe = HFTokenizer(models.BPE())
    for name in names:
        spec = PRE_TOKENIZERS[name]
        if spec["ignore_merges"] != ignore_merges:
            continue
        probe.pre_tokenizer = _regex_pre_tokenizer(spec["regexes"])
        if _pre_steps(json.loads(probe.to_str())["pre_tokenizer"]) == want:
            return name
    return None


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _add_tokenizer_from_json(w, hf_dir: Path, n_vocab: int, pre: str | None, warnings: list[str]) -> None:
    """tokenizer.ggml.* from the folder's tokenizer (tokenizer.json, or a converted tokenizer.model)."""
    tok = Tokenizer.from_dir(hf_dir)
    tj = json.loads(tok.backend.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise QuantchatError(f"{hf_dir}: tokenizer model {model.get('type')!r} cannot be written to GGUF by "
                             "quantchat (byte-level or SentencePiece-style BPE only)")
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1 if vocab else 0
    if size > n_vocab:
        raise QuantchatError(f"{hf_dir}: the tokenizer has {size} tokens but the model only {n_vocab} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for t, i in vocab.items():
        tokens[i], types[i] = t, int(gguf.TokenType.NORMAL)
    for i, a in tok.backend.get_added_tokens_decoder().items():
        if i < n_vocab:
            types[i] = int(gguf.TokenType.CONTROL if a.special else gguf.TokenType.USER_DEFINED)
    spm = bool(model.get("byte_fallback"))
    if spm:  # SentencePiece-style: llama.cpp's "llama" tokenizer merges by score
        w.add_tokenizer_model("llama")
        scores = [0.0] * n_vocab
        rank: dict[str, int] = {}
        for r, m in enumerate(model.get("merges") or []):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            rank.setdefault(a + b, r)
        for t, i in vocab.items():
            if _BYTE_TOKEN.fullmatch(t) and types[i] == gguf.TokenType.NORMAL:
                types[i] = int(gguf.TokenType.BYTE)
            if t in rank:
                scores[i] = -float(rank[t])
            elif types[i] in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
                scores[i] = -1000.0
        unk = model.get("unk_token")
        if unk in vocab:
            types[vocab[unk]] = int(gguf.TokenType.UNKNOWN)
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        norm = json.dumps(tj.get("normalizer") or {}) + json.dumps(tj.get("pre_tokenizer") or {})
        w.add_add_space_prefix('"Prepend"' in norm or ('"Metaspace"' in norm and '"never"' not in norm))
    else:
        if (tj.get("decoder") or {}).get("type") != "ByteLevel":
            raise QuantchatError(f"{hf_dir}: tokenizer is neither byte-level BPE nor SentencePiece-style BPE")
        if pre is None:
            qc = tok.config.get("quantchat")
            pre = qc.get("tokenizer_pre") if isinstance(qc, dict) and qc.get("source") == "gguf" else None
        if pre is None:
            pre = identify_pre_tokenizer(tj)
        if pre is None:
            pre = "default"
            warnings.append("could not identify the pre-tokenizer; wrote tokenizer.ggml.pre = 'default' "
                            "(llama.cpp may split text differently; pass --tokenizer-pre NAME)")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
    vlog = logging.getLogger("gguf.vocab")  # its TemplateProcessing guesses are noise here (quantchat's reading wins)
    level = vlog.level
    vlog.setLevel(logging.ERROR)
    try:
        special = SpecialVocab(hf_dir, load_merges=False, n_vocab=n_vocab)
    finally:
        vlog.setLevel(level)
    if not spm:  # merges as quantchat's tokenizer holds them ("a b"; spaces inside are already byte-mapped)
        special.merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        if not special.merges:
            raise QuantchatError(f"{hf_dir}: byte-level BPE tokenizer without merges: llama.cpp needs "
                                 "tokenizer.ggml.merges")
    for typ, tid in (("bos", tok.bos_id), ("eos", tok.eos_id)):  # quantchat's reading wins
        if tid is not None and tid < n_vocab:
            special.special_token_ids[typ] = tid
    special.add_special_token["bos"] = bool(tok.add_bos)
    if special.chat_template is None and tok.chat_template is not None:
        special.chat_template = tok.chat_template
    special.add_to_gguf(w, quiet=True)


# -- export -------------------------------------------------------------------------------------

def _requantization_note(qdir: Path, qtype: str, warnings: list[str]) -> None:
    """Warn when int4 codes cannot land on GGUF's grid unchanged (only asymmetric g32 -> Q4_1 can)."""
    q = read_quant_config(qdir)
    if q.get("bits") != 4 or qtype == "q8_0":
        return
    exact = q.get("group_size") == 32 and not q.get("symmetric") and q.get("method") in ("int4-asym", "awq")
    if not (exact and qtype == "q4_1"):
        sym = "sym" if q.get("symmetric") else "asym"
        warnings.append(f"re-quantizing {q.get('method')} g{q.get('group_size')} {sym} weights into {qtype}'s "
                        "32-weight blocks adds about as much error again; int4-asym or awq with --group-size 32 "
                        "exported as q4_1 keep their codes (or export the float model directly)")


def export_gguf(
    model: str | os.PathLike[str] | None, out: str | os.PathLike[str], qtype: str = "q8_0", *,
    force: bool = False, name: str | None = None, tokenizer_pre: str | None = None, progress: Progress = None,
) -> ExportResult:
    """Write ``model`` (quantized folder, HF folder, .gguf, None = default) as a GGUF of its architecture
    (llama, qwen2, gemma3, gpt2, mpt, falcon) at ``out``."""
    gtype = ggml_type(qtype)
    qtype = qtype.lower().replace("-", "_")
    out = Path(out).expanduser()
    if out.suffix.lower() != ".gguf":
        raise QuantchatError(f"{out}: the output file should end in .gguf")
    if out.is_dir():
        raise QuantchatError(f"{out}: is a directory, expected a .gguf file name")
    if out.exists() and not force:
        raise QuantchatError(f"{out}: already exists (use --force to replace it)")
    if tokenizer_pre is not None:
        if tokenizer_pre not in PRE_TOKENIZERS:
            raise QuantchatError(f"unknown pre-tokenizer '{tokenizer_pre}' "
                                 f"(known: {', '.join(sorted(PRE_TOKENIZERS))})")
    src = _load_source(model, progress)
    cfg = src.model.config
    refusal = _export_refusal(cfg)
    if refusal:
        raise QuantchatError(f"{src.hf_dir}: cannot export to GGUF: {refusal}")
    warnings: list[str] = []
    if src.quantized:
        _requantization_note(src.hf_dir, qtype, warnings)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise QuantchatError(f"{out}: cannot write here ({e})") from None
    tmp = Path(tmp_name)
    types: dict[str, str] = {}
    try:
        w = gguf.GGUFWriter(str(tmp), GGUF_EXPORT_ARCHITECTURES[cfg.family])
        w.add_type("model")
        fields = gguf_fields(src.gguf) if src.gguf is not None else []
        _copy_fields(w, [f for f in fields if not (name and f[0] == "general.name")], "general.")
        if name:
            w.add_name(name)
        elif src.gguf is None:
            w.add_name(src.name)
        ftype = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_architecture(w, cfg, warnings)
        if src.gguf is not None and tokenizer_pre is None:
            _copy_fields(w, fields, "tokenizer.")
            tokenizer_from = f"gguf {src.gguf}"
        else:
            _add_tokenizer_from_json(w, src.hf_dir, cfg.vocab_size, tokenizer_pre, warnings)
            tokenizer_from = "tokenizer.json"
        with torch.no_grad(), Bar(n_gguf_tensors(src.model), f"encoding {qtype}", unit="tensor") as bar:
            for tname, arr, role in gguf_tensors(src.model):
                if not np.isfinite(arr).all():
                    raise QuantchatError(f"{src.hf_dir}: tensor {tname} has NaN or infinite values")
                raw, t = encode_tensor(arr, role, gtype)
                if t == gguf.GGMLQuantizationType.F16 and role in ("linear", "embed", "head"):
                    warnings.append(f"{tname}: rows of {arr.shape[1]} are not a multiple of {BLOCK}; stored as F16")
                w.add_tensor(tname, raw, raw_dtype=t)
                types[tname] = t.name
                bar.update()
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(out, qtype, "quantized" if src.quantized else "float", tokenizer_from, len(types),
                        out.stat().st_size, types, warnings)

