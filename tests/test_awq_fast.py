"""The fast AWQ/GPTQ paths against their plain references (gpt-fast style: the reference stays next to the
fast code): the fast scale search picks scales no worse than the reference grid search, the Gram-matrix
clip error picks the reference's clips, the vectorized GPTQ group parameters equal the per-group ones, and
the early-stopping input capture sees the inputs a full block forward does."""

from __future__ import annotations

import copy

import pytest
import torch

from quantchat.loading.hf_loader import load_model
from quantchat.quant import awq, calibration, gptq
from tiny_models import make_tiny_llama, with_outliers
from tiny_models import random_tokens as tokens

LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    """A 2-layer tiny LLaMA (full attention) whose input norms have a few x20 channels: activation outliers."""
    path = tmp_path_factory.mktemp("tiny_fast")
    make_tiny_llama(path, n_kv_head=4, seed=11)
    return with_outliers(load_model(path, cpu_layout=False))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def full_loss(forward, linears, inp, s, gs, sym) -> float:
    """The reference's loss of scale s: output MSE over every token of inp."""
    orig = [lin.weight.data.clone() for lin in linears]
    with torch.no_grad():
        ref = forward(inp).float()
        awq._set_fake_quantized_(linears, orig, s, gs, sym)
        loss = float((forward(inp).float() - ref).pow(2).mean())
    for lin, w in zip(linears, orig):
        lin.weight.data.copy_(w)
    return loss


def test_coarse_to_fine_finds_a_unimodal_minimum():
    for n_grid in (10, 20):
        for m in range(n_grid):
            for step in (1, 2, 4, 5):
                calls: list[int] = []

                def loss(i: int) -> float:
                    calls.append(i)
                    return (i - m) ** 2 + 0.1 * i

                assert awq.coarse_to_fine(loss, n_grid, step) == m, (n_grid, m, step)
                assert 0 in calls and len(calls) == len(set(calls))
                if step == 4 and n_grid == 20:
                    assert len(calls) <= 9
    # step 1 is the plain grid: every index, the global minimum even when the loss is not unimodal
    bumpy = [3.0, 1.0, 2.0, 0.5, 4.0]
    assert awq.coarse_to_fine(lambda i: bumpy[i], 5, 1) == 3


@pytest.mark.parametrize("sym,gs", [(True, 32), (False, 64)])
def test_fast_scale_search_no_worse_than_reference(outlier_model, sym, gs):
    """Group by group on the block inputs: the fast search's scale, scored on all tokens as the reference
    scores, is within 2 % of the reference's best (the reference is the grid minimum on all tokens, so the
    fast pick cannot beat it there); with every token and every grid point it is the reference's pick."""
    model = copy.deepcopy(outlier_model)
    calib = tokens(8, 64, seed=1)
    ctx = calibration.block_context(model, 64)
    x = calibration.embed(model, calib)
    layer = model.layers[0]
    groups = awq.scaling_groups(layer, ctx)
    with torch.no_grad():
        feats = awq._capture_inputs(layer, x.clone(), ctx, [g.linears[0] for g in groups], 8)
    assert len(groups) == 4  # wqkv, wo (no GQA), w13, w2
    for g in groups:
        lins = [layer.get_submodule(n) for n in g.linears]
        inp = feats[g.linears[0]]
        s_ref, best_ref, rtn_ref = awq.search_scale(g.forward, lins, inp, gs, sym)
        s_all, best_all, rtn_all = awq.search_scale_fast(g.forward, lins, inp, gs, sym, search_tokens=None, step=1)
        assert torch.equal(s_all, s_ref) and best_all == pytest.approx(best_ref) and rtn_all == pytest.approx(rtn_ref)
        s_c2f, _, _ = awq.search_scale_fast(g.forward, lins, inp, gs, sym, search_tokens=None, step=4)
        s_fast, best_fast, rtn_fast = awq.search_scale_fast(g.forward, lins, inp, gs, sym, search_tokens=256, step=4)
        assert best_fast <= rtn_fast  # alpha = 0 is scored
        c2f, got = (full_loss(g.forward, lins, inp, s, gs, sym) for s in (s_c2f, s_fast))
        print(f"{g.linears[0]} sym={sym} g={gs}: loss RTN {rtn_ref:.3e}, reference {best_ref:.3e}, "
              f"coarse-to-fine {c2f:.3e}, + half the tokens {got:.3e}")
        assert best_ref * (1 - 1e-5) <= c2f <= best_ref * 1.02
        assert best_ref * (1 - 1e-5) <= got <= best_ref * 1.10 and got <= rtn_ref


@pytest.mark.parametrize("sym,gs", [(True, 32), (False, 64)])
def test_fast_awq_block_error_no_worse(outlier_model, sym, gs):
    """Whole ``awq_model``, int4 fake quantization with its scales and clips: the fast searches' block-0 output
    error is within 3 % of the reference's (all tokens scored, grid coarse to fine), within 10 % when the
    scale search scores only half of these 8 x 64 calibration tokens, and well below plain RTN."""
    calib, test_idx = tokens(8, 64, seed=1), tokens(4, 64, seed=2)
    ctx = calibration.block_context(outlier_model, 64)
    with torch.no_grad():
        h0 = calibration.embed(outlier_model, test_idx)
        want = calibration.block_forward(outlier_model.layers[0], h0, ctx)

    def block_error(fast: bool | None, search_tokens: int | None = None) -> float:
        m = copy.deepcopy(outlier_model)
        clips = {} if fast is None else awq.awq_model(m, calib, gs, sym, fast=fast, search_tokens=search_tokens)
        layer = m.layers[0]
        for name in LINEARS:
            lin = layer.get_submodule(name)
            lin.weight.data = awq.fake_quantize_int4(lin.weight.data, gs, sym, clips.get(f"layers.0.{name}"))
        with torch.no_grad():
            return rel(calibration.block_forward(layer, h0, ctx), want)

    e_rtn, e_ref, e_fast, e_half = block_error(None), block_error(False), block_error(True), block_error(True, 256)
    print(f"sym={sym} g={gs}: block-0 rel. output error RTN {e_rtn:.4f}, reference AWQ {e_ref:.4f}, "
          f"fast {e_fast:.4f}, fast on half the tokens {e_half:.4f}")
    assert e_fast <= 1.03 * e_ref and e_half <= 1.10 * e_ref and e_half < 0.85 * e_rtn


@pytest.mark.parametrize("sym", [True, False])
def test_gram_clip_search_matches_reference(sym):
    g = torch.Generator().manual_seed(4)
    k = 96
    x = torch.randn(700, k, generator=g) * (1 + 15 * (torch.rand(k, generator=g) < 0.05))
    w = torch.randn(40, k, generator=g) * 0.05
    w[:, ::11] *= 5
    ref = awq.search_clip(w, x, 32, sym, n_sample_token=512, gram=False)
    fast = awq.search_clip(w, x, 32, sym, n_sample_token=512, gram=True)
    assert fast.shape == ref.shape
    same = (fast == ref).float().mean().item()
    assert same >= 0.98, same  # ties broken by float rounding may differ, nothing else

    def out_err(c):
        wq = awq.fake_quantize_int4(w, 32, sym, c)
        return float(((x @ (wq - w).t()) ** 2).mean())

    assert out_err(fast) <= out_err(ref) * 1.001
    assert out_err(fast) < out_err(None)
    rows = slice(10, 25)  # rows outside get the no-clip value, rows inside the reference's
    part = awq.search_clip(w, x, 32, sym, n_sample_token=512, rows=rows, row_batch=8)
    assert torch.equal(part[rows], fast[rows])
    assert torch.equal(part[:10], awq.search_clip(w, x, 32, sym, rows=slice(0, 0))[:10])


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_group_params_vectorized_equal_per_group(sym):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 256, generator=g) * 0.05
    hdiag = torch.rand(256, generator=g) + 0.1
    for search in (True, False):
        s, z = gptq.group_params(w, sym, hdiag, search, 64)
        assert s.shape == z.shape == (24, 4)
        for j in range(4):
            cols = slice(64 * j, 64 * (j + 1))
            s1, z1 = gptq.group_params(w[:, cols], sym, hdiag[cols], search)
            assert torch.equal(s[:, j], s1) and torch.equal(z[:, j], z1)


def test_feed_linear_inputs_stops_after_the_last_input(outlier_model):
    model = copy.deepcopy(outlier_model)
    layer = model.layers[1]
    ctx = calibration.block_context(model, 32)
    x = torch.randn(5, 32, model.config.dim, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = awq._capture_inputs(layer, x.clone(), ctx, list(LINEARS), 2)
    got: dict[str, list[torch.Tensor]] = {n: [] for n in LINEARS}
    w2_calls: list[int] = []
    h = layer.feed_forward.w2.register_forward_hook(lambda *_: w2_calls.append(1))
    try:
        calibration.feed_linear_inputs(layer, x, ctx, {n: layer.get_submodule(n) for n in LINEARS},
                                       lambda n, t: got[n].append(t.clone()), batch_size=2)
    finally:
        h.remove()
    assert w2_calls == []  # the forward stopped before w2 ran
    for n in LINEARS:
        assert len(got[n]) == 3  # 5 sequences, 2 at a time
        assert torch.allclose(torch.cat(got[n]), want[n], atol=1e-6)
    with pytest.raises(RuntimeError, match="never called"):
        calibration.feed_linear_inputs(layer, x, ctx, {"lm": model.output}, lambda n, t: None)
