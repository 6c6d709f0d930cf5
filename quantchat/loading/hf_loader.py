"""Load a Hugging Face model folder (config.json + safetensors, sharded or not) into our Transformer.

Tensors are read one at a time from memory-mapped safetensors files straight into the model
(built on the meta device first), so the peak is the model plus one tensor, never two copies.
Pickle-based checkpoints (*.bin, *.pt) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from quantchat.errors import ModelLoadError
from quantchat.model.config import ModelConfig
from quantchat.model.linear import use_cpu_layout
from quantchat.model.llama import Transformer

INDEX_FILE = "model.safetensors.index.json"
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Hugging Face name (inside a layer) -> (our name, part of a fused weight or None)
_LAYER_MAP: dict[str, tuple[str, int | None]] = {
    "self_attn.q_proj.weight": ("attention.wqkv.weight", 0),
    "self_attn.k_proj.weight": ("attention.wqkv.weight", 1),
    "self_attn.v_proj.weight": ("attention.wqkv.weight", 2),
    "self_attn.q_proj.bias": ("attention.wqkv.bias", 0),
    "self_attn.k_proj.bias": ("attention.wqkv.bias", 1),
    "self_attn.v_proj.bias": ("attention.wqkv.bias", 2),
    "self_attn.o_proj.weight": ("attention.wo.weight", None),
    "self_attn.o_proj.bias": ("attention.wo.bias", None),
    "mlp.gate_proj.weight": ("feed_forward.w13.weight", 0),
    "mlp.up_proj.weight": ("feed_forward.w13.weight", 1),
    "mlp.gate_proj.bias": ("feed_forward.w13.bias", 0),
    "mlp.up_proj.bias": ("feed_forward.w13.bias", 1),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", None),
    "mlp.down_proj.bias": ("feed_forward.w2.bias", None),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
_TOP_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def map_hf_name(name: str) -> tuple[str, int | None] | None:
    """Our parameter name (and fused-part index) for a Hugging Face tensor name; None if not ours."""
    if name in _TOP_MAP:
        return _TOP_MAP[name], None
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_MAP:
        ours, part = _LAYER_MAP[m.group(2)]
        return f"layers.{m.group(1)}.{ours}", part
    return None


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder (following the shard index when there is one)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{index}: invalid shard index ({e})") from None
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{f}: shard listed in {INDEX_FILE} is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ModelLoadError(
            f"{model_dir}: only pickle weights ({', '.join(pickles)}); quantchat loads safetensors only, "
            "for safety (convert the checkpoint to safetensors first)"
        )
    raise ModelLoadError(f"{model_dir}: no *.safetensors weights found")


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    cpu_layout: bool = True,
) -> Transformer:
    """Build the model described by ``model_dir/config.json`` and fill it from its safetensors.

    ``cpu_layout`` stores wide linears transposed on CPU (faster decode); pass False to get plain
    ``nn.Linear`` modules (for quantization algorithms that edit weights).
    """
    model_dir = Path(model_dir)
    config = ModelConfig.from_json_file(model_dir / "config.json")
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v for k, v in model.state_dict().items()}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    n_parts = {"attention.wqkv": 3, "feed_forward.w13": 2}
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                for name in sf.keys():
                    mapped = map_hf_name(name)
                    if mapped is None:
                        if _IGNORED.search(name):
                            continue
                        raise ModelLoadError(f"{f}: unexpected tensor '{name}' for a {config.model_type} model")
                    ours, part = mapped
                    raw = sf.get_tensor(name)
                    t = raw.to(device=device, dtype=dtype)
                    if part is None:
                        # own the memory: don't keep the file mapped (and counted in RSS)
                        state[ours] = raw.clone() if t is raw else t
                        continue
                    pieces = parts.setdefault(ours, {})
                    pieces[part] = t  # torch.cat below copies: no clone needed
                    need = next(n for k, n in n_parts.items() if k in ours)
                    if len(pieces) == need:  # fuse at once, so the parts don't pile up
                        state[ours] = torch.cat([pieces[i] for i in range(need)], dim=0)
                        del parts[ours]
        except SafetensorError as e:
            raise ModelLoadError(f"{f}: corrupt or truncated safetensors file ({e})") from None
        except OSError as e:
            raise ModelLoadError(f"{f}: cannot read ({e})") from None
    for ours, pieces in parts.items():
        need = next(n for k, n in n_parts.items() if k in ours)
        if len(pieces) != need:
            raise ModelLoadError(f"{model_dir}: incomplete weights for {ours} ({len(pieces)} of {need} parts)")
        state[ours] = torch.cat([pieces[i] for i in range(need)], dim=0)
    parts.clear()
    if config.tie_word_embeddings:
        state.pop("output.weight", None)
        expected.pop("output.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelLoadError(f"{model_dir}: weights missing for {len(missing)} tensors, e.g. {missing[0]}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ModelLoadError(
                f"{model_dir}: config/weights mismatch for {k}: weights {tuple(t.shape)}, "
                f"config.json implies {tuple(expected[k].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.rope_cos = torch.empty(0, device=device)
    model.rope_sin = torch.empty(0, device=device)
    model.rope_len = 0
    model = model.eval().requires_grad_(False)
    if cpu_layout and torch.device(device).type == "cpu":
        use_cpu_layout(model)
    return model
