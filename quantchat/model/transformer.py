"""The decoder, in the style of gpt-fast: one model for every family quantchat runs (LLaMA, Mistral, Qwen2,
GPT-2, MPT, Falcon, Gemma 3), its layout chosen by ``ModelConfig`` fields (model/config.py).

RMSNorm or LayerNorm; rotary (with linear / llama3 / yarn scaling, a local base for sliding layers),
learned absolute or ALiBi positions; multi-, grouped- or multi-query attention through
``scaled_dot_product_attention``; a gated (SwiGLU / GeGLU) or plain
MLP; sequential or parallel blocks, optional norms after attention and MLP; tied or untied embeddings;
and a KV cache allocated once for a fixed number of sequence slots.

q/k/v and gate/up are fused into single linears (``wqkv``, ``w13``; a plain MLP has ``w1``): fewer
kernels per token. Every linear is a plain ``nn.Linear`` so quantization can swap it for a
``QuantizedLinear``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantchat.kvcache.cache import KVCache, attention_mask
from quantchat.model.config import ModelConfig

def rope_inv_freq(config: ModelConfig, local: bool = False) -> tuple[Tensor, float]:
    """Inverse frequencies and attention scaling for the config's rope type (as transformers computes them);
    ``local``: the sliding-window layers' own unscaled base (``rope_local_theta``, Gemma 3)."""
    dim = config.head_dim
    base = config.rope_local_theta if local and config.rope_local_theta else config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = None if local else config.rope_scaling
    if not sc:
        return inv_freq, 1.0
    rtype = sc["rope_type"]
    factor = float(sc.get("factor", 1.0))
    if rtype == "linear":
        return inv_freq / factor, 1.0
    if rtype == "llama3":
        low_ff, high_ff = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_ctx = float(sc["original_max_position_embeddings"])
        low_wl, high_wl = old_ctx / low_ff, old_ctx / high_ff
        wavelen = 2 * math.pi / inv_freq
        inv = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * inv / factor + smooth * inv
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        return torch.where(medium, smoothed, inv), 1.0
    if rtype == "yarn":
        orig = sc.get("original_max_position_embeddings") or config.max_position_embeddings

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = sc.get("attention_factor")
        if attn is None:
            m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
            attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

        def corr_dim(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if sc.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extra = 1 - ramp
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
        return inv, float(attn)
    raise ValueError(f"unsupported rope type {rtype}")


def rope_tables(config: ModelConfig, length: int, local: bool = False) -> tuple[Tensor, Tensor]:
    """cos and sin tables of shape [length, head_dim], float32."""
    inv_freq, scale = rope_inv_freq(config, local)
    t = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, D]; cos/sin: [B, 1, T, D] (rotate-half convention, as Hugging Face checkpoints store q/k)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(n_head: int, bias_max: float = 8.0) -> Tensor:
    """ALiBi's per-head slopes [n_head], as MPT computes them (a power of two of heads, interleaved)."""
    p2 = 2 ** math.ceil(math.log2(n_head))
    slopes = 1.0 / torch.pow(2, torch.arange(1, p2 + 1, dtype=torch.float32) * (bias_max / p2))
    if p2 != n_head:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_head]
    return slopes


def soft_cap(logits: Tensor, cap: float | None) -> Tensor:
    """``tanh(logits / cap) * cap`` (Gemma 2's logit soft-capping); ``cap`` None: unchanged."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.dim
    if config.norm == "layer":
        return LayerNorm(dim, config.norm_eps, config.norm_bias)
    return RMSNorm(dim, config.norm_eps)


@dataclass
class Context:
    """What every layer of one forward shares: the cache addressing, rope tables and attention masks, each
    for global and for local (sliding-window) layers (``rope[local]``, ``masks[local]``)."""

    input_pos: Tensor | None
    kv_len: int
    slot: int | None
    fresh: bool  # the T new tokens are the whole context (positions 0..T-1)
    rope: dict[bool, tuple[Tensor, Tensor]]
    masks: dict[bool, Tensor | None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.config = config
        self.local = config.is_local(layer)
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_size = config.n_head * config.head_dim
        self.kv_size = config.n_kv_head * config.head_dim
        self.wqkv = nn.Linear(config.dim, self.q_size + 2 * self.kv_size, bias=bool(config.qkv_bias))
        self.wo = nn.Linear(self.q_size, config.dim, bias=config.out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.scale = config.attn_scale if config.attn_scale is not None else 1.0 / math.sqrt(config.head_dim)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        B, T, _ = x.shape
        c = self.config
        qkv = self.wqkv(x)
        if c.clip_qkv is not None:
            qkv = qkv.clamp(-c.clip_qkv, c.clip_qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if c.position == "rope":
            cos, sin = ctx.rope[self.local]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and ctx.input_pos is not None:
            ck, cv = self.kv_cache.update(ctx.input_pos, k, v, ctx.kv_len, ctx.slot)
            if not ctx.fresh:
                k, v = ck, cv
            else:  # the same rounded keys and values a later step reads from the cache
                k, v = self.kv_cache.round_like_cache(k), self.kv_cache.round_like_cache(v)
        mask = ctx.masks[self.local]
        causal = mask is None and ctx.fresh and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                           enable_gqa=self.n_head != self.n_kv_head)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.q_size))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.hidden, self.gated = config.intermediate_size, config.mlp_gated
        self.act = ACTIVATIONS[config.activation]
        if self.gated:
            self.w13 = nn.Linear(config.dim, 2 * config.intermediate_size, bias=config.mlp_bias)
        else:
            self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        if not self.gated:
            return self.w2(self.act(self.w1(x)))
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(self.act(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.config = config
        self.attention = Attention(config, layer)
        self.feed_forward = FeedForward(config)
        self.attention_norm = make_norm(config)
        if not (config.parallel_block and config.shared_block_norm):
            self.ffn_norm = make_norm(config)
        if config.sandwich_norm:
            self.post_attention_norm = make_norm(config)
            self.post_ffn_norm = make_norm(config)

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        c = self.config
        if c.parallel_block:
            a_in = self.attention_norm(x)
            m_in = a_in if c.shared_block_norm else self.ffn_norm(x)
            return x + self.attention(a_in, ctx) + self.feed_forward(m_in)
        a = self.attention(self.attention_norm(x), ctx)
        h = x + (self.post_attention_norm(a) if c.sandwich_norm else a)
        m = self.feed_forward(self.ffn_norm(h))
        return h + (self.post_ffn_norm(m) if c.sandwich_norm else m)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        if config.position == "learned":
            self.pos_embeddings = nn.Embedding(config.max_position_embeddings, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch = 0
        self.max_seq_len = 0
        for name in ("rope_cos", "rope_sin", "rope_cos_local", "rope_sin_local", "alibi"):
            self.register_buffer(name, None, persistent=False)
        self.reset_tables(self.norm.weight.device)

    def reset_tables(self, device: torch.device | str) -> None:
        """Empty the rope tables (rebuilt on first use) and set the ALiBi slopes, on ``device`` (loaders
        call it once the weights are in place)."""
        self.rope_len = 0
        for name in ("rope_cos", "rope_sin", "rope_cos_local", "rope_sin_local"):
            setattr(self, name, torch.empty(0, device=device))
        if self.config.position == "alibi":
            self.alibi = alibi_slopes(self.config.n_head, self.config.alibi_bias_max).to(device)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def setup_rope(self, length: int) -> None:
        if length > self.rope_len:
            cos, sin = rope_tables(self.config, length)
            self.rope_cos, self.rope_sin = cos.to(self.device), sin.to(self.device)
            if self.config.sliding_layers is not None:
                cos, sin = rope_tables(self.config, length, local=True)
                self.rope_cos_local, self.rope_sin_local = cos.to(self.device), sin.to(self.device)
            self.rope_len = length

    def setup_caches(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate the KV cache once: ``max_batch`` sequence slots of ``max_seq_len`` positions, of
        ``dtype`` (default: the model's)."""
        dtype = dtype or self.dtype
        cache = self.layers[0].attention.kv_cache if self.layers else None
        if (max_batch == self.max_batch and max_seq_len == self.max_seq_len and cache is not None
                and cache.k_cache.dtype == dtype):
            return
        for i, layer in enumerate(self.layers):
            layer.attention.kv_cache = KVCache(
                max_batch, max_seq_len, self.config.n_kv_head, self.config.head_dim, dtype, self.device,
                sliding_window=self.config.layer_window(i),
            )
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.setup_rope(max_seq_len)

    def embed(self, idx: Tensor, positions: Tensor | None = None) -> Tensor:
        """Hidden states entering block 0 for tokens ``idx`` [B, T] at ``positions`` (default 0..T-1)."""
        x = self.tok_embeddings(idx)
        if self.config.embedding_scale is not None:
            x = x * torch.tensor(self.config.embedding_scale, dtype=x.dtype)
        if self.config.position == "learned":
            if positions is None:
                positions = torch.arange(idx.shape[1], device=idx.device)[None]
            x = x + self.pos_embeddings(positions)
        return x

    def context(self, B: int, T: int, input_pos: Tensor | None = None, kv_len: int | None = None,
                slot: int | None = None, dtype: torch.dtype | None = None) -> Context:
        """The layers' shared inputs for B rows of T tokens: a plain causal pass (``input_pos`` None) or
        a cached one writing positions ``input_pos`` [B, T] and attending over ``[0, kv_len)``."""
        device, dtype = self.device, dtype or self.dtype
        if input_pos is None:
            self.setup_rope(T)
            kv_len, fresh = T, True
            positions = torch.arange(T, device=device)[None]
        else:
            if kv_len is None:
                kv_len = int(input_pos.max()) + 1
            if kv_len > self.max_seq_len:
                raise ValueError(f"position {kv_len - 1} beyond the KV cache ({self.max_seq_len})")
            fresh = kv_len == T  # every row holds positions 0..T-1: the new k/v are the whole context
            positions = input_pos
        kinds = {False} if self.config.sliding_layers is None else {False, True}
        rope: dict[bool, tuple[Tensor, Tensor]] = {}
        masks: dict[bool, Tensor | None] = {}
        for local in kinds:
            if self.config.position == "rope":
                cos, sin = (self.rope_cos_local, self.rope_sin_local) if local else (self.rope_cos, self.rope_sin)
                cos, sin = (cos[:T][None, None], sin[:T][None, None]) if input_pos is None else (
                    cos[input_pos].unsqueeze(1), sin[input_pos].unsqueeze(1))
                rope[local] = (cos.to(dtype), sin.to(dtype))
            window = self.config.sliding_window if (local or self.config.sliding_layers is None) else None
            masks[local] = self._mask(positions, T, B, kv_len, fresh, window, dtype)
        return Context(input_pos, kv_len, slot, fresh, rope, masks)

    def _mask(self, positions: Tensor, T: int, B: int, kv_len: int, fresh: bool, window: int | None,
              dtype: torch.dtype) -> Tensor | None:
        if self.alibi is not None:  # a float bias per head: slope * (key position - query position)
            allowed = attention_mask(positions, kv_len, window)
            rel = (torch.arange(kv_len, device=positions.device) - positions.unsqueeze(-1)).unsqueeze(1)
            bias = (self.alibi.view(1, -1, 1, 1) * rel).to(dtype)
            return bias.masked_fill(~allowed, float("-inf"))
        if fresh:
            return attention_mask(positions, T, window) if window and T > window else None
        if B == 1 and T == 1 and (not window or kv_len <= window):
            return None  # one row, one query at the newest position sees the whole cache
        return attention_mask(positions, kv_len, window)

    def forward(
        self,
        idx: Tensor,
        input_pos: Tensor | None = None,
        kv_len: int | None = None,
        slot: int | None = None,
        last_only: bool = False,
        keep: Tensor | None = None,
    ) -> Tensor:
        """Logits for ``idx`` [B, T].

        Without ``input_pos`` this is a plain causal forward (no cache; perplexity, scoring).
        With ``input_pos`` [B, T] the new keys/values are written into the cache at those
        positions and attention reads cache positions ``[0, kv_len)``; the B rows use cache rows
        ``slot .. slot + B - 1`` (``slot`` None: ``0 .. B-1``). ``last_only`` returns the last
        position's logits only; ``keep`` [B] those of position ``keep[b]`` of each row (a right-padded
        batch of prompts).
        """
        B, T = idx.shape
        x = self.embed(idx, input_pos)
        ctx = self.context(B, T, input_pos, kv_len, slot, x.dtype)
        for layer in self.layers:
            x = layer(x, ctx)
        if keep is not None:
            x = x[torch.arange(B, device=x.device), keep][:, None]
        elif last_only:
            x = x[:, -1:]
        return self.logits(self.norm(x))

    def logits(self, h: Tensor) -> Tensor:
        """The LM head on final hidden states (soft-capped where the family does)."""
        return soft_cap(self.output(h), self.config.final_softcap)
