"""AWQ on every model family (tests/test_families.py's tiny random models, compared with transformers):
the scaling is output-preserving block by block before quantization, and the AWQ-quantized model is
no further from transformers than plain int4 round-to-nearest on the same model."""

from __future__ import annotations

import copy

import pytest
import torch

from quantchat.loading.hf_loader import load_model
from quantchat.quant import awq, calibration
from quantchat.quant.quantize import QuantSpec, quantize_model
from test_families import CASES, VOCAB, _ref_logits, build
from tiny_models import with_outliers

GS = 32
OUTLIER_CHANNELS = [3, 17, 40]
pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(seed: int = 6) -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", sorted(CASES))
def test_awq_scaling_preserves_every_block(tmp_path, case):
    build(tmp_path, case)
    model = with_outliers(load_model(tmp_path, cpu_layout=False), OUTLIER_CHANNELS)
    scaled = copy.deepcopy(model)
    stats: dict = {}
    assert awq.awq_model(scaled, _calib(), GS, False, clip=False, stats=stats) == {}
    # each group's search: never worse than RTN (alpha = 0 is in the grid)
    assert stats and all(best <= base for best, base in stats.values())
    cfg = model.config
    n_groups = 1 + (not (cfg.parallel_block and cfg.shared_block_norm)) + cfg.mlp_gated + awq.folds_v_into_wo(
        model.layers[0].attention)
    assert len(stats) == n_groups * cfg.n_layer
    idx = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(8))
    ctx = calibration.block_context(model, idx.shape[1])
    with torch.no_grad():
        x = calibration.embed(model, idx)
        for i, (a, b) in enumerate(zip(model.layers, scaled.layers)):
            want, got = a(x, ctx), b(x, ctx)
            assert rel(got, want) < 1e-4, (case, i, rel(got, want))
            x = want
        assert rel(scaled(idx), model(idx)) < 1e-4
    # the scales were folded: an input norm (weight, and bias for LayerNorm) changed
    for name in ("attention_norm", "ffn_norm"):
        if not hasattr(model.layers[0], name):
            continue
        n0, n1 = model.layers[0].get_submodule(name), scaled.layers[0].get_submodule(name)
        assert not torch.allclose(n0.weight, n1.weight), name
        if getattr(n0, "bias", None) is not None:
            assert not torch.allclose(n0.bias, n1.bias), name


def _logit_error(tmp_path, ref, method: str, seq: torch.Tensor) -> float:
    model = load_model(tmp_path, cpu_layout=False)
    quantize_model(model, QuantSpec.for_method(method, GS, symmetric=False), calib=_calib())
    with torch.no_grad():
        return rel(model(seq), _ref_logits(ref, seq))


@pytest.mark.parametrize("case", sorted(CASES))
def test_awq_no_worse_than_rtn_on_every_family(tmp_path, case):
    """int4 asym g32: AWQ's logits error vs transformers at most RTN's, up to 5 % (random weights have no
    outlier channels, so AWQ gains little; on several cases it gains a lot through the clip search)."""
    ref = build(tmp_path, case)
    seq = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(9))
    e_rtn = _logit_error(tmp_path, ref, "int4-asym", seq)
    e_awq = _logit_error(tmp_path, ref, "awq", seq)
    print(f"{case}: logits rel. error vs transformers, int4-asym g{GS} RTN {e_rtn:.4f}, AWQ {e_awq:.4f}")
    assert e_awq <= 1.05 * e_rtn, (case, e_awq, e_rtn)


@pytest.mark.parametrize("case", ["gpt2", "mpt-6heads-clip", "falcon-7b-layout", "falcon-new-arch", "gemma3"])
def test_report_undoes_the_awq_basis_on_every_family(tmp_path, case):
    """AWQ-scaled weights stored at int8 measure as int8 errors in the report once the folded scales are
    undone (norm ratios, v / up row fits), whatever the block layout (``feed_forward.w1`` rows for plain MLPs)."""
    from quantchat.quant import report as qr
    from quantchat.quant.linear import QuantizedLinear
    from quantchat.quant.quantize import linear_names, set_module

    build(tmp_path, case)
    ref = with_outliers(load_model(tmp_path, cpu_layout=False), OUTLIER_CHANNELS)
    q = copy.deepcopy(ref)
    awq.awq_model(q, _calib(), GS, False, n_grid=10, clip=False)
    for name in linear_names(q) + ["output"]:
        m = q.get_submodule(name)
        set_module(q, name, QuantizedLinear.from_float(m.weight, m.bias, 8, keep_codes=True))
    calib = _calib(10)
    good = qr.build_report(ref, q, calib, model_name=case, method="awq", logits=False)
    assert [e.name for e in good.layers][:4] == [f"layers.0.{n}" for n in ref.config.block_linears]
    # int8 levels (plain int8 here: 3-5e-5 both); AWQ's basis moves weight error onto low-activation
    # columns (weight rel-MSE up to ~3e-4) and lowers the output error (~1-2e-5)
    assert max(e.weight_rel_mse for e in good.layers) < 1e-3
    assert max(e.output_rel_mse for e in good.layers) < 2e-4
    # the scales were real: the norms changed, and (where scales went into rows) the report without the
    # row fits (method int8: norm ratios only) is far off
    assert any(not torch.allclose(a.attention_norm.weight, b.attention_norm.weight, rtol=1e-2)
               for a, b in zip(ref.layers, q.layers))
    if ref.config.mlp_gated or awq.folds_v_into_wo(ref.layers[0].attention):
        naive = qr.build_report(ref, q, calib, model_name=case, method="int8", logits=False)
        assert max(e.weight_rel_mse for e in naive.layers) > 1e-2
    kinds = {e.kind for e in good.layers}
    assert ("w1" in kinds) == (not ref.config.mlp_gated) and ("w13" in kinds) == ref.config.mlp_gated


def test_quantize_awq_then_inspect_a_gpt2_model(tmp_path, capsys):
    """``quantchat quantize --method awq --report`` and ``quantchat inspect`` on a GPT-2 folder: rows for
    w1 (not w13), the histogram of a named w1."""
    import json

    from transformers import GPT2Config, GPT2LMHeadModel

    from test_quant_report import VOCAB as BPE_VOCAB, run_main, write_bpe_tokenizer

    torch.manual_seed(0)
    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=BPE_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                               bos_token_id=261, eos_token_id=262)).save_pretrained(src, safe_serialization=True)
    write_bpe_tokenizer(src)
    out = tmp_path / "q"
    rc, stdout, err = run_main(capsys, "quantize", src, "--method", "awq", "--group-size", "32", "--out", out,
                               "--calib-samples", "2", "--calib-seq-len", "32", "--report", "--report-samples",
                               "2", "--report-seq-len", "32")
    assert rc == 0, err
    assert "layers.1.feed_forward.w1" in stdout and "w13" not in stdout
    data = json.loads((out / "report" / "report.json").read_text())
    assert data["method"] == "awq" and len(data["layers"]) == 2 * 4 + 1  # tied head, no embedding row
    assert "w2 is not scaled" in " ".join(data["notes"])
    rc, stdout, err = run_main(capsys, "inspect", out, "--layer", "0.w1", "--out", tmp_path / "insp",
                               "--samples", "2", "--seq-len", "32")
    assert rc == 0, err
    again = json.loads((tmp_path / "insp" / "report.json").read_text())
    assert again["histogram_layer"] == "layers.0.feed_forward.w1"
    assert [r["output_rel_mse"] for r in again["layers"]] == pytest.approx(
        [r["output_rel_mse"] for r in data["layers"]], rel=1e-4)
