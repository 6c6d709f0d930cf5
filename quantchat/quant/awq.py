"""AWQ (Lin et al., 2023): activation-aware scaling and clipping before round-to-nearest int4.

Follows mit-han-lab/llm-awq (``auto_scale.py``, ``auto_clip.py``), block by block:

1. Scale search. A few input channels of each linear carry most of the activation magnitude; the
   weights that meet them matter most. For each group of linears sharing an input, with per-channel
   mean |x| (``x_mean``), try ``s = x_mean ** alpha`` for alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid},
   normalized ``s / sqrt(max(s) * min(s))``; fake-quantize ``W * s`` with RTN (the target group
   size / symmetry), divide by s, and measure the MSE of the output of the sub-module the linears
   feed, as llm-awq does: the whole attention (wqkv; wo stays float) or the whole MLP (w13; w2 stays
   float), the linear itself for wo and w2. alpha = 0 is plain RTN, so the search never does worse
   than RTN on the calibration tokens. The best s is folded into the model so the float function is
   unchanged: 1/s into ``attention_norm`` (wqkv) and ``ffn_norm`` (w13), into the up
   rows of w13 (w2: silu(gate) * up is linear in up), and into the v rows of wqkv (wo) -- the last
   only when n_head == n_kv_head: with grouped-query attention one v channel feeds several wo
   columns, which would need equal scales (llm-awq applies it only when v_proj and o_proj have
   the same shape, for the same reason).

   Every family (``scaling_groups``, AutoAWQ's per-architecture groups: the op before, the linears
   reading its output, the module whose output the loss is measured on):

   * LayerNorm (GPT-2, MPT, Falcon) as well as RMSNorm: 1/s divides the norm's weight and its bias.
   * Parallel blocks (Falcon): with one shared norm (7B layout) wqkv and w1 read the same normalized
     input, so they get one scale together, searched on attention + MLP output; with two norms (the new
     decoder architecture) attention_norm -> wqkv and ffn_norm -> w1 are separate groups.
   * Plain MLPs (w1 -> GELU -> w2; GPT-2, MPT, Falcon): no linear op comes before w2 to fold a scale
     into, and inserting one (AutoAWQ's ScaledActivation) would add a module to the checkpoint
     format. We take the simpler option: w2 gets no scale, only the clip search (step 2).
   * Gemma 3: attention_norm and ffn_norm are plain RMSNorm weights here (the +1 is applied at load),
     so the LLaMA groups apply; q_norm/k_norm act on wqkv's output, which the scaling leaves unchanged,
     and the sandwich norms act on attention / MLP outputs, likewise unchanged.
   * MPT's ``clip_qkv`` clamps wqkv's output: unchanged by the input scaling, but a per-row scale of
     the v rows would not commute with the clamp, so wo is not scaled there (``folds_v_into_wo``).
2. Clip search (llm-awq ``auto_clip_layer``): per output row and group, shrink the quantization
   range by 1 - i/n_grid for i < max_shrink * n_grid (1.0, 0.95, ..., 0.55 with the defaults) and
   keep the factor minimizing the group's partial output error sum_k x_k w_k on a subsample of the
   (scaled) calibration inputs. Symmetric: the max magnitude shrinks. Asymmetric: the min and the max
   shrink by separate factors, found by coordinate descent (max, then min, twice) -- llm-awq clamps
   both ends at one magnitude instead. The error is scored on 2048 sampled tokens (llm-awq: 512). On the
   default model (int4-asym g128, 16 x 512 calibration tokens, perplexity on 16k held-out tokens, float
   14.49): one common factor 16.75, llm-awq's clamp 16.50, separate factors 16.32; 2048 scored tokens
   16.19, as a grid of 0.025 steps (``clip_grid`` 40). Full benchmark (32 x 512 calibration, 32,704
   held-out tokens, float 14.606): 512 scored tokens 16.384, finer grid 16.454, 2048 scored tokens
   16.212 (+11.0 %). q and k rows are not clipped (their errors pass through q k^T, which
   the per-group output error does not see -- llm-awq skips q/k); the v rows of wqkv are.

Speed (``fast``, the default; the reference searches stay beside it, ``fast=False``): the scale
candidates are scored on ``search_tokens`` (4096) of the calibration tokens, whole windows evenly spread
(mean |x| still over all of them), and the grid is walked coarse to fine (``coarse_to_fine``: every 4th
point, then the best's neighbours at 2 and 1; 9 of 20 forwards); the clip error comes from each group's
Gram matrix (``search_clip(gram=True)``: the reference's value, 16x fewer operations at group 128). On the
default model one block costs 7.4 s of CPU instead of 54 s (one thread, side by side).

``awq_model`` edits the float weights in place (step 1) and returns the clip tensors of step 2;
quantize each linear afterwards with ``rtn.quantize_int4(w, group_size, symmetric, clip=clips[name])``
(or ``QuantizedLinear.from_float(..., clip=...)``), the same group size and symmetry as the search.
Clip semantics are rtn's: symmetric -> the max magnitude per group [N, G] (already shrunk), asymmetric ->
the shrink factors of the group's min and max [N, G, 2].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantchat.quant import rtn
from quantchat.quant.calibration import (
    Context, Progress, attention_forward, block_context, block_forward, chunks, embed, limit_tokens,
)


def fake_quantize_int4(w: Tensor, group_size: int, symmetric: bool, clip: Tensor | None = None) -> Tensor:
    """RTN int4 quantize-dequantize of w [N, K] (float32, same shape)."""
    q, s, z = rtn.quantize_int4(w, group_size, symmetric, clip)
    return rtn.dequantize_int4(q, s, z, w.shape[1])


def act_scale(x: Tensor) -> Tensor:
    """Per input channel mean |x| over all tokens of x [..., K] (float32 [K])."""
    return x.detach().reshape(-1, x.shape[-1]).float().abs().mean(0)


# -- scale search -------------------------------------------------------------------------------

def grid_scale(x_mean: Tensor, alpha: float) -> Tensor:
    """The AWQ candidate ``s = x_mean ** alpha``, normalized by ``sqrt(max(s) * min(s))``."""
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _set_fake_quantized_(linears: list[nn.Linear], orig: list[Tensor], s: Tensor, group_size: int,
                         symmetric: bool) -> None:
    """Each linear's weight becomes ``Q(W * s) / s`` (RTN int4 of the scaled weight, scale divided out)."""
    for lin, w in zip(linears, orig):
        lin.weight.data.copy_(fake_quantize_int4(w.float() * s, group_size, symmetric) / s)


@torch.no_grad()
def search_scale(
    forward: Callable[[Tensor], Tensor], linears: list[nn.Linear], inp: Tensor, group_size: int,
    symmetric: bool, n_grid: int = 20, batch_size: int = 8,
) -> tuple[Tensor, float, float]:
    """Best AWQ input-channel scale s [K] for ``linears`` (all fed ``inp`` [n, T, K]); ``forward`` maps a
    chunk of ``inp`` to the output the loss is measured on. Returns (s, best MSE, MSE at alpha = 0
    i.e. plain RTN). The linears' weights are restored before returning.

    The reference search (llm-awq's): every grid point, all tokens. ``search_scale_fast`` is the default."""
    x_mean = act_scale(inp)
    orig = [lin.weight.data.clone() for lin in linears]
    sl_list = list(chunks(inp.shape[0], batch_size))
    ref = [forward(inp[sl]).float() for sl in sl_list]
    numel = sum(r.numel() for r in ref)
    best, best_s, rtn_loss = float("inf"), torch.ones_like(x_mean), float("nan")
    try:
        for r in range(n_grid):
            s = grid_scale(x_mean, r / n_grid)
            _set_fake_quantized_(linears, orig, s, group_size, symmetric)
            loss = sum(float((forward(inp[sl]).float() - o).pow(2).sum()) for sl, o in zip(sl_list, ref)) / numel
            if r == 0:
                rtn_loss = loss
            if loss < best:
                best, best_s = loss, s.clone()
    finally:
        for lin, w in zip(linears, orig):
            lin.weight.data.copy_(w)
    return best_s, best, rtn_loss


def search_rows(n: int, seq_len: int, search_tokens: int | None) -> Tensor:
    """Indices of the calibration sequences the fast scale search scores: ``search_tokens // seq_len``
    of the ``n`` (at least one), evenly spread; all of them when ``search_tokens`` is None."""
    k = n if search_tokens is None else max(1, min(n, search_tokens // seq_len))
    return torch.linspace(0, n - 1, k).round().long().unique()


def coarse_to_fine(loss: Callable[[int], float], n_grid: int, step: int) -> int:
    """The grid index in 0..n_grid-1 with the least ``loss`` found by scoring every ``step``-th index,
    then the neighbours of the best so far at half the distance (rounded up), down to distance 1
    (``step`` 1: every index). Finds the grid minimum when the loss is unimodal in the index; index 0 is always scored."""
    seen: dict[int, float] = {}

    def score(i: int) -> float:
        if i not in seen:
            seen[i] = loss(i)
        return seen[i]

    step = max(1, step)
    best = min(range(0, n_grid, step), key=score)
    d = step
    while d > 1:
        d = (d + 1) // 2  # rounded up: the distances reached add up to at least step - 1
        best = min((i for i in (best - d, best, best + d) if 0 <= i < n_grid), key=score)
    return best


@torch.no_grad()
def search_scale_fast(
    forward: Callable[[Tensor], Tensor], linears: list[nn.Linear], inp: Tensor, group_size: int,
    symmetric: bool, n_grid: int = 20, batch_size: int = 8, search_tokens: int | None = 4096, step: int = 4,
) -> tuple[Tensor, float, float]:
    """``search_scale`` made cheap: the same candidates ``s = x_mean ** alpha`` with x_mean over all of
    ``inp``, but each scored on the ``search_tokens`` tokens of ``search_rows`` (whole sequences: the
    attention needs them), and the grid walked ``coarse_to_fine`` (9 of 20 points with step 4) instead of
    point by point. Same return values (the losses are on the scored tokens); weights restored."""
    x_mean = act_scale(inp)
    sub = inp[search_rows(inp.shape[0], inp.shape[1], search_tokens)]
    orig = [lin.weight.data.clone() for lin in linears]
    sl_list = list(chunks(sub.shape[0], batch_size))
    ref = [forward(sub[sl]).float() for sl in sl_list]
    numel = sum(r.numel() for r in ref)
    losses: dict[int, float] = {}

    def loss(r: int) -> float:
        _set_fake_quantized_(linears, orig, grid_scale(x_mean, r / n_grid), group_size, symmetric)
        losses[r] = sum(float((forward(sub[sl]).float() - o).pow(2).sum()) for sl, o in zip(sl_list, ref)) / numel
        return losses[r]

    try:
        best = coarse_to_fine(loss, n_grid, step)
    finally:
        for lin, w in zip(linears, orig):
            lin.weight.data.copy_(w)
    return grid_scale(x_mean, best / n_grid), losses[best], losses[0]


def _scale_columns_(lin: nn.Linear, s: Tensor) -> None:
    lin.weight.data.mul_(s.to(lin.weight.dtype)[None, :])


def _scale_rows_(lin: nn.Linear, rows: slice, inv: Tensor) -> None:
    """Divide output rows ``rows`` of lin (and their bias) by ``inv``."""
    lin.weight.data[rows].div_(inv.to(lin.weight.dtype)[:, None])
    if lin.bias is not None:
        lin.bias.data[rows].div_(inv.to(lin.bias.dtype))


# -- clip search --------------------------------------------------------------------------------

@torch.no_grad()
def search_clip(
    w: Tensor, x: Tensor, group_size: int, symmetric: bool, n_grid: int = 20, max_shrink: float = 0.5,
    n_sample_token: int = 512, rows: slice | None = None, row_batch: int = 512, rounds: int = 2,
    gram: bool = True,
) -> Tensor:
    """Per-group clip for w [N, K] given inputs x [..., K], in ``rtn.quantize_int4``'s ``clip`` semantics:
    symmetric [N, G] (max magnitudes), asymmetric [N, G, 2] (min and max shrink factors, ``rounds`` of
    coordinate descent). Rows outside ``rows`` (default: all) get the no-clip value.

    The error of a candidate is the mean over the sampled tokens of (sum_k x_k dw_k)^2 per row and group,
    dw = Q(w) - w. ``gram`` (default) computes it as dw^T H_g dw / t with each group's Gram matrix
    H_g = X_g^T X_g [gs, gs] formed once: N K gs operations per candidate instead of t N K (16x fewer for
    2048 tokens at group 128), the same value up to float rounding; ``gram=False`` is the reference
    (llm-awq's), the partial outputs themselves."""
    N, K = w.shape
    gs = group_size
    Kp = rtn.padded_in_features(K, gs)
    G = Kp // gs
    wf = rtn.pad_columns(w.detach().float(), Kp)
    xs = x.detach().reshape(-1, K).float()
    xs = rtn.pad_columns(xs[:: max(1, xs.shape[0] // n_sample_token)], Kp).view(-1, G, gs)  # [t, G, gs]
    absmax = wf.view(N, G, gs).abs().amax(-1)
    clip = absmax.clone() if symmetric else torch.ones(N, G, 2, device=wf.device)
    factors = [1 - i / n_grid for i in range(int(max_shrink * n_grid))]
    todo = range(N)[rows] if rows is not None else range(N)
    for r0 in range(todo.start, todo.stop, row_batch):
        r1 = min(todo.stop, r0 + row_batch)
        wb = wf[r0:r1]
        if gram:
            if r0 == todo.start:
                hg = torch.bmm(xs.transpose(0, 1).transpose(1, 2), xs.transpose(0, 1)) / xs.shape[0]  # [G, gs, gs]

            def error(c: Tensor) -> Tensor:
                dw = (fake_quantize_int4(wb, gs, symmetric, c) - wb).view(-1, G, gs).transpose(0, 1)  # [G, n, gs]
                return (torch.bmm(dw, hg) * dw).sum(-1).t()
        else:
            ref = torch.einsum("tgk,ngk->ntg", xs, wb.view(-1, G, gs))

            def error(c: Tensor) -> Tensor:
                wq = fake_quantize_int4(wb, gs, symmetric, c)
                return (torch.einsum("tgk,ngk->ntg", xs, wq.view(-1, G, gs)) - ref).pow(2).mean(1)

        best = clip[r0:r1].clone()
        best_err = error(best)
        if symmetric:
            candidates = [absmax[r0:r1] * f for f in factors[1:]]
        else:  # one end at a time, the other kept at its best so far
            candidates = [(side, f) for _ in range(rounds) for side in (1, 0) for f in factors]
        for cand in candidates:
            if symmetric:
                c = cand
            else:
                side, f = cand
                c = best.clone()
                c[..., side] = f
            err = error(c)
            better = err < best_err
            best_err[better], best[better] = err[better], c[better]
        clip[r0:r1] = best
    return clip


# -- whole model --------------------------------------------------------------------------------

def _capture_inputs(layer: nn.Module, x: Tensor, ctx: Context, names: list[str], batch_size: int) -> dict[str, Tensor]:
    """Run the block on x [n, T, dim] (x becomes the block output, in place) and keep the inputs of
    the named linears ([n, T, in_features] each)."""
    n, T = x.shape[:2]
    mods = {nm: layer.get_submodule(nm) for nm in names}
    feats = {nm: torch.empty(n, T, m.in_features, dtype=x.dtype, device=x.device) for nm, m in mods.items()}
    cur: list[slice] = []

    def hook(nm: str):
        def keep(_m: nn.Module, inp: tuple[Tensor, ...], _out: Tensor) -> None:
            feats[nm][cur[0]] = inp[0]
        return keep

    hooks = [m.register_forward_hook(hook(nm)) for nm, m in mods.items()]
    try:
        for sl in chunks(n, batch_size):
            cur[:] = [sl]
            x[sl] = block_forward(layer, x[sl], ctx)
    finally:
        for h in hooks:
            h.remove()
    return feats


def folds_v_into_wo(attention: nn.Module) -> bool:
    """Whether AWQ folds wo's input scale into the v rows of wqkv: only without grouped-query attention
    (one v channel would feed several wo columns) and without MPT's ``clip_qkv`` (the clamp of wqkv's
    output does not commute with a per-row scale)."""
    return attention.n_head == attention.n_kv_head and attention.config.clip_qkv is None


def _fold_norm_(norm: nn.Module, s: Tensor) -> None:
    """Divide a norm's output by s: its weight (RMSNorm, LayerNorm) and its bias (LayerNorm)."""
    norm.weight.data.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.data.div_(s.to(norm.bias.dtype))


@dataclass
class ScaleGroup:
    """One AWQ scaling group (llm-awq / AutoAWQ ``prev_op``, ``layers``, ``inp``/``module2inspect``):
    ``linears`` (names in the block) all read the same input, captured under ``linears[0]``; the loss of
    the scale search is measured on ``forward(input)``; ``fold(s)`` divides the output of the op before
    (a norm, or rows of the linear before) by s so that the float block is unchanged."""

    linears: list[str]
    forward: Callable[[Tensor], Tensor]
    fold: Callable[[Tensor], None]


def scaling_groups(layer: nn.Module, ctx: Context) -> list[ScaleGroup]:
    """The scaling groups of one ``TransformerBlock``, in data-flow order, for every family layout."""
    c = layer.config
    att, ff = layer.attention, layer.feed_forward
    mlp_in = "feed_forward.w13" if c.mlp_gated else "feed_forward.w1"
    groups: list[ScaleGroup] = []
    shared = c.parallel_block and c.shared_block_norm
    if shared:  # Falcon 7B: one norm feeds both attention and MLP -> one scale for [wqkv, w1]
        groups.append(ScaleGroup(["attention.wqkv", mlp_in], lambda t: attention_forward(att, t, ctx) + ff(t),
                                 lambda s: _fold_norm_(layer.attention_norm, s)))
    else:
        groups.append(ScaleGroup(["attention.wqkv"], lambda t: attention_forward(att, t, ctx),
                                 lambda s: _fold_norm_(layer.attention_norm, s)))
    if folds_v_into_wo(att):
        v_rows = slice(att.q_size + att.kv_size, att.q_size + 2 * att.kv_size)
        groups.append(ScaleGroup(["attention.wo"], att.wo, lambda s: _scale_rows_(att.wqkv, v_rows, s)))
    if not shared:
        groups.append(ScaleGroup([mlp_in], ff, lambda s: _fold_norm_(layer.ffn_norm, s)))
    if c.mlp_gated:  # act(gate) * up is linear in up
        up = slice(ff.hidden, 2 * ff.hidden)
        groups.append(ScaleGroup(["feed_forward.w2"], ff.w2, lambda s: _scale_rows_(ff.w13, up, s)))
    # plain MLP (w1 -> act -> w2): no linear op before w2 to fold into; w2 gets the clip search only
    return groups


@torch.no_grad()
def awq_model(
    model: nn.Module, calib: Tensor, group_size: int = 128, symmetric: bool = True, n_grid: int = 20,
    progress: Progress = None, *, max_tokens: int | None = None, batch_size: int = 8, clip: bool = True,
    max_shrink: float = 0.5, n_sample_token: int = 2048, stats: dict[str, tuple[float, float]] | None = None,
    clip_grid: int = 20, fast: bool = True, search_tokens: int | None = 4096, grid_step: int = 4,
) -> dict[str, Tensor]:
    """AWQ scale search (folded into the model's float weights, in place) and clip search on ``calib`` [n, T].

    Returns {"layers.{i}.attention.wqkv": clip, ...} ([N, G] symmetric, [N, G, 2] asymmetric) for every
    block linear (``config.block_linears``; empty if not ``clip``), to pass to ``rtn.quantize_int4`` with
    the same group size and symmetry. Block inputs are the float outputs of the previous blocks (as llm-awq).
    ``progress(done, n_blocks)`` is called before the first block (done 0) and after each block;
    ``stats``, if given, receives (best MSE, plain-RTN MSE) of each scale search (keyed by the group's
    first linear); ``max_tokens`` caps the calibration tokens; ``n_grid`` steps the scale search,
    ``clip_grid`` the clip search. Memory: the inputs of the four linears of one block are kept (for
    128 x 512 tokens of a dim-576 model, about 0.9 GB in float32).

    ``fast`` (default): ``search_scale_fast`` (the scale losses on ``search_tokens`` tokens, the grid
    walked coarse to fine from every ``grid_step``-th point) and the Gram-matrix clip error;
    ``fast=False`` runs the reference searches (every grid point on every token, partial outputs).
    """
    calib = limit_tokens(calib, max_tokens)
    ctx = block_context(model, calib.shape[1])
    x = embed(model, calib)
    n_layers = len(model.layers)
    clips: dict[str, Tensor] = {}
    names = list(model.config.block_linears)
    if progress:
        progress(0, n_layers)
    for li, layer in enumerate(model.layers):
        groups = scaling_groups(layer, ctx)
        # a group's linears share one input: capture it once
        feats = _capture_inputs(layer, x, ctx, [g.linears[0] for g in groups]
                                + [n for n in names if not any(n in g.linears for g in groups)], batch_size)
        for g in groups:
            for nm in g.linears[1:]:
                feats[nm] = feats[g.linears[0]]
        for g in groups:
            key = g.linears[0]
            lins = [layer.get_submodule(nm) for nm in g.linears]
            if fast:
                s, best, base = search_scale_fast(g.forward, lins, feats[key], group_size, symmetric, n_grid,
                                                  batch_size, search_tokens, grid_step)
            else:
                s, best, base = search_scale(g.forward, lins, feats[key], group_size, symmetric, n_grid, batch_size)
            if stats is not None:
                stats[f"layers.{li}.{key}"] = (best, base)
            feats[key].div_(s.to(feats[key].dtype))  # the linears' input after folding
            for lin in lins:
                _scale_columns_(lin, s)
            g.fold(s)
        if clip:
            att = layer.attention
            v_rows = slice(att.q_size + att.kv_size, att.q_size + 2 * att.kv_size)
            for key in names:
                rows = v_rows if key == "attention.wqkv" else None
                clips[f"layers.{li}.{key}"] = search_clip(
                    layer.get_submodule(key).weight, feats[key], group_size, symmetric, clip_grid, max_shrink,
                    n_sample_token, rows, gram=fast)
        feats.clear()  # free this block's inputs before the next block's
        if progress:
            progress(li + 1, n_layers)
    return clips
