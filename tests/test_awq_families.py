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

GS = 32
OUTLIER_CHANNELS = [3, 17, 40]


def with_outliers(model):
    """Input norms x20 on a few channels: activation outliers, so the scale search picks real scales."""
    with torch.no_grad():
        for layer in model.layers:
            for name in ("attention_norm", "ffn_norm"):
                if hasattr(layer, name):
                    getattr(layer, name).weight[OUTLIER_CHANNELS] *= 20
    return model


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _calib(seed: int = 6) -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", sorted(CASES))
def test_awq_scaling_preserves_every_block(tmp_path, case):
    build(tmp_path, case)
    model = with_outliers(load_model(tmp_path, cpu_layout=False))
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
