"""Calibration windows, GPTQ and AWQ: formats, error reductions against RTN, float invariance of AWQ scaling."""

from __future__ import annotations

import copy

import pytest
import torch

from quantchat.errors import QuantchatError
from quantchat.loading.hf_loader import load_model
from quantchat.quant import awq, calibration, gptq, rtn
from quantchat.quant.linear import QuantizedLinear
from tiny_models import make_tiny_llama, with_outliers
from tiny_models import random_tokens as tokens

LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


pytestmark = pytest.mark.usefixtures("one_thread")


class ByteTokenizer:
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return list(text.encode("utf-8"))


# -- calibration --------------------------------------------------------------------------------

def test_builtin_corpus_is_deterministic_text():
    text = calibration.builtin_corpus()
    assert len(text) > 100_000 and text == calibration.builtin_corpus()


def test_calibration_windows_deterministic_and_in_range():
    tok = ByteTokenizer()
    text = "".join(f"line {i}: the quick brown fox {i * 7 % 13}\n" for i in range(300))
    stream = bytes(tok.encode(text))
    a = calibration.calibration_batches(tok, 6, 50, text=text, seed=1)
    b = calibration.calibration_batches(tok, 6, 50, text=text, seed=1)
    c = calibration.calibration_batches(tok, 6, 50, text=text, seed=2)
    assert a.shape == (6, 50) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < 256
    for row in a:  # each window is a contiguous piece of the token stream
        assert bytes(row.tolist()) in stream
    cons = calibration.calibration_batches(tok, 3, 40, text=text, consecutive=True)
    assert cons.flatten().tolist() == list(stream[:120])
    with pytest.raises(QuantchatError, match="too short"):
        calibration.calibration_batches(tok, 2, 10_000, text=text)
    with pytest.raises(QuantchatError, match="too short"):
        calibration.calibration_batches(tok, 1000, 50, text=text, consecutive=True)
    default = calibration.calibration_batches(tok, 2, 64)  # the built-in corpus
    assert default.shape == (2, 64) and torch.equal(default, calibration.calibration_batches(tok, 2, 64))
    # ... but never the part `quantchat eval ppl` scores by default
    corpus = tok.encode(calibration.builtin_corpus())
    held_out = bytes(corpus[calibration.EVAL_TOKENS:])
    first = calibration.calibration_batches(tok, 2, 64, consecutive=True)
    assert first.flatten().tolist() == corpus[calibration.EVAL_TOKENS:calibration.EVAL_TOKENS + 128]
    for row in calibration.calibration_batches(tok, 20, 64):
        assert bytes(row.tolist()) in held_out


# -- GPTQ on one layer --------------------------------------------------------------------------

def correlated_inputs(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration and held-out inputs [n, k] from one distribution: mixed channels, uneven scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    chan = torch.exp(torch.randn(k, generator=g))

    def draw(m: int) -> torch.Tensor:
        return (torch.randn(m, k, generator=g) @ mix + 0.3 * torch.randn(m, k, generator=g)) * chan

    return draw(n), draw(n // 2)


def output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    ref = x @ w.t()
    return float((ref - x @ wq.t()).norm() / ref.norm())


def check_int4_format(q, s, z, n, k, gs, sym):
    kp = rtn.padded_in_features(k, gs)
    assert q.shape == (n, kp) and q.dtype == torch.uint8 and int(q.max()) <= 15
    assert s.shape == (n, kp // gs) and s.dtype == torch.float32 and bool((s > 0).all())
    assert z.shape == (n, kp // gs) and z.dtype == torch.float32 and bool((z == z.round()).all()) and int(z.max()) <= 15
    if sym:
        assert bool((z == 8).all()) and int(q.min()) >= 1
    if kp > k:  # padding columns are exact zeros
        assert bool((rtn.dequantize_int4(q, s, z)[:, k:] == 0).all())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_with_identity_hessian_is_rtn(sym, act_order):
    """Uncorrelated unit inputs: nothing to compensate, GPTQ's codes are RTN's exactly."""
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(0))
    q, s, z = gptq.gptq_quantize(w, torch.eye(96), 4, 64, sym, act_order=act_order, clip_search=False)
    rq, rs, rz = rtn.quantize_int4(w, 64, sym, integer_zero=True)
    check_int4_format(q, s, z, 16, 96, 64, sym)
    assert torch.equal(q, rq) and torch.equal(z, rz) and torch.allclose(s, rs)


def reference_fasterquant(w, H, gs, sym, act_order, blocksize=128, percdamp=0.01):
    """IST-DASLab gptq ``fasterquant`` (static_groups with act_order), transcribed with rtn's int4 grid."""
    W, H = w.clone().float(), H.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    def params(cols):
        _, s, z = rtn.quantize_int4(cols, cols.shape[1], sym, integer_zero=True)
        return s, z.float()

    groups = [params(W[:, i:i + gs]) for i in range(0, W.shape[1], gs)]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1])
    W, H = W[:, perm], H[perm][:, perm]
    Q = torch.zeros_like(W)
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(W.shape[1], dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    scale = zero = None
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if act_order:
                scale, zero = groups[int(perm[i1 + i]) // gs]
            elif (i1 + i) % gs == 0:
                scale, zero = params(W[:, i1 + i:i1 + i + gs])
            code = torch.clamp(torch.round(w[:, None] / scale) + zero, 1 if sym else 0, 15)
            q = (scale * (code - zero)).flatten()
            Q[:, i1 + i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)]


@pytest.mark.parametrize("sym,act_order", [(True, False), (False, False), (True, True), (False, True)])
def test_gptq_matches_reference_implementation(sym, act_order):
    """Group 128 with 128-column blocks: our GPTQ reproduces the reference algorithm's weights."""
    x, _ = correlated_inputs(1024, 256, seed=11)
    x[:, 5] = 0  # a dead input
    H = gptq.hessian_from_inputs(x)
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(12)) * 0.05
    q, s, z = gptq.gptq_quantize(w, H, 4, 128, sym, act_order=act_order, clip_search=False)
    ref = reference_fasterquant(w, H, 128, sym, act_order)
    assert torch.allclose(rtn.dequantize_int4(q, s, z, 256), ref, atol=1e-6)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_clip_search_lowers_output_error(sym):
    """The Hessian-weighted clipping search (default) beats min/max group ranges on held-out inputs."""
    k = 256
    x, x_test = correlated_inputs(1536, k, seed=21)
    H = gptq.hessian_from_inputs(x)
    w = torch.randn(64, k, generator=torch.Generator().manual_seed(22)) * 0.05
    w[:, ::37] *= 4  # a few large weights stretch the groups' ranges
    errs = {}
    for search in (False, True):
        q, s, z = gptq.gptq_quantize(w, H, 4, 128, sym, clip_search=search)
        errs[search] = output_error(w, rtn.dequantize_int4(q, s, z, k), x_test)
    print(f"sym={sym}: min/max {errs[False]:.4f}, clip search {errs[True]:.4f}")
    assert errs[True] < errs[False]


@pytest.mark.parametrize("k,gs", [(192, 32), (192, 128), (256, 128)])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(k, gs, sym):
    n_out = 48
    w = torch.randn(n_out, k, generator=torch.Generator().manual_seed(k + gs)) * 0.05
    x, x_test = correlated_inputs(1536, k, seed=k)
    H = gptq.hessian_from_inputs(x)
    assert torch.allclose(H, 2 / x.shape[0] * x.t() @ x, rtol=1e-4, atol=1e-4)
    w_rtn = rtn.dequantize_int4(*rtn.quantize_int4(w, gs, sym, integer_zero=True), k)
    e_rtn = output_error(w, w_rtn, x_test)
    for act_order in (False, True):
        q, s, z = gptq.gptq_quantize(w, H, 4, gs, sym, act_order=act_order)
        check_int4_format(q, s, z, n_out, k, gs, sym)
        e = output_error(w, rtn.dequantize_int4(q, s, z, k), x_test)
        print(f"k={k} g={gs} sym={sym} act_order={act_order}: held-out rel. output error "
              f"RTN {e_rtn:.4f} GPTQ {e:.4f} ({1 - e / e_rtn:.0%} lower)")
        assert e < 0.92 * e_rtn


def test_gptq_int8_and_dead_columns():
    k = 80
    w = torch.randn(24, k, generator=torch.Generator().manual_seed(3)) * 0.05
    x, x_test = correlated_inputs(1024, k, seed=5)
    x[:, 7] = 0  # a dead input channel
    x_test[:, 7] = 0
    H = gptq.hessian_from_inputs(x)
    q, s = gptq.gptq_quantize_int8(w, H)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and s.shape == (24,)
    assert bool((q[:, 7] == 0).all())
    e_rtn = output_error(w, rtn.dequantize_int8(*rtn.quantize_int8(w)), x_test)
    e = output_error(w, rtn.dequantize_int8(q, s), x_test)
    print(f"int8: RTN {e_rtn:.5f} GPTQ {e:.5f}")
    assert e < e_rtn
    q4, s4, z4 = gptq.gptq_quantize(w, H, 4, 32, False, act_order=True)
    assert bool(torch.isfinite(s4).all()) and bool((q4[:, 7] == z4[:, 0]).all())  # dead column -> exact 0
    with pytest.raises(ValueError):
        gptq.gptq_quantize(w, H, bits=8)


# -- tiny models --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A 2-layer tiny LLaMA with full attention (n_kv_head == n_head) and one with GQA."""
    mha, gqa = tmp_path_factory.mktemp("tiny_mha"), tmp_path_factory.mktemp("tiny_gqa")
    make_tiny_llama(mha, n_kv_head=4, seed=1)
    make_tiny_llama(gqa, n_kv_head=2, seed=2)
    return {"mha": mha, "gqa": gqa}


def load_with_outliers(path) -> torch.nn.Module:
    return with_outliers(load_model(path, cpu_layout=False))


def fake_quantized(model, group_size: int, sym: bool, clips: dict | None = None):
    """A copy with every block linear RTN-quantized (optionally with clips), weights dequantized."""
    model = copy.deepcopy(model)
    for i, layer in enumerate(model.layers):
        for name in LINEARS:
            lin = layer.get_submodule(name)
            clip = None if clips is None else clips[f"layers.{i}.{name}"]
            lin.weight.data = awq.fake_quantize_int4(lin.weight.data, group_size, sym, clip)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_awq_scaling_keeps_float_logits(tiny_dirs, kind):
    model = load_with_outliers(tiny_dirs[kind])
    idx = tokens(2, 48, seed=7)
    with torch.no_grad():
        before = model(idx)
    norm_before = model.layers[0].attention_norm.weight.clone()
    v_before = model.layers[0].attention.wqkv.weight.clone()
    clips = awq.awq_model(model, tokens(4, 48, seed=8), 32, True, clip=False)
    assert clips == {}
    with torch.no_grad():
        after = model(idx)
    assert rel(after, before) < 1e-4
    assert not torch.allclose(model.layers[0].attention_norm.weight, norm_before)  # scales were folded
    att = model.layers[0].attention
    v = slice(att.q_size + att.kv_size, None)
    ratio = att.wqkv.weight[v] / v_before[v]  # s_attn[col] / s_v[row]
    rows_scaled = not torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-3)
    assert rows_scaled == (kind == "mha")  # v -> wo folding only without GQA


@pytest.mark.parametrize("sym,gs", [(True, 32), (False, 64)])
def test_awq_beats_rtn_with_outlier_channels(tiny_dirs, sym, gs):
    model = load_with_outliers(tiny_dirs["mha"])
    calib, test_idx = tokens(8, 64, seed=1), tokens(4, 64, seed=2)
    ctx = calibration.block_context(model, 64)
    with torch.no_grad():
        ref_logits = model(test_idx)
        h0 = calibration.embed(model, test_idx)
        ref_block = calibration.block_forward(model.layers[0], h0, ctx)
        rtn_model = fake_quantized(model, gs, sym)
        e_rtn_block = rel(calibration.block_forward(rtn_model.layers[0], h0, ctx), ref_block)
        e_rtn = rel(rtn_model(test_idx), ref_logits)
    stats: dict = {}
    scaled = copy.deepcopy(model)
    clips = awq.awq_model(scaled, calib, gs, sym, stats=stats)
    assert all(best <= base for best, base in stats.values())  # alpha = 0 (RTN) is in the grid
    with torch.no_grad():
        scale_only = fake_quantized(scaled, gs, sym)
        awq_model = fake_quantized(scaled, gs, sym, clips)
        e_scale_block = rel(calibration.block_forward(scale_only.layers[0], h0, ctx), ref_block)
        e_awq_block = rel(calibration.block_forward(awq_model.layers[0], h0, ctx), ref_block)
        e_awq = rel(awq_model(test_idx), ref_logits)
    print(f"sym={sym} g={gs}: block-0 output rel. error RTN {e_rtn_block:.4f}, AWQ scales {e_scale_block:.4f}, "
          f"AWQ scales+clip {e_awq_block:.4f}; logits RTN {e_rtn:.4f} AWQ {e_awq:.4f}")
    assert e_awq_block < 0.85 * e_rtn_block and e_awq < 0.85 * e_rtn


def test_awq_clip_semantics(tiny_dirs):
    model = load_with_outliers(tiny_dirs["gqa"])
    calib = tokens(4, 32, seed=3)
    for sym in (True, False):
        m = copy.deepcopy(model)
        clips = awq.awq_model(m, calib, 32, sym, n_grid=10)
        assert set(clips) == {f"layers.{i}.{n}" for i in range(2) for n in LINEARS}
        for i, layer in enumerate(m.layers):
            att = layer.attention
            for name in LINEARS:
                w = layer.get_submodule(name).weight
                c = clips[f"layers.{i}.{name}"]
                kp = rtn.padded_in_features(w.shape[1], 32)
                absmax = rtn.pad_columns(w, kp).view(w.shape[0], -1, 32).abs().amax(-1)
                assert c.shape == (absmax.shape if sym else (*absmax.shape, 2))
                lo = 0.5 * absmax if sym else torch.full_like(c, 0.5)
                hi = absmax if sym else torch.ones_like(c)
                assert bool((c >= lo - 1e-6).all() and (c <= hi + 1e-6).all())
                if name == "attention.wqkv":  # q and k rows are not clipped
                    qk = slice(0, att.q_size + att.kv_size)
                    assert torch.equal(c[qk], hi[qk])


# -- end-to-end drivers -------------------------------------------------------------------------

def linear_inputs(k: int) -> torch.Tensor:
    return torch.randn(6, k, generator=torch.Generator().manual_seed(k))


@pytest.mark.parametrize("sym,act_order", [(True, False), (False, True)])
def test_gptq_model_codes_build_quantized_linears(tiny_dirs, sym, act_order):
    model = load_model(tiny_dirs["gqa"], cpu_layout=False)
    float_model = copy.deepcopy(model)
    calib, test_idx = tokens(16, 64, seed=4), tokens(4, 64, seed=5)
    calls: list[tuple[int, int]] = []
    codes = gptq.gptq_model(model, calib, 64, sym, act_order, progress=lambda i, n: calls.append((i, n)),
                            max_tokens=512)
    assert calls == [(0, 2), (1, 2), (2, 2)]
    assert set(codes) == {f"layers.{i}.{n}" for i in range(2) for n in LINEARS}
    for name, c in codes.items():
        flin, qlin = float_model.get_submodule(name), model.get_submodule(name)
        n_out, k = flin.weight.shape
        ql = QuantizedLinear.from_codes(c, k, n_out, 4, 64, sym, flin.bias, "cpu", torch.float32)
        x = linear_inputs(k)
        y = ql(x)
        assert torch.allclose(y, qlin(x), rtol=1e-3, atol=1e-4)  # the model holds the dequantized weight
        assert rel(y, flin(x)) < 0.2
    with torch.no_grad():
        ref = float_model(test_idx)
        e_gptq = rel(model(test_idx), ref)
        e_rtn = rel(fake_quantized(float_model, 64, sym)(test_idx), ref)
    print(f"tiny model sym={sym} act_order={act_order}: logits rel. error RTN {e_rtn:.4f} GPTQ {e_gptq:.4f}")
    assert e_gptq < e_rtn


def test_gptq_model_int8_true_sequential(tiny_dirs):
    model = load_model(tiny_dirs["mha"], cpu_layout=False)
    float_model = copy.deepcopy(model)
    codes = gptq.gptq_model(model, tokens(2, 32, seed=6), bits=8, true_sequential=True)
    for name, c in codes.items():
        flin = float_model.get_submodule(name)
        n_out, k = flin.weight.shape
        ql = QuantizedLinear.from_codes(c, k, n_out, 8, None, True, flin.bias, "cpu", torch.float32)
        x = linear_inputs(k)
        assert rel(ql(x), flin(x)) < 0.02


def test_awq_model_clips_build_quantized_linears(tiny_dirs):
    model = load_with_outliers(tiny_dirs["gqa"])
    calls: list[tuple[int, int]] = []
    clips = awq.awq_model(model, tokens(8, 64, seed=9), 64, True, progress=lambda i, n: calls.append((i, n)),
                          max_tokens=256)
    assert calls == [(0, 2), (1, 2), (2, 2)]
    for name, clip in clips.items():
        lin = model.get_submodule(name)
        ql = QuantizedLinear.from_float(lin.weight, lin.bias, 4, 64, True, clip=clip, keep_codes=True)
        x = linear_inputs(lin.in_features)
        assert torch.allclose(ql(x), ql.reference_forward(x), rtol=1e-3, atol=1e-4)
        assert rel(ql(x), lin(x)) < 0.2



@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibration_progress_lines(tiny_dirs, monkeypatch, capsys, method):
    """No terminal: a line per block with the elapsed time and an ETA for the calibrated stage, nothing for
    packing; QUANTCHAT_PROGRESS=off silences both; stdout stays empty."""
    from quantchat.quant.quantize import QuantSpec, quantize_model, stage_progress

    spec = QuantSpec.for_method(method, 64)
    monkeypatch.delenv("QUANTCHAT_PROGRESS", raising=False)
    quantize_model(load_model(tiny_dirs["gqa"], cpu_layout=False), spec, calib=tokens(2, 32, seed=3),
                   progress=stage_progress())
    out, err = capsys.readouterr()
    lines = err.splitlines()
    stage = "awq search" if method == "awq" else "gptq"
    assert out == "" and len(lines) == 2, err
    for i, line in enumerate(lines, 1):
        assert line.startswith(f"{stage}: {i}/2 block, ") and " s elapsed, ETA " in line, line
    monkeypatch.setenv("QUANTCHAT_PROGRESS", "off")
    quantize_model(load_model(tiny_dirs["gqa"], cpu_layout=False), spec, calib=tokens(2, 32, seed=3),
                   progress=stage_progress())
    assert capsys.readouterr() == ("", "")
