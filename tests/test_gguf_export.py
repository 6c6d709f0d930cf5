"""GGUF export (quantchat.quant.gguf_export, ``quantchat export-gguf``): read back with quantchat's reader."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from quantchat.loading.gguf_io import convert_gguf_to_hf, read_gguf
from quantchat.loading.hf_loader import load_model
from quantchat.quant.checkpoint import load_quantized, save_quantized
from quantchat.quant.gguf_export import export_gguf, identify_pre_tokenizer
from quantchat.quant.quantize import QuantSpec, quantize_model
from quantchat.tokenizer.tokenizer import Tokenizer
from test_quant_report import CHAT_TEMPLATE, VOCAB, make_tiny_model

TYPES = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q8_0": Q.Q8_0}
N_HEAD, N_KV, HD = 4, 2, 16
TEXTS = ["the winter is there", "Hello, world! 123 <s> in the end", "é ü 日本 \n\t x"]


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_linears(model) -> dict[str, np.ndarray]:
    """GGUF name -> float weight in GGUF row order, from a quantchat model (dequantized when quantized)."""
    out = {}
    for i, layer in enumerate(model.layers):
        def w(m):
            return (m.dequantized_weight() if hasattr(m, "dequantized_weight") else m.weight).detach().float().numpy()

        qkv, w13 = w(layer.attention.wqkv), w(layer.feed_forward.w13)
        qs, kvs, h = N_HEAD * HD, N_KV * HD, layer.feed_forward.hidden
        out[f"blk.{i}.attn_q.weight"] = permute(qkv[:qs], N_HEAD)
        out[f"blk.{i}.attn_k.weight"] = permute(qkv[qs:qs + kvs], N_KV)
        out[f"blk.{i}.attn_v.weight"] = qkv[qs + kvs:]
        out[f"blk.{i}.attn_output.weight"] = w(layer.attention.wo)
        out[f"blk.{i}.ffn_gate.weight"] = w13[:h]
        out[f"blk.{i}.ffn_up.weight"] = w13[h:]
        out[f"blk.{i}.ffn_down.weight"] = w(layer.feed_forward.w2)
    return out


def roundtrip(w: np.ndarray, qtype: Q) -> np.ndarray:
    return np.asarray(dequantize(quantize(np.ascontiguousarray(w, dtype=np.float32), qtype), qtype),
                      dtype=np.float32).reshape(w.shape)


def rel_mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a.astype(np.float64) - b) ** 2).sum() / (b.astype(np.float64) ** 2).sum())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("gguf_export")
    out = {"tied": make_tiny_model(base / "tied", tie=True, n_kv_head=N_KV),
           "untied": make_tiny_model(base / "untied", tie=False, n_kv_head=N_KV, seed=1)}
    for name, method, gs, src in (("int4-asym-g64", "int4-asym", 64, "tied"),
                                  ("int4-asym-g32", "int4-asym", 32, "tied"),
                                  ("int4-sym-untied", "int4-sym", 32, "untied")):
        model = load_model(out[src], cpu_layout=False)
        spec = QuantSpec.for_method(method, gs)
        codes = quantize_model(model, spec)
        out[name] = save_quantized(base / name, model, spec, codes, out[src])
    return out


@pytest.mark.parametrize("qtype", list(TYPES))
def test_export_quantized_each_type(dirs, tmp_path, qtype):
    out = tmp_path / f"m-{qtype}.gguf"
    res = export_gguf(dirs["int4-asym-g64"], out, qtype)
    assert res.source == "quantized" and res.tokenizer_from == "tokenizer.json"
    if qtype == "q8_0":
        assert not res.warnings
    else:  # g64 codes do not land on GGUF's 32-blocks unchanged
        assert len(res.warnings) == 1 and "re-quantizing int4-asym g64 asym" in res.warnings[0]
    g = read_gguf(out)
    qmodel = load_quantized(dirs["int4-asym-g64"], keep_codes=True)
    src = load_model(dirs["tied"], cpu_layout=False)
    expected, original = gguf_linears(qmodel), gguf_linears(src)
    names = set(g.tensor_names)
    assert "output.weight" not in names  # tied: llama.cpp reads token_embd as the head
    assert names == set(expected) | {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}_norm.weight" for i in range(2) for n in ("attn", "ffn")}
    tol = {"q8_0": 0.02, "q4_1": 0.03, "q4_0": 0.04}[qtype]  # source int4-asym g64 rel-MSE: ~0.013
    for name, w in expected.items():
        assert g.tensor_info(name).type == qtype.upper()
        np.testing.assert_array_equal(g.tensor(name), roundtrip(w, TYPES[qtype]))  # what gguf.quants gives
        assert rel_mse(g.tensor(name), original[name]) < tol, name
    assert g.tensor_info("token_embd.weight").type == "Q8_0"
    head = qmodel.output.dequantized_weight().numpy()  # the int8 head the tied embedding shares
    np.testing.assert_array_equal(g.tensor("token_embd.weight"), roundtrip(head, Q.Q8_0))
    assert g.tensor_info("blk.0.attn_norm.weight").type == "F32"
    np.testing.assert_array_equal(g.tensor("blk.1.ffn_norm.weight"), qmodel.layers[1].ffn_norm.weight.numpy())
    m = g.metadata
    assert m["general.file_type"] == {"q4_0": 2, "q4_1": 3, "q8_0": 7}[qtype]
    assert (m["llama.block_count"], m["llama.embedding_length"], m["llama.feed_forward_length"]) == (2, 64, 160)
    assert (m["llama.attention.head_count"], m["llama.attention.head_count_kv"]) == (N_HEAD, N_KV)
    assert (m["llama.context_length"], m["llama.rope.freq_base"], m["llama.vocab_size"]) == (256, 10000.0, VOCAB)
    assert m["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)

    # quantchat reads it back: same function as the quantized model, within the re-quantization error
    hf = convert_gguf_to_hf(out, tmp_path / "conv")
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg["num_key_value_heads"] == N_KV and cfg["vocab_size"] == VOCAB
    idx = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = qmodel(idx), load_model(hf)(idx)
    assert float((a - b).norm() / a.norm()) < {"q8_0": 0.05, "q4_1": 0.2, "q4_0": 0.3}[qtype]


def test_int4_asym_g32_to_q4_1_is_nearly_lossless(dirs, tmp_path):
    """Same 32-blocks, same grid (scale = (max-min)/15, min): only float16 rounding of d and m differs."""
    res = export_gguf(dirs["int4-asym-g32"], tmp_path / "m.gguf", "q4_1")
    assert not res.warnings
    g = read_gguf(res.path)
    for name, w in gguf_linears(load_quantized(dirs["int4-asym-g32"], keep_codes=True)).items():
        assert rel_mse(g.tensor(name), w) < 1e-5, name


def test_awq_export_keeps_the_function(dirs, tmp_path):
    """AWQ's folded scales travel in the dequantized weights and the folder's norm weights."""
    from quantchat.quant.awq import awq_model

    model = load_model(dirs["untied"], cpu_layout=False)
    calib = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # AWQ's scale search (a coarse grid: fast), then its int4 grid
        awq_model(model, calib, group_size=32, symmetric=False, n_grid=4, clip=False)
    spec = QuantSpec.for_method("int4-asym", 32)
    codes = quantize_model(model, spec)
    qdir = save_quantized(tmp_path / "awq", model, spec, codes, dirs["untied"])
    out = export_gguf(qdir, tmp_path / "awq.gguf", "q8_0").path
    g = read_gguf(out)
    qmodel = load_quantized(qdir, keep_codes=True)
    ref_norm = load_model(dirs["untied"]).layers[0].ffn_norm.weight
    assert not np.allclose(g.tensor("blk.0.ffn_norm.weight"), ref_norm.numpy())  # scaled by AWQ
    np.testing.assert_array_equal(g.tensor("blk.0.ffn_norm.weight"), qmodel.layers[0].ffn_norm.weight.numpy())
    idx = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = qmodel(idx), load_model(convert_gguf_to_hf(out, tmp_path / "conv"))(idx)
    assert float((a - b).norm() / a.norm()) < 0.05


def test_untied_quantized_has_output(dirs, tmp_path):
    out = export_gguf(dirs["int4-sym-untied"], tmp_path / "u.gguf", "q4_0").path
    g = read_gguf(out)
    qmodel = load_quantized(dirs["int4-sym-untied"], keep_codes=True)
    assert g.tensor_info("output.weight").type == "Q8_0" and g.tensor_info("token_embd.weight").type == "Q8_0"
    head = qmodel.output.dequantized_weight().numpy()
    np.testing.assert_array_equal(g.tensor("output.weight"), roundtrip(head, Q.Q8_0))
    emb = qmodel.tok_embeddings
    emb_w = (emb.weight_int8.float() * emb.scales.float()[:, None]).numpy()
    np.testing.assert_array_equal(g.tensor("token_embd.weight"), roundtrip(emb_w, Q.Q8_0))


def test_float_model_q8_0_logits(dirs, tmp_path):
    from quantchat.loading.resolve import resolve_model

    out = tmp_path / "f.gguf"
    res = export_gguf(dirs["untied"], out, "q8_0")
    assert res.source == "float" and set(res.tensor_types.values()) == {"Q8_0", "F32"}
    ref = load_model(dirs["untied"], cpu_layout=False)
    sim = load_model(dirs["untied"], cpu_layout=False)  # every matrix through gguf's Q8_0, in HF row order
    with torch.no_grad():
        for name, p in sim.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(roundtrip(p.numpy(), Q.Q8_0)))
    exported = load_model(resolve_model(str(out)).hf_dir)
    idx = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, s, b = ref(idx), sim(idx), exported(idx)
    assert float((b - s).norm() / s.norm()) < 1e-5  # layout, q/k permutation and names are exact
    assert float((b - a).norm() / a.norm()) < 0.03  # near-identical to the float model
    assert (b.argmax(-1) == a.argmax(-1)).float().mean() > 0.9


def test_tokenizer_metadata_from_tokenizer_json(dirs, tmp_path):
    out = export_gguf(dirs["tied"], tmp_path / "t.gguf", "q8_0").path
    m = read_gguf(out).metadata
    src = Tokenizer.from_dir(dirs["tied"])
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "gpt-2"
    assert m["tokenizer.ggml.tokens"] == [src.id_to_token(i) for i in range(VOCAB)]
    assert m["tokenizer.ggml.merges"] == ["Ġ t", "h e", "Ġt he", "i n", "e r"]
    types = m["tokenizer.ggml.token_type"]
    assert types[261] == types[262] == gguf.TokenType.CONTROL and set(types[:261]) == {gguf.TokenType.NORMAL}
    assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"]) == (261, 262)
    assert m["tokenizer.ggml.add_bos_token"] is True
    assert m["tokenizer.chat_template"] == CHAT_TEMPLATE
    back = Tokenizer.from_gguf(out)  # quantchat's GGUF tokenizer: splits text as the source does
    for text in TEXTS:
        assert back.encode(text) == src.encode(text), text
    assert back.bos_id == 261 and back.eos_id == 262 and back.add_bos


def test_tokenizer_copied_from_source_gguf(dirs, tmp_path):
    a = export_gguf(dirs["tied"], tmp_path / "a.gguf", "q8_0", name="tiny-a").path
    res = export_gguf(a, tmp_path / "b.gguf", "q4_0")  # a float model from a GGUF: keys copied verbatim
    assert res.tokenizer_from == f"gguf {a}"
    ma, mb = read_gguf(a).metadata, read_gguf(res.path).metadata
    keys = [k for k in ma if k.startswith("tokenizer.")]
    assert len(keys) >= 8 and all(ma[k] == mb[k] for k in keys)
    assert mb["general.name"] == "tiny-a" and mb["general.file_type"] == 2


def test_sentencepiece_style_tokenizer(tmp_path):
    """A byte-fallback BPE (LLaMA-2 style) is written as tokenizer.ggml.model "llama" with scores."""
    from quantchat.tokenizer.gguf_tokenizer import build_tokenizer

    pieces = ["▁", "t", "h", "e", "a", "c", "▁t", "he", "▁the", "at", "▁c", "▁cat"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces), 0, -1)]  # longer pieces score higher
    meta = {"ggml.model": "llama", "ggml.tokens": tokens, "ggml.scores": scores, "ggml.token_type": types,
            "ggml.bos_token_id": 1, "ggml.eos_token_id": 2, "ggml.unknown_token_id": 0, "source": "test"}
    d = make_tiny_model(tmp_path / "spm", vocab=len(tokens), tokenizer=False, n_kv_head=N_KV)
    build_tokenizer(meta).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "unk_token": "<unk>", "add_bos_token": True}))
    out = export_gguf(d, tmp_path / "spm.gguf", "q8_0").path
    m = read_gguf(out).metadata
    assert m["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in m
    assert m["tokenizer.ggml.token_type"] == types and len(m["tokenizer.ggml.scores"]) == len(tokens)
    assert m["tokenizer.ggml.add_space_prefix"] is True
    src, back = Tokenizer.from_dir(d), Tokenizer.from_gguf(out)
    for text in ["the cat", "a cat at the theatre", "ü x"]:
        assert back.encode(text) == src.encode(text), text


def test_identify_pre_tokenizer():
    smollm = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    assert identify_pre_tokenizer({"pre_tokenizer": smollm, "model": {"type": "BPE"}}) == "smollm"
    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert identify_pre_tokenizer({"pre_tokenizer": gpt2, "model": {"type": "BPE"}}) == "gpt-2"
    odd = {"type": "Split", "pattern": {"Regex": "x+"}, "behavior": "Isolated", "invert": False}
    assert identify_pre_tokenizer({"pre_tokenizer": odd, "model": {"type": "BPE"}}) is None


# -- command line -------------------------------------------------------------------------------

def run_main(capsys, *argv) -> tuple[int, str, str]:
    from quantchat.cli.main import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_export_and_errors(dirs, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    rc, _, err = run_main(capsys, "export-gguf", dirs["int4-asym-g32"], "--type", "Q4_1", "--out", out)
    assert rc == 0 and out.is_file() and "wrote" in err and "Q4_1" in err, err

    def user_error(*argv, needle: str) -> None:
        rc, stdout, err = run_main(capsys, "export-gguf", *argv)
        assert rc == 2 and stdout == "" and "Traceback" not in err, err
        assert err.startswith("quantchat: error:") and needle in err and err.count("\n") == 1, err

    user_error(dirs["tied"], "--type", "q5_k", "--out", tmp_path / "x.gguf", needle="unsupported GGUF type 'q5_k'")
    user_error(tmp_path / "missing", "--type", "q8_0", "--out", tmp_path / "x.gguf", needle="no such file")
    user_error(dirs["tied"], "--type", "q8_0", "--out", out, needle="already exists")
    user_error(dirs["tied"], "--type", "q8_0", "--out", tmp_path / "x.bin", needle=".gguf")
    user_error(dirs["tied"], "--type", "q8_0", "--out", tmp_path / "x.gguf", "--tokenizer-pre", "nope",
               needle="unknown pre-tokenizer 'nope'")
    assert not (tmp_path / "x.gguf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cli.gguf"]
    rc, _, err = run_main(capsys, "export-gguf", dirs["tied"], "--type", "q8_0", "--out", out, "--force")
    assert rc == 0, err


def test_llama_cpp_loads_the_export(dirs, tmp_path):
    """With llama-cpp-python installed: llama.cpp loads the file and computes the same logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = export_gguf(dirs["untied"], tmp_path / "l.gguf", "q8_0").path
    from quantchat.loading.resolve import resolve_model

    ids = Tokenizer.from_dir(dirs["untied"]).encode("the winter is there, in the end")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    assert llm.tokenize(b"the winter is there, in the end", add_bos=True) == ids
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
    with torch.no_grad():
        ours = load_model(resolve_model(str(out)).hf_dir)(torch.tensor([ids]))[0].numpy()
    assert rel_mse(theirs, ours) < 1e-3  # llama.cpp also rounds the activations to 8 bits
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("tie,bias", [(True, False), (False, True)])
def test_tensor_count(tie, bias):
    from quantchat.model.config import ModelConfig
    from quantchat.model.transformer import Transformer
    from quantchat.quant.gguf_export import gguf_tensors, n_gguf_tensors

    cfg = ModelConfig(vocab_size=64, dim=32, n_layer=2, n_head=2, n_kv_head=1, head_dim=16, intermediate_size=64,
                      tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias)
    model = Transformer(cfg)
    assert n_gguf_tensors(model) == len(list(gguf_tensors(model)))


def test_export_progress(dirs, tmp_path, monkeypatch, capsys):
    """One bar over the tensors (lines mode: its last line is done/total), nothing on stdout; off: silent."""
    monkeypatch.setenv("QUANTCHAT_PROGRESS", "lines")
    res = export_gguf(dirs["int4-sym-untied"], tmp_path / "a.gguf", "q8_0")
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and 1 <= len(lines) <= 3, err
    assert lines[-1].startswith(f"encoding q8_0: {res.n_tensors}/{res.n_tensors} tensor, ")
    monkeypatch.setenv("QUANTCHAT_PROGRESS", "off")
    export_gguf(dirs["int4-sym-untied"], tmp_path / "b.gguf", "q8_0")
    assert capsys.readouterr() == ("", "")
