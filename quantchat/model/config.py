"""Model configuration: one dataclass whose fields say what differs between the decoder families.

``quantchat/model/families.py`` builds it from a Hugging Face config.json (or GGUF metadata) per family;
``quantchat/model/transformer.py`` is the one decoder it drives. The defaults are the LLaMA layout
(RMSNorm, RoPE, SwiGLU, sequential blocks, no biases).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

NORMS = ("rms", "layer")  # RMSNorm / LayerNorm
POSITIONS = ("rope", "learned", "alibi")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@dataclass
class ModelConfig:
    """Shape, hyper-parameters and layout of a decoder-only transformer."""

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
    attention_bias: bool = False  # bias on q/k/v and the output projection
    mlp_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # --- what differs between families (defaults: LLaMA) ---
    family: str = "llama"  # the entry of model.families.FAMILIES that built it
    norm: str = "rms"  # "rms" | "layer" (LayerNorm)
    norm_bias: bool = False  # LayerNorm with a bias
    position: str = "rope"  # "rope" | "learned" (absolute embeddings) | "alibi"
    alibi_bias_max: float = 8.0  # ALiBi slopes as MPT computes them
    qkv_bias: bool | None = None  # None: as attention_bias (Qwen2: q/k/v only)
    mlp_gated: bool = True  # SwiGLU / GeGLU (gate * up) or a plain up -> act -> down MLP
    activation: str = "silu"
    parallel_block: bool = False  # x + attn(norm(x)) + mlp(norm'(x)) (Falcon, GPT-J)
    shared_block_norm: bool = False  # the parallel block's attention and MLP read one norm (Falcon-7B)
    clip_qkv: float | None = None  # clamp the fused q/k/v output (MPT)
    qk_norm: bool = False  # RMSNorm over each head of q and k (Gemma 3)
    sandwich_norm: bool = False  # norms after attention and after the MLP too (Gemma 2/3)
    embedding_scale: float | None = None  # multiply the token embeddings (Gemma: sqrt(dim))
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    final_softcap: float | None = None  # tanh soft-capping of the logits (Gemma 2)
    sliding_layers: list[bool] | None = None  # which layers use sliding_window (None: all of them)
    rope_local_theta: float | None = None  # sliding layers' rope base (Gemma 3), unscaled

    def __post_init__(self) -> None:
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias

    @property
    def out_bias(self) -> bool:
        return self.attention_bias

    def layer_window(self, i: int) -> int | None:
        """Layer ``i``'s sliding window (None: it attends over the whole context)."""
        if not self.sliding_window or (self.sliding_layers is not None and not self.sliding_layers[i]):
            return None
        return self.sliding_window

    def is_local(self, i: int) -> bool:
        """Layer ``i`` is a sliding-window layer of a model that mixes them with global ones."""
        return self.sliding_layers is not None and bool(self.sliding_layers[i])

    @property
    def block_linears(self) -> tuple[str, ...]:
        """The linears of one block, by name inside it, in the order data flows (a plain MLP has ``w1``
        where a gated one has ``w13``)."""
        return ("attention.wqkv", "attention.wo", "feed_forward.w13" if self.mlp_gated else "feed_forward.w1",
                "feed_forward.w2")

    @property
    def n_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        attn = self.dim * self.head_dim * (self.n_head * 2 + self.n_kv_head * 2)
        mlp = (3 if self.mlp_gated else 2) * self.dim * self.intermediate_size
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_word_embeddings else 2)
        pos = self.max_position_embeddings * self.dim if self.position == "learned" else 0
        return self.n_layer * per_layer + emb + pos + self.dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
