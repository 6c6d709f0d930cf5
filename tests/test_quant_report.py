"""Per-layer quantization error reports (quantchat.quant.report, ``quantize --report``, ``inspect``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from quantchat.errors import QuantchatError
from quantchat.loading.hf_loader import load_model
from quantchat.quant import report as qr
from quantchat.quant.awq import awq_model
from quantchat.quant.linear import QuantizedLinear
from quantchat.quant.quantize import QuantSpec, linear_names, quantize_model, set_module
from quantchat.tokenizer.gguf_tokenizer import bytes_to_unicode

MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r")]
SPECIALS = ["<s>", "</s>"]
VOCAB = 256 + len(MERGES) + len(SPECIALS)
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
CALIB = (2, 32)  # report windows x tokens: small, the tests check plumbing and orderings


def write_bpe_tokenizer(d: Path) -> None:
    """Byte-level BPE: bytes 0..255, a few merges, then <s> and </s> (special)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                          "add_bos_token": True, "chat_template": CHAT_TEMPLATE}))


def make_tiny_model(d: Path, *, tie: bool = False, n_kv_head: int = 4, layers: int = 2, seed: int = 0,
                    vocab: int = VOCAB, tokenizer: bool = True) -> Path:
    """A random tiny LLaMA folder (HF names, float32 safetensors) with the BPE tokenizer above; like
    tests/tiny_models.py but without importing transformers (seconds per test file)."""
    from safetensors.torch import save_file

    dim, ffn, n_head, hd = 64, 160, 4, 16
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
           "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": n_head,
           "num_key_value_heads": n_kv_head, "head_dim": hd, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "tie_word_embeddings": tie, "vocab_size": vocab, "bos_token_id": 261,
           "eos_token_id": 262, "torch_dtype": "float32"}
    (d / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        if len(shape) == 2:
            return torch.randn(*shape, generator=g) * 0.08
        return 0.8 + 0.4 * torch.rand(*shape, generator=g)

    t = {"model.embed_tokens.weight": w(vocab, dim), "model.norm.weight": w(dim)}
    shapes = {"self_attn.q_proj": (n_head * hd, dim), "self_attn.k_proj": (n_kv_head * hd, dim),
              "self_attn.v_proj": (n_kv_head * hd, dim), "self_attn.o_proj": (dim, n_head * hd),
              "mlp.gate_proj": (ffn, dim), "mlp.up_proj": (ffn, dim), "mlp.down_proj": (dim, ffn)}
    for i in range(layers):
        t[f"model.layers.{i}.input_layernorm.weight"] = w(dim)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = w(dim)
        for name, shape in shapes.items():
            t[f"model.layers.{i}.{name}.weight"] = w(*shape)
    if not tie:
        t["lm_head.weight"] = w(vocab, dim)
    save_file(t, d / "model.safetensors")
    if tokenizer:
        write_bpe_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("report_tiny"))  # no GQA: AWQ also rescales wo


def calib_tokens(d: Path) -> torch.Tensor:
    from quantchat.tokenizer.tokenizer import Tokenizer

    return qr.report_calibration(Tokenizer.from_dir(d), *CALIB)


def quantized(d: Path, method: str, group_size: int | None = 32):
    model = load_model(d, cpu_layout=False)
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, QuantSpec.for_method(method, group_size), calib=calib, keep_codes=True)
    return model


@pytest.fixture(scope="module")
def reports(tiny_dir):
    ref = load_model(tiny_dir, cpu_layout=False)
    calib = calib_tokens(tiny_dir)
    out = {}
    for method in ("int8", "int4-asym"):
        q = quantized(tiny_dir, method)
        out[method] = (qr.build_report(ref, q, calib, model_name="tiny", method=method), ref, q)
    return out


def test_rows_for_every_linear_and_orderings(reports):
    r8, _, q8 = reports["int8"]
    r4, _, _ = reports["int4-asym"]
    names = linear_names(q8) + ["output", "tok_embeddings"]
    assert [e.name for e in r8.layers] == names == qr.layer_names(q8)
    assert [e.name for e in r4.layers] == names
    for e in r8.layers + r4.layers:
        assert math.isfinite(e.weight_rel_mse) and math.isfinite(e.output_rel_mse), e
        assert 0 < e.weight_rel_mse < 0.1 and 0 < e.output_rel_mse < 0.1, e
    for e8, e4 in zip(r8.layers, r4.layers):
        if e4.layer is not None:  # int4 block linears vs int8 ones
            assert e4.method == "int4 g32 asym" and e8.method == "int8"
            assert e4.weight_rel_mse > 10 * e8.weight_rel_mse and e4.output_rel_mse > 10 * e8.output_rel_mse
        else:  # the head and embedding stay int8 in both
            assert e4.method == e8.method == "int8"
            assert e4.weight_rel_mse == pytest.approx(e8.weight_rel_mse)
    assert r8.layer("layers.1.feed_forward.w2").shape == (64, 160)
    for r in (r8, r4):
        lg = r.logits
        assert lg["tokens"] == CALIB[0] * CALIB[1] and 0 <= lg["top1_agreement"] <= 1 and lg["mean_kl"] >= 0
    assert r4.logits["logits_rel_mse"] > r8.logits["logits_rel_mse"]


def test_weight_error_matches_direct_computation(reports):
    rep, ref, q = reports["int4-asym"]
    name = "layers.0.feed_forward.w13"
    w = ref.get_submodule(name).weight
    wq = q.get_submodule(name).dequantized_weight()
    assert rep.layer(name).weight_rel_mse == pytest.approx(float((wq - w).pow(2).sum() / w.pow(2).sum()), rel=1e-5)


def test_write_report_files(reports, tmp_path):
    import matplotlib.image

    rep, ref, q = reports["int4-asym"]
    paths = qr.write_report(rep, tmp_path / "rep", ref, q)
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"report.json", "report.md", "quant_loss.png",
                                                               "error_profile.png"}
    data = json.loads(paths["json"].read_text())
    assert data["method"] == "int4-asym" and data["model"] == "tiny"
    assert data["calibration"] == {"samples": CALIB[0], "seq_len": CALIB[1], "tokens": CALIB[0] * CALIB[1]}
    assert data["worst_layer"] == data["histogram_layer"] == rep.worst().name
    assert data["worst_layer"].startswith("layers.")
    row = data["layers"][0]
    assert set(row) >= {"name", "kind", "layer", "shape", "method", "weight_rel_mse", "output_rel_mse"}
    assert row["kind"] == "wqkv" and row["layer"] == 0 and row["shape"] == [192, 64]
    assert set(data["logits"]) >= {"logits_rel_mse", "top1_agreement", "mean_kl"}
    md = paths["markdown"].read_text()
    assert "| layer | shape | method | weight rel-MSE | output rel-MSE |" in md
    assert all(f"| {e.name} |" in md for e in rep.layers)
    for key in ("histogram", "profile"):
        img = matplotlib.image.imread(paths[key])
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0


def test_print_table(reports):
    from rich.console import Console

    rep, _, _ = reports["int4-asym"]
    console = Console(record=True, width=140)
    qr.print_table(rep, console)
    text = console.export_text()
    assert all(e.name in text for e in rep.layers) and "output rel-MSE" in text and "int4 g32 asym" in text


def test_awq_basis_is_undone(tiny_dir):
    """AWQ-scaled weights stored at int8 measure as int8 errors once the folded scales are undone (and as
    large errors if they were not: the check would catch a wrong basis)."""
    ref = load_model(tiny_dir, cpu_layout=False)
    q = load_model(tiny_dir, cpu_layout=False)
    calib = calib_tokens(tiny_dir)
    with torch.no_grad():
        awq_model(q, calib, group_size=32, symmetric=False, n_grid=4, clip=False)
    for name in linear_names(q) + ["output"]:
        m = q.get_submodule(name)
        set_module(q, name, QuantizedLinear.from_float(m.weight, m.bias, 8, keep_codes=True))
    good = qr.build_report(ref, q, calib, model_name="tiny", method="awq", logits=False)
    assert max(e.weight_rel_mse for e in good.layers) < 2e-4
    assert max(e.output_rel_mse for e in good.layers) < 2e-4
    naive = qr.build_report(ref, q, calib, model_name="tiny", method="int8", logits=False)
    assert naive.layer("layers.0.feed_forward.w2").weight_rel_mse > 1e-2  # the w2 scales were real


def test_bad_layer_name(reports):
    rep, _, _ = reports["int8"]
    with pytest.raises(QuantchatError, match="no layer 'layers.9.wo'"):
        qr.resolve_layer(rep, "layers.9.wo")
    assert qr.resolve_layer(rep, "layers.0.wo") == "layers.0.attention.wo"
    assert qr.resolve_layer(rep, "output") == "output"


# -- command line -------------------------------------------------------------------------------

def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    from quantchat.cli.main import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_quantize_report_then_inspect(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    rc, stdout, err = run_main(capsys, "quantize", tiny_dir, "--method", "int4-sym", "--group-size", "32",
                               "--out", out, "--report", "--report-samples", CALIB[0],
                               "--report-seq-len", CALIB[1])
    assert rc == 0, err
    assert "layers.1.feed_forward.w2" in stdout and "weight rel-MSE" in stdout
    data = json.loads((out / "report" / "report.json").read_text())
    assert data["method"] == "int4-sym" and len(data["layers"]) == 2 * 4 + 2
    assert (out / "report" / "quant_loss.png").stat().st_size > 0

    cfg = json.loads((out / "quantchat_quant.json").read_text())
    assert cfg["source"]["hf_dir"] == str(Path(tiny_dir).absolute())  # quantize records its source
    rc, stdout, err = run_main(capsys, "inspect", out, "--out", tmp_path / "insp0", "--samples", CALIB[0],
                               "--seq-len", CALIB[1])
    assert rc == 0, err  # the recorded source is the default reference
    default_ref = json.loads((tmp_path / "insp0" / "report.json").read_text())
    assert [r["output_rel_mse"] for r in default_ref["layers"]] == pytest.approx(
        [r["output_rel_mse"] for r in data["layers"]], rel=1e-4)

    rc, stdout, err = run_main(capsys, "inspect", out, "--reference", tiny_dir, "--layer", "0.w13",
                               "--out", tmp_path / "insp", "--samples", CALIB[0], "--seq-len", CALIB[1])
    assert rc == 0, err
    again = json.loads((tmp_path / "insp" / "report.json").read_text())
    assert again["histogram_layer"] == "layers.0.feed_forward.w13"
    # same windows, same model: the same numbers as at quantization time
    assert [r["output_rel_mse"] for r in again["layers"]] == pytest.approx(
        [r["output_rel_mse"] for r in data["layers"]], rel=1e-4)

    rc, _, err = run_main(capsys, "inspect", out, "--reference", tiny_dir, "--layer", "7.w13")
    assert rc == 2 and "no layer '7.w13'" in err


def test_inspect_errors(tiny_dir, tmp_path, capsys):
    rc, _, err = run_main(capsys, "inspect", tmp_path / "nope")
    assert rc == 2 and "no such folder" in err
    rc, _, err = run_main(capsys, "inspect", tiny_dir, "--reference", tiny_dir)
    assert rc == 2 and "not a quantchat quantized folder" in err
    other = make_tiny_model(tmp_path / "other", layers=3)
    q = tmp_path / "q8"
    assert run_main(capsys, "quantize", tiny_dir, "--method", "int8", "--out", q)[0] == 0
    rc, _, err = run_main(capsys, "inspect", q, "--reference", other)
    assert rc == 2 and "does not match" in err and "n_layer" in err


def record_source(qdir: Path, source: str) -> None:
    """Write a "source" into quantchat_quant.json (and its manifest entry), as a checkpoint may record it."""
    from quantchat.quant.checkpoint import MANIFEST_FILE, QUANT_FILE, sha256_file

    cfg = json.loads((qdir / QUANT_FILE).read_text())
    cfg["source"] = {"origin": source}
    (qdir / QUANT_FILE).write_text(json.dumps(cfg))
    manifest = json.loads((qdir / MANIFEST_FILE).read_text())
    f = qdir / QUANT_FILE
    manifest["files"][QUANT_FILE] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    (qdir / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_inspect_uses_the_recorded_source(tiny_dir, tmp_path, capsys):
    q = tmp_path / "q8"
    assert run_main(capsys, "quantize", tiny_dir, "--method", "int8", "--out", q)[0] == 0
    record_source(q, str(tmp_path / "gone"))
    rc, _, err = run_main(capsys, "inspect", q)
    assert rc == 2 and "no longer there" in err and "--reference" in err
    record_source(q, str(tiny_dir))
    rc, stdout, err = run_main(capsys, "inspect", q, "--samples", 1, "--seq-len", 16)
    assert rc == 0, err
    assert json.loads((q / "report" / "report.json").read_text())["method"] == "int8"
