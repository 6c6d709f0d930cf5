"""Quantized checkpoints: save -> load is bit-exact; damaged folders give clear errors naming the file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from quantchat.errors import ModelLoadError, QuantchatError
from quantchat.loading.hf_loader import load_model
from quantchat.quant.checkpoint import QUANT_FILE, load_quantized, save_quantized
from quantchat.quant.linear import QuantizedLinear
from quantchat.quant.quantize import QuantSpec, quantize_model
from tiny_models import make_tiny_llama


def quantized_dir(tmp_path, method: str, tie: bool, shard_bytes: int = 1 << 30, group_size=32):
    src = tmp_path / "src"
    make_tiny_llama(src, tie=tie, n_kv_head=2)
    model = load_model(src, cpu_layout=False)
    spec = QuantSpec.for_method(method, group_size)
    codes = quantize_model(model, spec)
    out = save_quantized(tmp_path / "q", model, spec, codes, src, max_shard_bytes=shard_bytes)
    return src, model, out


@pytest.mark.parametrize("method,tie", [("int8", True), ("int4-sym", False), ("int4-asym", True)])
def test_save_load_bit_exact(tmp_path, method, tie):
    _, model, out = quantized_dir(tmp_path, method, tie, shard_bytes=20_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded
    loaded = load_quantized(out)
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    idx = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 2 * 4 + 1


def test_quantized_close_to_float(tmp_path):
    src, model, _ = quantized_dir(tmp_path, "int8", tie=False)
    ref = load_model(src)
    idx = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        a, b = ref(idx), model(idx)
    assert (a - b).norm() / a.norm() < 0.05


def test_corrupted_shard_named(tmp_path):
    _, _, out = quantized_dir(tmp_path, "int4-sym", tie=True)
    shard = next(out.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=f"{shard.name}.*sha256"):
        load_quantized(out)


def test_missing_shard_named(tmp_path):
    _, _, out = quantized_dir(tmp_path, "int4-sym", tie=True, shard_bytes=20_000)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"{shard.name}.*missing"):
        load_quantized(out)


def test_config_weights_mismatch_named(tmp_path):
    _, _, out = quantized_dir(tmp_path, "int8", tie=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="mismatch"):
        load_quantized(out, verify=False)


def test_unknown_method_named(tmp_path):
    _, _, out = quantized_dir(tmp_path, "int8", tie=True)
    q = json.loads((out / QUANT_FILE).read_text())
    q["method"] = "int3-magic"
    (out / QUANT_FILE).write_text(json.dumps(q))
    with pytest.raises(ModelLoadError, match=f"{QUANT_FILE}.*unknown quantization method"):
        load_quantized(out, verify=False)
    with pytest.raises(QuantchatError, match="unknown quantization method"):
        QuantSpec.for_method("int3-magic")


def test_atomic_save_leaves_nothing_on_failure(tmp_path):
    src = tmp_path / "src"
    make_tiny_llama(src)
    model = load_model(src, cpu_layout=False)
    spec = QuantSpec.for_method("int8")
    codes = quantize_model(model, spec)
    shutil.rmtree(src)  # config.json gone mid-save
    with pytest.raises(FileNotFoundError):
        save_quantized(tmp_path / "q", model, spec, codes, src)
    assert not any(tmp_path.iterdir()) or [p.name for p in tmp_path.iterdir()] == []
