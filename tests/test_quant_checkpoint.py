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


# -- format versions ----------------------------------------------------------------------------

def test_format2_stores_float16_scales_and_mins(tmp_path):
    from quantchat.loading.hf_loader import SafetensorsFile
    from quantchat.quant import checkpoint, rtn

    _, model, out = quantized_dir(tmp_path, "int4-asym", tie=False, group_size=32)
    q = json.loads((out / QUANT_FILE).read_text())
    assert q["version"] == checkpoint.FORMAT_VERSION == 2
    with SafetensorsFile(next(out.glob("model-*.safetensors"))) as sf:
        name = "layers.0.attention.wqkv"
        assert sf.dtype(f"{name}.scales") == sf.dtype(f"{name}.mins") == torch.float16
        assert f"{name}.zeros" not in sf and sf.dtype(f"{name}.qweight") == torch.uint8
        assert sf.dtype("output.scales") == torch.float32  # int8 rows keep float32 scales
        stored = {k: sf.read(f"{name}.{k}") for k in ("qweight", "scales", "mins")}
    ql = model.get_submodule(name)
    assert torch.equal(rtn.dequantize_codes(stored, ql.in_features), ql.dequantized_weight())


def test_format1_checkpoint_still_loads(tmp_path, monkeypatch):
    """Version 1 (float32 scales and zero points) loads into the same float16 resident form."""
    from quantchat.quant import checkpoint

    quantized_dir(tmp_path, "int4-sym", tie=False, group_size=32)  # makes the float source folder
    src = tmp_path / "src"
    spec = QuantSpec.for_method("int4-asym", 32)
    model1 = load_model(src, cpu_layout=False)
    codes = quantize_model(model1, spec)
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 1)
    monkeypatch.setattr(checkpoint, "stored_codes", lambda c: c)  # as version 1 wrote them
    out1 = save_quantized(tmp_path / "q1", model1, spec, codes, src)
    monkeypatch.undo()
    q = json.loads((out1 / QUANT_FILE).read_text())
    assert q["version"] == 1
    weight_map = json.loads((out1 / "model.safetensors.index.json").read_text())["weight_map"]
    assert "layers.0.attention.wqkv.zeros" in weight_map
    loaded = load_quantized(out1)
    sd_a, sd_b = model1.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert loaded.layers[0].attention.wqkv.scales.dtype == torch.float16
    idx = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(model1(idx), loaded(idx))
    # and saved again, it is a version 2 checkpoint of the same weights
    out_again = save_quantized(tmp_path / "q2", model1, spec, codes, src)
    assert json.loads((out_again / QUANT_FILE).read_text())["version"] == 2
    again = load_quantized(out_again)
    assert all(torch.equal(sd_a[k], again.state_dict()[k]) for k in sd_a)
    assert sum(f.stat().st_size for f in out_again.glob("*.safetensors")) < \
        sum(f.stat().st_size for f in out1.glob("*.safetensors"))


def test_newer_format_refused(tmp_path):
    _, _, out = quantized_dir(tmp_path, "int8", tie=True)
    q = json.loads((out / QUANT_FILE).read_text())
    q["version"] = 99
    (out / QUANT_FILE).write_text(json.dumps(q))
    with pytest.raises(ModelLoadError, match="newer"):
        load_quantized(out, verify=False)


# -- the safetensors reader (plain reads, no mmap) ----------------------------------------------

def test_safetensors_reader_matches_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from quantchat.loading.hf_loader import SafetensorsFile

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(37, 11, generator=g), "bf16": torch.randn(5, 64, generator=g).bfloat16(),
        "f16": torch.randn(130, generator=g).half(), "i8": torch.randint(-127, 127, (9, 8), dtype=torch.int8),
        "u8": torch.randint(0, 255, (3, 4, 5), dtype=torch.uint8), "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4), "i64": torch.arange(7),
    }
    f = tmp_path / "t.safetensors"
    save_file(tensors, f, metadata={"format": "pt"})
    with SafetensorsFile(f) as sf, safe_open(f, framework="pt") as ref:
        assert sorted(sf.keys()) == sorted(ref.keys()) and sf.metadata == {"format": "pt"}
        for k in tensors:
            assert torch.equal(sf.read(k), ref.get_tensor(k)), k
            assert sf.read(k).dtype == tensors[k].dtype
        # converted on the way in, chunk by chunk
        assert torch.equal(sf.read("bf16", dtype=torch.float32), tensors["bf16"].float())
        out = torch.empty(11, 37).t()  # a transposed destination
        sf.read("f32", out=out)
        assert torch.equal(out, tensors["f32"])
        with pytest.raises(ModelLoadError, match="shape"):
            sf.read("f32", out=torch.empty(37, 12))


def _corrupt(tmp_path, mutate):
    from safetensors.torch import save_file

    f = tmp_path / "bad.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(8)}, f)
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    data = mutate(data, header, n)
    f.write_bytes(bytes(data))
    return f


def _with_header(header: dict, data: bytearray, n: int) -> bytearray:
    h = json.dumps(header).encode()
    return bytearray(len(h).to_bytes(8, "little")) + h + data[8 + n:]


@pytest.mark.parametrize("case", ["truncated", "header_len", "not_json", "overlap", "size_mismatch", "dtype"])
def test_safetensors_reader_rejects_damage(tmp_path, case):
    from quantchat.loading.hf_loader import SafetensorsFile

    def mutate(data, header, n):
        if case == "truncated":
            return data[:-5]
        if case == "header_len":
            return bytearray((10**9).to_bytes(8, "little")) + data[8:]
        if case == "not_json":
            return data[:8] + b"{" * n + data[8 + n:]
        if case == "overlap":
            header["b"]["data_offsets"] = [0, 32]
        elif case == "size_mismatch":
            header["a"]["shape"] = [4, 5]
        else:
            header["a"]["dtype"] = "Q4_K"
        return _with_header(header, data, n)

    f = _corrupt(tmp_path, mutate)
    with pytest.raises(ModelLoadError, match="bad.safetensors"):
        with SafetensorsFile(f) as sf:
            for k in sf.keys():
                sf.read(k)


def test_save_progress(tmp_path, monkeypatch, capsys):
    """Lines mode: the shard bar ends with a done/total line; off: nothing."""
    monkeypatch.setenv("QUANTCHAT_PROGRESS", "lines")
    _, model, out = quantized_dir(tmp_path, "int8", True, shard_bytes=20_000)
    n = len(list(out.glob("model-*.safetensors")))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("writing q: ")]
    assert n > 1 and 1 <= len(lines) <= 2 and lines[-1].startswith(f"writing q: {n}/{n} shard, "), lines
    monkeypatch.setenv("QUANTCHAT_PROGRESS", "off")
    save_quantized(tmp_path / "q2", model, QuantSpec.for_method("int8"), quantize_model(
        load_model(tmp_path / "src", cpu_layout=False), QuantSpec.for_method("int8")), tmp_path / "src")
    assert capsys.readouterr() == ("", "")


# -- encrypted shards and a signed manifest -----------------------------------------------------
def sealed_dir(tmp_path, encrypt: bool = True, sign: bool = True, shard_bytes: int = 20_000):
    from quantchat.quant.sealing import CheckpointKeys

    src = tmp_path / "src"
    make_tiny_llama(src, tie=False, n_kv_head=2)
    model = load_model(src, cpu_layout=False)
    spec = QuantSpec.for_method("int4-asym", 32)
    codes = quantize_model(model, spec)
    keys = CheckpointKeys(encrypt=bytes(range(32)) if encrypt else None, sign=b"s" * 32 if sign else None)
    out = save_quantized(tmp_path / "q", model, spec, codes, src, max_shard_bytes=shard_bytes, keys=keys)
    return model, out, keys


def test_encrypted_signed_round_trip_is_bit_exact(tmp_path, monkeypatch):
    from quantchat.quant.sealing import MAGIC, CheckpointKeys

    model, out, keys = sealed_dir(tmp_path)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    for s in shards:  # no plaintext at rest: not a safetensors header, no tensor names
        data = s.read_bytes()
        assert data.startswith(MAGIC) and b"qweight" not in data and b"layers." not in data
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encryption"]["cipher"] == "AES-256-GCM" and len(manifest["hmac_sha256"]) == 64
    loaded = load_quantized(out, keys=keys)
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    # the keys from the environment (what --checkpoint-key-file / --checkpoint-sign-key-file set)
    (tmp_path / "enc.key").write_text(keys.encrypt.hex() + "\n")
    monkeypatch.setenv("QUANTCHAT_CHECKPOINT_KEY_FILE", str(tmp_path / "enc.key"))
    monkeypatch.setenv("QUANTCHAT_CHECKPOINT_SIGN_KEY", keys.sign.hex())
    assert CheckpointKeys.from_files() == keys
    loaded = load_quantized(out)
    assert torch.equal(model.output.weight_int8, loaded.output.weight_int8)


def test_encrypted_checkpoint_without_or_with_a_wrong_key(tmp_path):
    from quantchat.quant.sealing import CheckpointKeys

    _, out, keys = sealed_dir(tmp_path, sign=False)
    with pytest.raises(ModelLoadError, match="encrypted; give its key"):
        load_quantized(out, keys=CheckpointKeys())
    with pytest.raises(ModelLoadError, match="cannot decrypt .wrong checkpoint key"):
        load_quantized(out, keys=CheckpointKeys(encrypt=b"\x01" * 32))


def test_tampered_shard_or_manifest_refused(tmp_path):
    import hashlib

    from quantchat.quant.sealing import CheckpointKeys

    _, out, keys = sealed_dir(tmp_path)
    mpath = out / "manifest.json"
    good_manifest = mpath.read_text()
    shard = sorted(out.glob("model-*.safetensors"))[0]
    good_shard = shard.read_bytes()
    # a flipped byte in a shard: its sha256 no longer matches
    bad = bytearray(good_shard)
    bad[len(bad) // 2] ^= 0x01
    shard.write_bytes(bytes(bad))
    with pytest.raises(ModelLoadError, match=f"{shard.name}.*sha256"):
        load_quantized(out, keys=keys)
    # ...and its new sha256 written into the manifest: the HMAC no longer matches
    m = json.loads(good_manifest)
    m["files"][shard.name]["sha256"] = hashlib.sha256(bytes(bad)).hexdigest()
    mpath.write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match="HMAC does not match"):
        load_quantized(out, keys=keys)
    # without the manifest check, AES-GCM still refuses the modified shard
    with pytest.raises(ModelLoadError, match="cannot decrypt"):
        load_quantized(out, keys=keys, verify=False)
    # the signature removed: refused when a sign key is given; a signed manifest without a key is refused too
    shard.write_bytes(good_shard)
    m = json.loads(good_manifest)
    mpath.write_text(json.dumps({k: v for k, v in m.items() if k != "hmac_sha256"}))
    with pytest.raises(ModelLoadError, match="not signed, but a sign key was given"):
        load_quantized(out, keys=keys)
    mpath.write_text(good_manifest)
    with pytest.raises(ModelLoadError, match="the manifest is signed; give its key"):
        load_quantized(out, keys=CheckpointKeys(encrypt=keys.encrypt))
    with pytest.raises(ModelLoadError, match="HMAC does not match"):
        load_quantized(out, keys=CheckpointKeys(encrypt=keys.encrypt, sign=b"t" * 32))
    # a shard cut at a chunk boundary or moved under another name fails to decrypt (names are authenticated)
    other = sorted(out.glob("model-*.safetensors"))[1]
    other_bytes = other.read_bytes()
    other.write_bytes(good_shard)
    with pytest.raises(ModelLoadError, match="cannot decrypt"):
        load_quantized(out, keys=keys, verify=False)
    other.write_bytes(other_bytes)
    assert load_quantized(out, keys=keys) is not None


def test_unkeyed_checkpoint_loads_and_index_cannot_name_files_outside(tmp_path):
    from quantchat.quant.sealing import CheckpointKeys

    _, out, _ = sealed_dir(tmp_path, encrypt=False, sign=False)
    assert "hmac_sha256" not in json.loads((out / "manifest.json").read_text())
    load_quantized(out, keys=CheckpointKeys())
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    name = next(iter(idx["weight_map"]))
    idx["weight_map"][name] = "../src/model.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ModelLoadError, match="not a file name in the checkpoint's folder"):
        load_quantized(out, keys=CheckpointKeys(), verify=False)


def test_checkpoint_key_formats(tmp_path):
    import base64

    from quantchat.quant.sealing import parse_key, read_key

    k = bytes(range(32))
    assert parse_key(k.hex().encode(), "x") == k
    assert parse_key(base64.b64encode(k) + b"\n", "x") == k
    assert parse_key(base64.urlsafe_b64encode(k), "x") == k
    assert parse_key(k, "x") == k
    for bad in (b"", b"abc", b"00" * 16, b"zz" * 32):
        with pytest.raises(QuantchatError, match="not a 256-bit key"):
            parse_key(bad, "x")
    with pytest.raises(QuantchatError, match="cannot read the key"):
        read_key(tmp_path / "missing", "QUANTCHAT_CHECKPOINT_KEY")
