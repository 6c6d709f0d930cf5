"""GGUF files of the qwen2, gpt2, mpt and falcon architectures (quantchat.loading.gguf_io).

Each tiny GGUF is written from a random transformers model the way llama.cpp's convert_hf_to_gguf.py
would: GGUF names from the gguf package's own tensor map (llama.cpp's gguf-py tensor_mapping.py),
GPT-2's Conv1D weights transposed, Falcon's fused q/k/v reordered to [q; k; v], the metadata keys its
``set_gguf_parameters`` writes. The conversion must give back the original model: loaded by transformers
and by quantchat, logits equal (float32, <= 1e-4); and where transformers' own GGUF loader supports the
architecture, the same model as that loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from quantchat.errors import ModelLoadError
from quantchat.loading.gguf_io import GGUF_ARCHITECTURES, convert_gguf_to_hf, hf_config_from_gguf, read_gguf
from test_gguf import VOCAB, add_tiny_tokenizer, assert_one_line

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _qwen2(**kw):
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=20000.0, rms_norm_eps=1e-6, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, **kw))


def _gpt2(**kw):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024, bos_token_id=1, eos_token_id=2, **kw))


def _mpt(**kw):
    attn = {"alibi": True, "alibi_bias_max": 8, **kw.pop("attn", {})}
    cfg = dict(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, max_seq_len=128, attn_config=attn)
    return transformers.MptForCausalLM(transformers.MptConfig(**{**cfg, **kw}))


def _falcon(**kw):
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1,
        eos_token_id=2, **kw))


CASES = {
    "qwen2": ("qwen2", lambda: _qwen2()),
    "qwen2-untied": ("qwen2", lambda: _qwen2(tie_word_embeddings=False)),
    "gpt2": ("gpt2", lambda: _gpt2()),
    "gpt2-untied": ("gpt2", lambda: _gpt2(tie_word_embeddings=False)),
    "mpt": ("mpt", lambda: _mpt()),
    "mpt-6heads-clip": ("mpt", lambda: _mpt(d_model=48, n_heads=6, attn={"clip_qkv": 0.5})),
    "falcon-7b-layout": ("falcon", lambda: _falcon(multi_query=True, parallel_attn=True,
                                                    new_decoder_architecture=False)),
    "falcon-new-arch": ("falcon", lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2)),
    "falcon-new-arch-1ln": ("falcon", lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2,
                                                       num_ln_in_parallel_attn=1)),
}
# transformers' GGUF loader (transformers.integrations.ggml): these architectures; its Falcon loader does not
# undo llama.cpp's q/k/v reordering, which only the 7B layout (one kv head) does not need
GGUF_LOADER_CASES = ["qwen2", "qwen2-untied", "gpt2", "gpt2-untied", "falcon-7b-layout"]


def build(case: str):
    torch.manual_seed(0)
    ref = CASES[case][1]().float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "norm" in name or "ln" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.05)
    return ref


def llama_cpp_tensors(arch: str, model) -> dict[str, np.ndarray]:
    """The model's tensors as llama.cpp's converter stores them: GGUF name -> array (PyTorch order)."""
    cfg = model.config
    sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    n_blocks = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)
    out = {}
    for name, w in sd.items():
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue
        if arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            w = w.T.copy()  # GPT2Model.modify_tensors
        if arch == "falcon" and "query_key_value" in name:  # FalconModel.modify_tensors
            n_head = cfg.num_attention_heads
            n_kv = cfg.num_kv_heads if cfg.new_decoder_architecture else 1  # 7B config.json: no num_kv_heads
            hd = cfg.hidden_size // n_head
            qkv = w.reshape(n_kv, n_head // n_kv + 2, hd, cfg.hidden_size)
            w = np.concatenate([qkv[:, :-2].reshape(-1, cfg.hidden_size), qkv[:, -2].reshape(-1, cfg.hidden_size),
                                qkv[:, -1].reshape(-1, cfg.hidden_size)])
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        out[new] = w
    return out


def write_gguf(path: Path, arch: str, model, qtype: Q = Q.F32, extra_kv=None) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_block_count(cfg.num_hidden_layers)
    if arch == "qwen2":  # TextModel.set_gguf_parameters
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    elif arch == "gpt2":
        w.add_context_length(cfg.n_ctx if hasattr(cfg, "n_ctx") else cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    elif arch == "mpt":
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_feed_forward_length(4 * cfg.d_model)
        w.add_head_count(cfg.n_heads)
        w.add_layer_norm_eps(1e-5)
        if cfg.attn_config.clip_qkv is not None:
            w.add_clamp_kqv(cfg.attn_config.clip_qkv)
        w.add_max_alibi_bias(cfg.attn_config.alibi_bias_max if cfg.attn_config.alibi else 0.0)
    elif arch == "falcon":
        w.add_context_length(2048)
        w.add_tensor_data_layout("jploski")
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(4 * cfg.hidden_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_kv_heads if cfg.new_decoder_architecture else 1)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    for key, value in (extra_kv or {}).items():
        w.add_float32(key, value)
    add_tiny_tokenizer(w)
    for name, arr in llama_cpp_tensors(arch, model).items():
        t = qtype if arr.ndim == 2 and qtype != Q.F32 else Q.F32
        w.add_tensor(name, gguf.quants.quantize(arr, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (1, 11), generator=g)


def logits(model, seq) -> torch.Tensor:
    with torch.no_grad():
        out = model(seq)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QUANTCHAT_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_transformers_and_quantchat(tmp_path, case):
    from quantchat.loading.hf_loader import load_model

    arch, _ = CASES[case]
    ref = build(case)
    path = tmp_path / f"{case}.gguf"
    write_gguf(path, arch, ref)
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [GGUF_ARCHITECTURES[arch].hf_architecture]
    seq = ids()
    want = logits(ref, seq)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf) is type(ref)
    assert (logits(hf, seq) - want).abs().max().item() <= TOL
    ours = load_model(out)
    assert ours.config.family == arch
    assert (logits(ours, seq) - want).abs().max().item() <= TOL
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0])
@pytest.mark.parametrize("case", GGUF_LOADER_CASES)
def test_matches_transformers_gguf_loader(tmp_path, case, qtype):
    """The independent check of the names and layouts: transformers reading the GGUF itself."""
    arch, _ = CASES[case]
    ref = build(case)
    path = tmp_path / f"{case}.gguf"
    write_gguf(path, arch, ref, qtype)
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs) is type(ours)
    a, b = theirs.state_dict(), ours.state_dict()
    for k in b:
        if k in a and not k.endswith((".attn.bias", ".attn.masked_bias")):
            assert torch.equal(a[k], b[k]), k
    seq = ids()
    assert (logits(theirs, seq) - logits(ours, seq)).abs().max().item() <= TOL


def test_falcon_qkv_regrouped(tmp_path):
    """new_decoder_architecture: the GGUF's [q; k; v] rows go back to HF's per-kv-group layout."""
    ref = build("falcon-new-arch")
    path = tmp_path / "f.gguf"
    write_gguf(path, "falcon", ref)
    stored = read_gguf(path).tensor("blk.0.attn_qkv.weight")
    hf_w = ref.state_dict()["transformer.h.0.self_attention.query_key_value.weight"].numpy()
    assert not np.array_equal(stored, hf_w)
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    from safetensors.numpy import load_file

    sd = load_file(out / "model.safetensors")
    np.testing.assert_array_equal(sd["transformer.h.0.self_attention.query_key_value.weight"], hf_w)
    np.testing.assert_array_equal(sd["transformer.h.0.ln_mlp.weight"],
                                  ref.state_dict()["transformer.h.0.ln_mlp.weight"].numpy())
    cfg = hf_config_from_gguf(read_gguf(path))
    assert cfg["new_decoder_architecture"] and cfg["num_kv_heads"] == 2 and cfg["num_ln_in_parallel_attn"] == 2


def test_gpt2_conv1d_transposed_back(tmp_path):
    ref = build("gpt2")
    path = tmp_path / "g.gguf"
    write_gguf(path, "gpt2", ref)
    g = read_gguf(path)
    assert g.tensor_info("blk.0.attn_qkv.weight").shape == (3 * 64, 64)  # [out, in] in the GGUF
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    from safetensors.numpy import load_file

    sd = load_file(out / "model.safetensors")
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        key = f"transformer.h.1.{name}.weight"
        np.testing.assert_array_equal(sd[key], ref.state_dict()[key].numpy())
    assert json.loads((out / "config.json").read_text())["n_positions"] == 1024


def test_mpt_metadata(tmp_path):
    ref = build("mpt-6heads-clip")
    path = tmp_path / "m.gguf"
    write_gguf(path, "mpt", ref)
    cfg = hf_config_from_gguf(read_gguf(path))
    assert cfg["attn_config"]["clip_qkv"] == 0.5 and cfg["attn_config"]["alibi_bias_max"] == 8
    assert (cfg["d_model"], cfg["n_heads"], cfg["expansion_ratio"]) == (48, 6, 4)


def test_qwen2_biases_not_permuted(tmp_path):
    ref = build("qwen2")
    path = tmp_path / "q.gguf"
    write_gguf(path, "qwen2", ref)
    g = read_gguf(path)
    key = "model.layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(g.tensor("blk.0.attn_q.weight"), ref.state_dict()[f"{key}.weight"].numpy())
    np.testing.assert_array_equal(g.tensor("blk.0.attn_q.bias"), ref.state_dict()[f"{key}.bias"].numpy())
    cfg = hf_config_from_gguf(g)
    assert cfg["model_type"] == "qwen2" and cfg["rope_theta"] == 20000.0 and cfg["num_key_value_heads"] == 2


# ---------------------------------------------------------------- unsupported variants


def test_falcon_alibi_refused(tmp_path):
    path = tmp_path / "falcon-rw.gguf"
    write_gguf(path, "falcon", build("falcon-7b-layout"), extra_kv={"falcon.attention.max_alibi_bias": 8.0})
    with pytest.raises(ModelLoadError) as e:
        convert_gguf_to_hf(path, tmp_path / "hf")
    assert_one_line(e, "falcon-rw.gguf", "Falcon with ALiBi", "not supported")
    assert not (tmp_path / "hf").exists()


def test_mpt_without_alibi_refused(tmp_path):
    path = tmp_path / "mpt-noalibi.gguf"
    ref = build("mpt")  # llama.cpp writes max_alibi_bias 0 for attn_config.alibi false
    ref.config.attn_config.alibi = False
    write_gguf(path, "mpt", ref)
    with pytest.raises(ModelLoadError) as e:
        hf_config_from_gguf(read_gguf(path))
    assert_one_line(e, "MPT without ALiBi", "not supported")


def test_mpt_activation_scales_refused(tmp_path):
    path = tmp_path / "mpt-act.gguf"
    ref = build("mpt")
    write_gguf(path, "mpt", ref)
    g = read_gguf(path)
    tensors = {n: g.tensor(n) for n in g.tensor_names}
    w = gguf.GGUFWriter(str(path), "mpt")
    for k in ("block_count", "context_length", "embedding_length", "attention.head_count"):
        w.add_uint32(f"mpt.{k}", int(g.metadata[f"mpt.{k}"]))
    w.add_float32("mpt.attention.max_alibi_bias", 8.0)
    for n, t in tensors.items():
        w.add_tensor(n, t)
    w.add_tensor("blk.0.ffn.act.scales", np.ones(256, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError) as e:
        hf_config_from_gguf(read_gguf(path))
    assert_one_line(e, "MPT with activation scales", "not supported")


def test_table_matches_families():
    """Every family's GGUF architecture is read, and its config.json class is that family's."""
    from quantchat.model.families import FAMILIES, family_of

    for fam in FAMILIES.values():
        assert fam.gguf_architecture in GGUF_ARCHITECTURES, fam.name
        spec = GGUF_ARCHITECTURES[fam.gguf_architecture]
        assert family_of({"architectures": [spec.hf_architecture]}) is fam
