"""GPTQ (Frantar et al., 2022): second-order weight rounding, in the int4/int8 formats of ``quant.rtn``.

For a linear with inputs X (calibration tokens) GPTQ minimizes ||X W^T - X Q^T||^2 column by column:
after rounding column j the error is spread over the not-yet-quantized columns through the inverse
Hessian H^-1 (H = 2/n X^T X), using the upper Cholesky factor of H^-1 and lazy block updates, as the
reference implementation (IST-DASLab/gptq ``fasterquant``, AutoGPTQ) does:

* dead inputs (H diagonal 0: the channel is always zero) get H_jj = 1 and a zero weight;
* damping: ``damp * mean(diag H)`` on the diagonal (raised tenfold if H still is not positive definite);
* without ``act_order``, a group's scale/zero point come from the group's weights at the moment the
  quantization reaches its first column (already updated by the errors of earlier columns); blocks
  are a multiple of the group size, so a group never straddles a block (identical to the reference
  for group 128 / block 128; for smaller groups the reference reads weights that miss the current
  block's updates, we read the updated ones);
* with ``act_order`` (columns in order of decreasing H_jj) the groups are "static" (AutoGPTQ's
  ``static_groups``): each group's scale/zero are computed up front from the original weights, so the
  result stays in the plain group layout (no g_idx) and runs on the same packed kernels as RTN.

The output is exactly ``rtn.quantize_int4``'s format: codes uint8 [N, Kp] in 0..15, scales [N, G],
zeros float32 [N, G] (8 when symmetric), K zero-padded to a multiple of the group size (padding
columns are dead inputs, so they quantize to exact zeros).

``gptq_model`` runs the whole decoder block by block on calibration tokens: each block's linears see
inputs computed with the earlier blocks already quantized.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from quantchat.quant import rtn
from quantchat.quant.calibration import Progress, block_context, embed, feed_linear_inputs, limit_tokens, run_block_



# -- Hessian ------------------------------------------------------------------------------------

class HessianAccumulator:
    """Running H = 2/n * sum x x^T over input rows x [..., K] (float32 products summed in float64)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.sum: Tensor | None = None  # allocated on the inputs' device
        self.n = 0

    def add(self, x: Tensor, chunk_rows: int = 8192) -> None:
        x = x.detach().reshape(-1, self.k)
        if self.sum is None:
            self.sum = torch.zeros(self.k, self.k, dtype=torch.float64, device=x.device)
        for i in range(0, x.shape[0], chunk_rows):
            xc = x[i:i + chunk_rows].float()
            self.sum += (xc.t() @ xc).double()
        self.n += x.shape[0]

    def result(self) -> Tensor:
        if self.sum is None or self.n == 0:
            raise ValueError("no inputs were accumulated")
        return (self.sum * (2.0 / self.n)).float()


def hessian_from_inputs(x: Tensor) -> Tensor:
    """H = 2/n X^T X [K, K] (float32) for inputs x [..., K] (n = number of rows)."""
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.result()


# -- the GPTQ solver ----------------------------------------------------------------------------

def _prepare(w: Tensor, H: Tensor, k_padded: int, act_order: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Padded float32 weight with dead columns zeroed, the fixed-up Hessian (float64), and the permutation."""
    N, K = w.shape
    if H.shape != (K, K):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight {tuple(w.shape)}")
    W = rtn.pad_columns(w.detach().float(), k_padded).clone()
    Hp = torch.zeros(k_padded, k_padded, dtype=torch.float64, device=W.device)
    Hp[:K, :K] = H.detach().to(W.device, torch.float64)
    dead = Hp.diagonal() == 0
    Hp[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(Hp.diagonal(), descending=True) if act_order else None
    if perm is not None:
        W, Hp = W[:, perm], Hp[perm][:, perm]
    return W, Hp, perm


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor (float32) of (H + damp * mean(diag H) * I)^-1."""
    K = H.shape[0]
    lam = damp * H.diagonal().mean()
    eye = torch.eye(K, dtype=H.dtype, device=H.device)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            break
        lam = lam * 10 if lam > 0 else H.diagonal().mean() * 1e-6
    else:
        raise ValueError("GPTQ: the Hessian is not positive definite even after damping")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()


ColumnQuantizer = Callable[[int, Tensor, int], tuple[Tensor, Tensor]]


def _gptq_columns(W: Tensor, Hinv: Tensor, block_size: int, quant: ColumnQuantizer) -> Tensor:
    """The GPTQ sweep over the columns of W (updated in place). ``quant(j, W1, i)`` rounds column i of
    the current block W1 (global column j) and returns (dequantized column, codes column).
    Returns the codes [N, K] (float).

    The block is worked on transposed (``W1t`` [B, N]: a column is a contiguous row) and the rank-1 update
    of the block's later columns is one ``addr_``; the lazy batch update of the columns after the block
    is one matmul, as the reference."""
    N, K = W.shape
    codes = torch.zeros_like(W)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1t = W[:, i1:i2].t().contiguous()
        Err1t = torch.empty_like(W1t)
        Q1t = torch.empty_like(W1t)
        Hinv1 = Hinv[i1:i2, i1:i2]
        view = _Columns(W1t)
        for i in range(i2 - i1):
            q, c = quant(i1 + i, view, i)
            Q1t[i] = c
            err = Err1t[i]
            torch.sub(W1t[i], q, out=err).div_(Hinv1[i, i])
            W1t[i:].addr_(Hinv1[i, i:], err, alpha=-1)
        codes[:, i1:i2] = Q1t.t()
        W[:, i2:] -= Err1t.t() @ Hinv[i1:i2, i2:]
    return codes


class _Columns:
    """``W1[:, i]`` / ``W1[:, i:j]`` of a block held transposed (``W1t`` [B, N]), for the column quantizers."""

    def __init__(self, w1t: Tensor) -> None:
        self.t = w1t

    def __getitem__(self, idx: tuple[slice, int | slice]) -> Tensor:
        _, col = idx
        return self.t[col] if isinstance(col, int) else self.t[col].t().contiguous()


def _round_column(w: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """rtn's rounding of one column with per-row scale/zero: (dequantized, codes)."""
    c = torch.div(w, scale).round_().add_(zero).clamp_(qmin, qmax)  # integer zero points (as the reference)
    return (c - zero).mul_(scale), c


CLIP_GRID = torch.linspace(1.0, 0.7, 16).tolist()  # shrink factors tried by the group clipping search


def group_params(wg: Tensor, symmetric: bool, hdiag: Tensor | None, clip_search: bool,
                 group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Scale and zero point for groups of weights wg [N, m * gs] (integer zero points): [N] for one group
    (``group_size`` None: the whole width is one group), [N, m] for m groups of ``group_size``.

    With ``clip_search`` the group's range is shrunk by each factor of ``CLIP_GRID`` and, per row, the one
    with the least rounding error weighted by the Hessian diagonal ``hdiag`` [m * gs] (the inputs' mean
    square: errors on busy inputs cost more) is kept — the "mse" option of the GPTQ reference quantizer,
    made activation-aware as llama.cpp's importance-matrix quantization."""
    one = group_size is None
    gs = wg.shape[1] if one else group_size
    N, k = wg.shape
    G = k // gs
    if not clip_search:
        _, s, z = rtn.quantize_int4(wg, gs, symmetric, integer_zero=True)
        return (s[:, 0], z[:, 0].float()) if one else (s, z.float())
    weight = (hdiag if hdiag is not None else torch.ones(k, device=wg.device)).view(1, G, gs)
    amax = wg.view(N, G, gs).abs().amax(dim=-1)
    best_err = best_s = best_z = None
    for p in CLIP_GRID:
        clip = amax * p if symmetric else torch.full_like(amax, p)
        q, s, z = rtn.quantize_int4(wg, gs, symmetric, clip=clip, integer_zero=True)
        deq = (q.float().view(N, G, gs) - z[..., None]) * s[..., None]
        err = ((deq - wg.view(N, G, gs)) ** 2 * weight).sum(dim=-1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z.float()
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z.float(), best_z)
    return (best_s[:, 0], best_z[:, 0]) if one else (best_s, best_z)


def gptq_quantize(
    w: Tensor, H: Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True, damp: float = 0.01,
    block_size: int = 128, act_order: bool = False, clip_search: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ int4 of w [N, K] with Hessian H [K, K]: (codes uint8 [N, Kp], scales f32 [N, G], zeros f32 [N, G]),
    exactly ``rtn.quantize_int4``'s format (for int8 see ``gptq_quantize_int8``)."""
    if bits != 4:
        raise ValueError(f"gptq_quantize makes int4 codes (bits=4), got bits={bits}; use gptq_quantize_int8")
    N, K = w.shape
    gs = group_size
    Kp = rtn.padded_in_features(K, gs)
    W, Hp, perm = _prepare(w, H, Kp, act_order)
    Hinv = _inverse_cholesky(Hp, damp)
    qmin = 1 if symmetric else 0  # symmetric: code - 8 in [-7, 7]
    hdiag = Hp.diagonal().float()
    scales = torch.zeros(N, Kp // gs, device=W.device)
    zeros = torch.zeros(N, Kp // gs, device=W.device)

    if act_order:  # static groups from the original (dead-zeroed) weights, looked up per permuted column
        Worig = torch.empty_like(W)
        Worig[:, perm] = W
        hd_orig = torch.empty_like(hdiag)
        hd_orig[perm] = hdiag
        scales[:], zeros[:] = group_params(Worig, symmetric, hd_orig, clip_search, gs)  # all groups at once
        s = scales
        col_s = s.repeat_interleave(gs, dim=1)[:, perm].t().contiguous()  # [Kp, N]: column j is a row
        col_z = zeros.repeat_interleave(gs, dim=1)[:, perm].t().contiguous()

        def quant(j: int, W1: Tensor, i: int) -> tuple[Tensor, Tensor]:
            return _round_column(W1[:, i], col_s[j], col_z[j], qmin, 15)
    else:
        block_size = max(gs, block_size // gs * gs)  # groups never straddle a block
        cur: list[Tensor] = []

        def quant(j: int, W1: Tensor, i: int) -> tuple[Tensor, Tensor]:
            if j % gs == 0:  # group params from the current (error-updated) weights of the group
                s, z = group_params(W1[:, i:i + gs], symmetric, hdiag[j:j + gs], clip_search)
                scales[:, j // gs], zeros[:, j // gs] = s, z
                cur[:] = [s, z]
            return _round_column(W1[:, i], cur[0], cur[1], qmin, 15)

    codes = _gptq_columns(W, Hinv, block_size, quant)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.uint8), scales.float(), zeros.float()


def gptq_quantize_int8(
    w: Tensor, H: Tensor, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
) -> tuple[Tensor, Tensor]:
    """GPTQ in ``rtn.quantize_int8``'s format: (codes int8 [N, K], scales f32 [N]); the per-channel
    scales (absmax / 127) are fixed from the original weights."""
    W, Hp, perm = _prepare(w, H, w.shape[1], act_order)
    Hinv = _inverse_cholesky(Hp, damp)
    _, scale = rtn.quantize_int8(W)
    zero = torch.zeros(())

    def quant(j: int, W1: Tensor, i: int) -> tuple[Tensor, Tensor]:
        return _round_column(W1[:, i], scale, zero, -127, 127)

    codes = _gptq_columns(W, Hinv, block_size, quant)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.int8), scale


# -- whole model --------------------------------------------------------------------------------

def _quantize_linear(
    lin: nn.Linear, H: Tensor, bits: int, group_size: int, symmetric: bool, damp: float, block_size: int,
    act_order: bool,
) -> dict[str, Tensor]:
    """GPTQ one linear; its weight becomes the dequantized one; returns the portable codes dict."""
    N, K = lin.weight.shape
    if bits == 8:
        q, s = gptq_quantize_int8(lin.weight, H, damp, block_size, act_order)
        deq = rtn.dequantize_int8(q, s)
        codes = {"qweight": q.cpu(), "scales": s.cpu()}
    else:
        q, s, z = gptq_quantize(lin.weight, H, 4, group_size, symmetric, damp, block_size, act_order)
        codes = {"qweight": rtn.pack_int4(q).cpu(), "scales": s.cpu(), "zeros": z.cpu()}
        deq = rtn.dequantize_codes(codes, K)  # exactly what the kernels use (float16 scales and mins)
    lin.weight.data.copy_(deq.to(lin.weight.dtype))
    return codes


@torch.no_grad()
def gptq_model(
    model: nn.Module, calib: Tensor, group_size: int = 128, symmetric: bool = True, act_order: bool = False,
    progress: Progress = None, *, bits: int = 4, damp: float = 0.01, block_size: int = 128,
    max_tokens: int | None = None, batch_size: int = 8, true_sequential: bool = False,
) -> dict[str, dict[str, Tensor]]:
    """GPTQ every linear of the decoder blocks on calibration tokens ``calib`` [n, T].

    Returns {"layers.{i}.attention.wqkv": {"qweight", "scales", "zeros"}, ...} in
    ``QuantizedLinear.from_codes``'s portable format (int4 packed; int8 without "zeros").
    Blocks run in order: each block's linears get their Hessians from one float forward of the
    block (hooks), are quantized, and the block is run again with its quantized weights to make
    the next block's inputs. ``true_sequential`` re-runs the block before each of wqkv, wo, w13, w2
    so later linears see the quantized earlier ones (AutoGPTQ's default; one forward per linear).
    The model's linear weights are replaced by their dequantized values (in place); the embeddings,
    norms and LM head are left alone. ``max_tokens`` caps the calibration tokens (whole sequences);
    ``progress(done, n_blocks)`` is called before the first block (done 0) and after each block.
    """
    if bits not in (4, 8):
        raise ValueError(f"GPTQ supports 4 or 8 bits, not {bits}")
    calib = limit_tokens(calib, max_tokens)
    ctx = block_context(model, calib.shape[1])
    x = embed(model, calib)
    n_layers = len(model.layers)
    names = model.config.block_linears
    steps = [[n] for n in names] if true_sequential else [list(names)]
    result: dict[str, dict[str, Tensor]] = {}
    if progress:
        progress(0, n_layers)
    for li, layer in enumerate(model.layers):
        for names in steps:
            mods = {n: layer.get_submodule(n) for n in names}
            accs = {n: HessianAccumulator(m.in_features) for n, m in mods.items()}
            feed_linear_inputs(layer, x, ctx, mods, lambda n, inp: accs[n].add(inp), batch_size)
            for n, m in mods.items():
                H = accs.pop(n).result()
                result[f"layers.{li}.{n}"] = _quantize_linear(
                    m, H, bits, group_size, symmetric, damp, block_size, act_order)
        run_block_(layer, x, ctx, batch_size)
        if progress:
            progress(li + 1, n_layers)
    return result
