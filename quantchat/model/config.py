"""Model configuration: one dataclass, built from a Hugging Face config.json (or GGUF metadata)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantchat.errors import ModelLoadError

# config.json "architectures" / "model_type" values this engine runs (LLaMA family).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
}
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    """Shape and hyper-parameters of a LLaMA-family decoder."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        attn = self.dim * self.head_dim * (self.n_head * 2 + self.n_kv_head * 2)
        mlp = 3 * self.dim * self.intermediate_size
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_word_embeddings else 2)
        return self.n_layer * per_layer + emb + self.dim

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from the dict of a Hugging Face config.json; unsupported models raise ModelLoadError."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            found = ", ".join(archs) or model_type or "unknown"
            raise ModelLoadError(
                f"{source}: unsupported architecture '{found}'; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        try:
            dim = int(cfg["hidden_size"])
            n_head = int(cfg["num_attention_heads"])
            n_layer = int(cfg["num_hidden_layers"])
            ffn = int(cfg["intermediate_size"])
            vocab = int(cfg["vocab_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: missing or invalid field {e}") from None
        n_kv = int(cfg.get("num_key_value_heads") or n_head)
        head_dim = int(cfg.get("head_dim") or dim // n_head)
        if n_head % n_kv:
            raise ModelLoadError(f"{source}: num_attention_heads {n_head} not a multiple of num_key_value_heads {n_kv}")
        scaling = cfg.get("rope_scaling")
        theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 layout
        if isinstance(rope_params, dict):
            theta = rope_params.get("rope_theta", theta)
            if rope_params.get("rope_type", "default") != "default":
                scaling = rope_params
        if scaling:
            rtype = scaling.get("rope_type") or scaling.get("type") or "default"
            if rtype not in SUPPORTED_ROPE_TYPES:
                raise ModelLoadError(
                    f"{source}: unsupported rope scaling '{rtype}'; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            scaling = dict(scaling, rope_type=rtype)
            if rtype == "default":
                scaling = None
        eos = cfg.get("eos_token_id")
        eos_ids = [int(x) for x in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
        window = cfg.get("sliding_window") if model_type == "mistral" or "MistralForCausalLM" in archs else None
        return cls(
            vocab_size=vocab,
            dim=dim,
            n_layer=n_layer,
            n_head=n_head,
            n_kv_head=n_kv,
            head_dim=head_dim,
            intermediate_size=ffn,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=int(window) if window else None,
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            model_type=model_type or SUPPORTED_ARCHITECTURES.get(archs[0], "llama"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_json_file(cls, path: Path) -> "ModelConfig":
        try:
            cfg = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"{path}: not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(cfg, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
