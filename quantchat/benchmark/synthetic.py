"""Random-weight models with the shapes of published LLaMA-family models, for speed and memory at real sizes.

``quantchat bench --synthetic tinyllama-1.1b`` (or ``llama-2-7b``) writes a model folder with random
weights into the cache: either a Hugging Face folder (config.json + sharded safetensors in the run's
dtype) or, for quantized variants, a quantchat quantized folder whose packed codes are drawn at random
directly (the packed layout is what decides speed and memory; no float copy of the model is ever made).
Tensors are generated and written one shard at a time, so memory stays near one shard (<= 1 GB).
Text quality of such models is meaningless: they are for timing and memory only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from quantchat.errors import QuantchatError
from quantchat.paths import build_dir_atomically

# config.json fields as published with the models (TinyLlama/TinyLlama-1.1B-Chat-v1.0, meta-llama/Llama-2-7b-hf)
SYNTHETIC_CONFIGS: dict[str, dict] = {
    "tinyllama-1.1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
        "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    },
    "llama-2-7b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    },
}
SYNTHETIC_NOTE = "random weights: speed and memory only, output quality is meaningless"
MARKER_FILE = "quantchat_synthetic.json"
SHARD_BYTES = 1 << 30
WEIGHT_STD = 0.02


def synthetic_config(name: str, overrides: dict | None = None) -> dict:
    """The Hugging Face config dict of a synthetic model (``overrides`` shrink it, e.g. in tests)."""
    if name not in SYNTHETIC_CONFIGS:
        raise QuantchatError(f"unknown synthetic model '{name}'; choose one of {', '.join(SYNTHETIC_CONFIGS)}")
    return {**SYNTHETIC_CONFIGS[name], **(overrides or {})}


def n_params(cfg: dict) -> int:
    from quantchat.model.families import config_from_hf

    return config_from_hf(cfg, source="synthetic").n_params


def cache_name(name: str, cfg: dict, kind: str) -> str:
    """Folder name for a synthetic model: the name, a short hash of the config when overridden, the variant."""
    base = name
    if cfg != SYNTHETIC_CONFIGS.get(name):
        base += "-" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    return f"{base}-{kind}"


def write_synthetic_tokenizer(out_dir: Path, vocab_size: int, bos_id: int = 1, eos_id: int = 2) -> None:
    """A word-level tokenizer of ``vocab_size`` tokens (<unk>, <s>, </s>, then ``t3``, ``t4``...), whitespace split.

    Benchmarks feed token ids directly; this only makes the folder a complete, loadable model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = {0: "<unk>", bos_id: "<s>", eos_id: "</s>"}
    vocab = {specials.get(i, f"t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def _write_shards(tmp: Path, tensors: Iterator[tuple[str, object]], metadata: dict,
                  progress: Callable[[str], None] | None, shard_bytes: int = SHARD_BYTES) -> None:
    """Save (name, tensor) pairs into model-0000i-of-0000n.safetensors files of at most ``shard_bytes``
    (one tensor may exceed it), holding one shard in memory at a time, and write the shard index."""
    from safetensors.torch import save_file

    shard: dict = {}
    size, files, weight_map, total = 0, [], {}, 0

    def flush() -> None:
        nonlocal shard, size
        if not shard:
            return
        name = f"shard-{len(files) + 1:05d}.safetensors"
        save_file(shard, tmp / name, metadata=metadata)
        files.append(name)
        weight_map.update({k: name for k in shard})
        if progress:
            progress(f"  wrote {name} ({size / 1e9:.2f} GB)")
        shard, size = {}, 0

    for name, t in tensors:
        n = t.numel() * t.element_size()
        if shard and size + n > shard_bytes:
            flush()
        shard[name] = t
        size += n
        total += n
    flush()
    final = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for old, new in final.items():
        os.replace(tmp / old, tmp / new)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}, indent=1))


def _hf_tensor_shapes(cfg: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    d, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or d // nh
    yield "model.embed_tokens.weight", (vocab, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (d,)
        yield p + "self_attn.q_proj.weight", (nh * hd, d)
        yield p + "self_attn.k_proj.weight", (nkv * hd, d)
        yield p + "self_attn.v_proj.weight", (nkv * hd, d)
        yield p + "self_attn.o_proj.weight", (d, nh * hd)
        yield p + "post_attention_layernorm.weight", (d,)
        yield p + "mlp.gate_proj.weight", (ffn, d)
        yield p + "mlp.up_proj.weight", (ffn, d)
        yield p + "mlp.down_proj.weight", (d, ffn)
    yield "model.norm.weight", (d,)
    if not cfg.get("tie_word_embeddings"):
        yield "lm_head.weight", (vocab, d)


def float_bytes(cfg: dict, dtype: str) -> int:
    size = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    return sum(_numel(s) for _, s in _hf_tensor_shapes(cfg)) * size


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_common(tmp: Path, name: str, cfg: dict, kind: str) -> None:
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    write_synthetic_tokenizer(tmp, cfg["vocab_size"], cfg.get("bos_token_id") or 1, cfg.get("eos_token_id") or 2)
    (tmp / MARKER_FILE).write_text(json.dumps({"synthetic": name, "kind": kind, "note": SYNTHETIC_NOTE}, indent=1))


def build_float_model(out_dir: Path, cfg: dict, dtype: str = "float32", name: str = "synthetic", seed: int = 0,
                      progress: Callable[[str], None] | None = None) -> Path:
    """A Hugging Face folder (config.json, tokenizer, sharded safetensors) with random ``dtype`` weights."""
    import torch

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    gen = torch.Generator().manual_seed(seed)

    def tensors():
        for tname, shape in _hf_tensor_shapes(cfg):
            if len(shape) == 1:  # norms: around 1
                yield tname, torch.ones(shape, dtype=tdtype)
            else:
                yield tname, (torch.randn(shape, generator=gen) * WEIGHT_STD).to(tdtype)

    def build(tmp: Path) -> None:
        _write_common(tmp, name, {**cfg, "torch_dtype": dtype}, dtype)
        _write_shards(tmp, tensors(), {"format": "pt"}, progress)

    return build_dir_atomically(out_dir, build)


def build_quantized_model(out_dir: Path, cfg: dict, method: str, group_size: int | None = None, name: str = "synthetic",
                          seed: int = 0, progress: Callable[[str], None] | None = None) -> Path:
    """A quantchat quantized folder (the layout ``quantchat quantize`` writes) of a random-weight model.

    Each linear gets a random float weight (normal, std 0.02) that is round-to-nearest quantized at
    once with quantchat's own ``quantize_codes`` and stored as ``save_quantized`` stores codes, one
    module at a time: no float copy of the whole model ever exists. awq / gptq give the same packed
    int4 layout as the round-to-nearest methods (calibration only changes the values), so they are
    round-to-nearest here, with their method's label and grid.
    """
    import torch

    from quantchat.model.families import config_from_hf
    from quantchat.quant import checkpoint as ck
    from quantchat.quant.quantize import QuantSpec, linear_names, quantize_codes

    spec = QuantSpec.for_method(method, group_size)
    head_spec = QuantSpec("int8", 8, None, True)
    mcfg = config_from_hf(cfg, source="synthetic")
    model = _meta_model(mcfg)
    gen = torch.Generator().manual_seed(seed)
    modules: dict[str, dict] = {}
    tied = mcfg.tie_word_embeddings
    stored = getattr(ck, "stored_codes", lambda c: c)  # the checkpoint's storage form of portable codes

    def codes_for(n: int, k: int, sp) -> dict:
        w = torch.randn((n, k), generator=gen) * WEIGHT_STD
        return stored(quantize_codes(w, sp))

    def tensors():
        for lname in linear_names(model):
            m = model.get_submodule(lname)
            k, n = m.in_features, m.out_features
            modules[lname] = {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric,
                              "in_features": k, "out_features": n, "bias": False}
            for key, t in codes_for(n, k, spec).items():
                yield f"{lname}.{key}", t.contiguous()
        V, D = mcfg.vocab_size, mcfg.dim
        modules["output"] = {"bits": 8, "group_size": None, "symmetric": True, "in_features": D,
                             "out_features": V, "bias": False}
        for key, t in codes_for(V, D, head_spec).items():
            yield f"output.{key}", t.contiguous()
        if not tied:
            modules["tok_embeddings"] = {"bits": 8, "group_size": None, "symmetric": True, "embedding": True,
                                         "in_features": D, "out_features": V, "bias": False}
            for key, t in codes_for(V, D, head_spec).items():
                yield f"tok_embeddings.{key}", t.contiguous()
        for pname, p in model.named_parameters():  # norms (the float parameters left)
            owner = pname.rpartition(".")[0]
            if owner in modules or owner == "tok_embeddings" or pname.startswith("output."):
                continue
            if p.dim() != 1:
                raise QuantchatError(f"synthetic quantized model: unexpected float parameter {pname}")
            yield pname, torch.ones(p.shape, dtype=torch.float32)

    def build(tmp: Path) -> None:
        _write_shards(tmp, tensors(), {"format": "pt", "quantchat": ck.FORMAT}, progress)
        quant = {"format": ck.FORMAT, "version": ck.FORMAT_VERSION, **spec.to_dict(), "packing": ck.PACKING,
                 "tied_embedding": tied, "modules": modules}
        (tmp / ck.QUANT_FILE).write_text(json.dumps(quant, indent=1))
        _write_common(tmp, name, {**cfg, "quantization_config": {"quant_method": "quantchat", **spec.to_dict(),
                                                                 "version": ck.FORMAT_VERSION}}, method)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        manifest = {"files": {f: {"sha256": ck.sha256_file(tmp / f), "size": (tmp / f).stat().st_size}
                              for f in files}}
        (tmp / ck.MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))

    return build_dir_atomically(out_dir, build)


def _meta_model(mcfg):
    import torch

    from quantchat.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(mcfg)


def quantized_bytes(cfg: dict, method: str, group_size: int | None = None) -> int:
    """Approximate size of the packed weights (codes + scales) of a quantized synthetic model."""
    from quantchat.quant.quantize import QuantSpec

    spec = QuantSpec.for_method(method, group_size)
    d, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or d // nh
    lin = d * hd * (2 * nh + 2 * nkv) + 3 * d * ffn
    per = lin // 2 + lin // spec.group_size * 8 if spec.bits == 4 else lin  # int4: 0.5 B/weight + scale, zero per group
    emb = vocab * d * (1 if cfg.get("tie_word_embeddings") else 2)
    return cfg["num_hidden_layers"] * per + emb


def is_complete(path: Path) -> bool:
    """A finished synthetic folder (built atomically, so the marker means complete)."""
    return (Path(path) / MARKER_FILE).is_file() and (Path(path) / "config.json").is_file()
