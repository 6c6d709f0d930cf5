"""The LLaMA-family decoder (LLaMA-2, Vicuna, Mistral, TinyLlama, SmolLM), in the style of gpt-fast.

RMSNorm, rotary embeddings (with linear / llama3 / yarn scaling), grouped-query attention through
``scaled_dot_product_attention``, SwiGLU MLP, tied or untied embeddings, and a KV cache that is
allocated once for a fixed number of sequence slots.

q/k/v and gate/up projections are fused into single linears (``wqkv``, ``w13``): fewer kernels per
token. Every linear is a plain ``nn.Linear`` so quantization can swap it for a ``QuantizedLinear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantchat.model.config import ModelConfig
from quantchat.kvcache.cache import KVCache, attention_mask


def rope_inv_freq(config: ModelConfig) -> tuple[Tensor, float]:
    """Inverse frequencies and attention scaling for the config's rope type (as transformers computes them)."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = config.rope_scaling
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


def rope_tables(config: ModelConfig, length: int) -> tuple[Tensor, Tensor]:
    """cos and sin tables of shape [length, head_dim], float32."""
    inv_freq, scale = rope_inv_freq(config)
    t = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, D]; cos/sin: [B, 1, T, D] (rotate-half convention, as Hugging Face checkpoints store q/k)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_size = config.n_head * config.head_dim
        self.kv_size = config.n_kv_head * config.head_dim
        self.wqkv = nn.Linear(config.dim, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.wo = nn.Linear(self.q_size, config.dim, bias=config.attention_bias)
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, mask: Tensor | None,
        kv_len: int, slot: int | None, fresh: bool,
    ) -> Tensor:
        """``fresh``: these T tokens are the whole context (positions 0..T-1); else attend over the cache."""
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            ck, cv = self.kv_cache.update(input_pos, k, v, kv_len, slot)
            if not fresh:
                k, v = ck, cv
            else:  # the same rounded keys and values a later step reads from the cache
                k, v = self.kv_cache.round_like_cache(k), self.kv_cache.round_like_cache(v)
        gqa = self.n_head != self.n_kv_head
        if mask is None and fresh and T > 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.q_size))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.hidden = config.intermediate_size
        self.w13 = nn.Linear(config.dim, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None, mask: Tensor | None,
                kv_len: int, slot: int | None, fresh: bool) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask, kv_len, slot, fresh)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope_len = 0
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.max_batch = 0
        self.max_seq_len = 0

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
            self.rope_len = length

    def setup_caches(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate the KV cache once: ``max_batch`` sequence slots of ``max_seq_len`` positions, of
        ``dtype`` (default: the model's)."""
        dtype = dtype or self.dtype
        cache = self.layers[0].attention.kv_cache if self.layers else None
        if (max_batch == self.max_batch and max_seq_len == self.max_seq_len and cache is not None
                and cache.k_cache.dtype == dtype):
            return
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                max_batch, max_seq_len, self.config.n_kv_head, self.config.head_dim, dtype, self.device,
                sliding_window=self.config.sliding_window,
            )
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.setup_rope(max_seq_len)

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
        window = self.config.sliding_window
        if input_pos is None:
            self.setup_rope(T)
            cos, sin = self.rope_cos[:T][None, None], self.rope_sin[:T][None, None]
            kv_len, fresh = T, True
            positions = torch.arange(T, device=idx.device)[None]
        else:
            if kv_len is None:
                kv_len = int(input_pos.max()) + 1
            if kv_len > self.max_seq_len:
                raise ValueError(f"position {kv_len - 1} beyond the KV cache ({self.max_seq_len})")
            cos, sin = self.rope_cos[input_pos].unsqueeze(1), self.rope_sin[input_pos].unsqueeze(1)
            fresh = kv_len == T  # every row holds positions 0..T-1: the new k/v are the whole context
            positions = input_pos
        mask = None
        if fresh:
            if window and T > window:
                mask = attention_mask(positions, T, window)
        elif not (B == 1 and T == 1 and (not window or kv_len <= window)):
            # one row, one query at the newest position sees the whole cache: no mask needed
            mask = attention_mask(positions, kv_len, window)
        x = self.tok_embeddings(idx)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask, kv_len, slot, fresh)
        if keep is not None:
            x = x[torch.arange(B, device=x.device), keep][:, None]
        elif last_only:
            x = x[:, -1:]
        return self.output(self.norm(x))
