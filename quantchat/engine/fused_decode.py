"""The fused decode step: all layers of a one-token-per-sequence step in one C++ call.

``Transformer.forward`` (quantchat/model/transformer.py) is the reference; at decode its ~15 torch ops per
layer cost more in dispatch than in arithmetic on a small model. ``FusedDecoder`` hands the same
weights and KV cache to ``DecodePlan`` (quantchat/kernels/decode_step.cpp),
which runs the norms, the packed linears, rope or ALiBi, the cache write, grouped-query attention, the MLP
and the LM head as plain loops between quantchat's linear kernels, for every family's layout (LLaMA,
Qwen2, Gemma 3, GPT-2, MPT, Falcon: the parts ``ModelConfig`` switches on, see decode_step.cpp). Same results as the model's forward to
float32 rounding (tests/test_fused_decode.py). Building the decoder re-lays every int4 linear (group size a
multiple of 32) in the row-interleaved layout (``QuantizedLinear.interleave_rows_``; the same bytes, no
copy kept), whose kernel multiplies them with activations rounded to int8 per 32 columns (``R8Path.Q8``,
as llama.cpp's Q4 x Q8_0 dot products) in the step: 2-4x faster batched decode for a rounding error of
about 0.4 % of |x| per 32-column block. Integer sums make each row's result independent of the batch.
int8 linears (the LM head) run on activations rounded to int16 per row (``Path.GEMV_I16``: exact
integer sums, KL 2e-8 on the default model's head). Prefill (the model's own forward) rounds activations
to int16 per weight group: see ``interleave_rows_``. ``QUANTCHAT_NO_Q8=1`` keeps the int4 layout and float
activations everywhere (float32-exact).

Used by ``Engine.decode`` when the model qualifies (``FusedDecoder.build`` returns None otherwise, with
the reason in ``unsupported_reason``): CPU, float32 activations and cache, quantchat's kernels built,
every linear float (``nn.Linear`` / ``TransposedLinear``) or quantchat-kernel int4 / int8. ``QUANTCHAT_NO_FUSED=1`` turns it off.

The plan's layout (which tensors and numbers, in which order) is defined once, in quantchat/kernels/defs.py:
this module fills its fields by name, the C++ reads them by the named indices generated from it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantchat import envs
from quantchat.kernels import cpu, defs
from quantchat.kernels.defs import LinearKind, Path
from quantchat.model.linear import TransposedLinear
from quantchat.model.transformer import Transformer, soft_cap
from quantchat.quant.linear import QuantizedLinear

_EMPTY = torch.empty(0)


def _linear(kind: LinearKind, m: nn.Module, group_size: int, a: Tensor, b: Tensor = _EMPTY,
            c: Tensor = _EMPTY) -> dict:
    bias = getattr(m, "bias", None)
    bias = _EMPTY if bias is None else bias.detach().float().contiguous()
    return dict(kind=kind, group_size=group_size, in_features=m.in_features, out_features=m.out_features,
                a=a, b=b, c=c, bias=bias)


def _linear_entry(m: nn.Module) -> dict:
    """One linear as DecodePlan takes it (the fields of ``defs.LINEAR_META`` and ``defs.LINEAR_TENSORS``)."""
    if isinstance(m, QuantizedLinear):
        if m.r8:
            return _linear(LinearKind.INT4_R8, m, m.group_size, m.qweight, m.scales, m.mins)
        codes = m.resident_codes()
        if codes is None:
            raise ValueError("a quantized linear is not in quantchat's kernel layout")
        if m.bits == 4:
            return _linear(LinearKind.INT4, m, m.group_size, codes["qweight"], codes["scales"], codes["mins"])
        # int8: group_size holds int8_linear's kernel path: the int16-activation GEMV at any batch size
        # (rounding per row: a sequence gets the same logits in any batch), or float with QUANTCHAT_NO_Q8
        path = Path.AUTO if envs.QUANTCHAT_NO_Q8 else Path.GEMV_I16
        return _linear(LinearKind.INT8, m, path, codes["qweight"], codes["scales"])
    if isinstance(m, TransposedLinear):
        w = m.weight_t.detach()
        kind = LinearKind.FLOAT_T
    elif type(m) is nn.Linear:
        w = m.weight.detach()
        kind = LinearKind.FLOAT
    else:
        raise ValueError(f"{type(m).__name__} layers are not supported")
    if w.dtype != torch.float32 or not w.is_contiguous():
        raise ValueError("float linears must be contiguous float32")
    return _linear(kind, m, 0, w)


def _precondition(model: nn.Module) -> str | None:
    """Why the fused step cannot run this model, from everything but its linears (None: it may)."""
    if envs.QUANTCHAT_NO_FUSED:
        return "disabled by QUANTCHAT_NO_FUSED"
    if type(model) is not Transformer:
        return f"{type(model).__name__} is not quantchat's Transformer"
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return "needs a float32 model on CPU"
    if not model.layers or model.layers[0].attention.kv_cache is None:
        return "KV cache not set up"
    if model.layers[0].attention.kv_cache.k_cache.dtype not in (torch.float32, torch.float16):
        return "needs a float32 or float16 KV cache"
    if not cpu.available():
        return f"quantchat's CPU kernels are unavailable ({cpu.unavailable_reason()})"
    return None


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fused step cannot run this model (None: it can)."""
    reason = _precondition(model)
    if reason is None:
        try:
            _plan_inputs(model)  # type: ignore[arg-type]
        except ValueError as e:
            return str(e)
    return reason


def _tensor(t: Tensor | None) -> Tensor:
    """A float32 contiguous vector for the plan, or the empty tensor for a part the model does not have."""
    return _EMPTY if t is None or t.numel() == 0 else t.detach().float().contiguous()


def _norm(norm: nn.Module | None) -> tuple[Tensor, Tensor]:
    """(weight, bias) of an RMSNorm / LayerNorm; empty tensors for a missing norm or bias."""
    if norm is None:
        return _EMPTY, _EMPTY
    return _tensor(norm.weight), _tensor(getattr(norm, "bias", None))


def _mlp_in(layer: nn.Module) -> nn.Module:
    """The MLP's first linear: gate|up (``w13``) or a plain MLP's ``w1``."""
    ff = layer.feed_forward
    return ff.w13 if ff.gated else ff.w1


def _plan_inputs(model: Transformer) -> tuple[list[int], list[float], list[Tensor]]:
    """DecodePlan's (meta, floats, tensors), by the field names of ``defs.PLAN_META`` / ``PLAN_FLOATS`` /
    ``LAYER`` / ``FINAL`` (``defs.PlanMismatch`` if they and this function disagree)."""
    cfg = model.config
    meta = dict(n_layer=cfg.n_layer, dim=cfg.dim, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
                head_dim=cfg.head_dim, hidden=cfg.intermediate_size, norm=defs.NORMS.index(cfg.norm),
                activation=defs.ACTIVATION.index(cfg.activation), gated=int(cfg.mlp_gated),
                parallel=int(cfg.parallel_block), shared_norm=int(cfg.parallel_block and cfg.shared_block_norm),
                position=defs.POSITION.index(cfg.position))
    floats = dict(norm_eps=cfg.norm_eps, attn_scale=model.layers[0].attention.scale, clip_qkv=cfg.clip_qkv or 0.0)
    layers = []
    for i, layer in enumerate(model.layers):
        att, ff = layer.attention, layer.feed_forward
        attn_norm, attn_norm_bias = _norm(layer.attention_norm)
        ffn_norm, ffn_norm_bias = _norm(getattr(layer, "ffn_norm", None))
        layers.append(dict(
            window=cfg.layer_window(i) or 0, local=int(cfg.is_local(i)),
            attn_norm=attn_norm, attn_norm_bias=attn_norm_bias, wqkv=_linear_entry(att.wqkv),
            q_norm=_norm(getattr(att, "q_norm", None))[0], k_norm=_norm(getattr(att, "k_norm", None))[0],
            wo=_linear_entry(att.wo), post_attn_norm=_norm(getattr(layer, "post_attention_norm", None))[0],
            ffn_norm=ffn_norm, ffn_norm_bias=ffn_norm_bias, w13=_linear_entry(_mlp_in(layer)),
            w2=_linear_entry(ff.w2), post_ffn_norm=_norm(getattr(layer, "post_ffn_norm", None))[0],
            k_cache=att.kv_cache.k_cache, v_cache=att.kv_cache.v_cache))
    norm, norm_bias = _norm(model.norm)
    rope = cfg.position == "rope"
    local = rope and cfg.sliding_layers is not None
    final = dict(norm=norm, norm_bias=norm_bias, head=_linear_entry(model.output),
                 rope_cos=model.rope_cos if rope else _EMPTY, rope_sin=model.rope_sin if rope else _EMPTY,
                 rope_cos_local=model.rope_cos_local if local else _EMPTY,
                 rope_sin_local=model.rope_sin_local if local else _EMPTY, alibi=_tensor(model.alibi))
    return defs.plan_lists(meta, floats, layers, final)


def _linears(model: Transformer) -> list[nn.Module]:
    layers = [(layer.attention.wqkv, layer.attention.wo, _mlp_in(layer), layer.feed_forward.w2)
              for layer in model.layers]
    return [m for group in layers for m in group] + [model.output]


def _watched(model: Transformer) -> list[nn.Module]:
    """Modules whose replacement makes a plan stale (a quantization pass swaps all linears together)."""
    first, last = model.layers[0], model.layers[-1]
    return [first.attention.wqkv, first.feed_forward.w2, last.attention.wo, _mlp_in(last), model.output]


class FusedDecoder:
    """One decode step for rows in consecutive KV slots: ``step(tokens [B], positions [B], first_slot)``
    returns logits [B, V]. Holds references to the model's weights and KV cache (no copies)."""

    def __init__(self, model: Transformer) -> None:
        reason = _precondition(model)
        if reason is not None:
            raise ValueError(f"fused decode unavailable: {reason}")
        try:
            _plan_inputs(model)  # every linear qualifies: only then re-lay the int4 ones
            if not envs.QUANTCHAT_NO_Q8:
                for m in _linears(model):
                    if isinstance(m, QuantizedLinear):
                        m.interleave_rows_()
            meta, floats, tensors = _plan_inputs(model)
        except ValueError as e:
            raise ValueError(f"fused decode unavailable: {e}") from None
        self.model = model
        self.cache = model.layers[0].attention.kv_cache.k_cache
        self.modules = _watched(model)
        self.plan = cpu.decode_plan_class()(meta, floats, tensors)

    @classmethod
    def build(cls, model: nn.Module) -> "FusedDecoder | None":
        """A decoder for ``model``, or None when it does not qualify (see ``unsupported_reason``)."""
        try:
            return cls(model)  # type: ignore[arg-type]
        except ValueError:
            return None

    def matches(self, model: nn.Module) -> bool:
        """Still built on this model's current KV cache (``setup_caches`` reallocates it) and layers
        (quantizing swaps them)."""
        return (model is self.model and model.layers[0].attention.kv_cache.k_cache is self.cache
                and all(a is b for a, b in zip(_watched(model), self.modules)))

    def step(self, tokens: Tensor, positions: Tensor, first_slot: int = 0) -> Tensor:
        x = self.model.embed(tokens[:, None], positions[:, None])[:, 0]  # embedding scale, learned positions
        return soft_cap(self.plan.run(x, positions, first_slot), self.model.config.final_softcap)
