"""``quantchat bench``: one run over load-time variants of a tiny model (JSON, markdown, PNGs), skipped
prompt lengths, synthetic model shapes and folders, the llama.cpp peer's error and ratios."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantchat.benchmark import measure, plots, runner
from quantchat.benchmark import synthetic as syn
from quantchat.benchmark.results import Results, run_meta
from quantchat.errors import QuantchatError
from tiny_models import make_tiny_llama

TINY_SCALE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 128}
PNGS = ("decode_latency.png", "ttft.png", "memory.png")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bench_tiny")
    make_tiny_llama(d)  # vocab 256, context 256
    syn.write_synthetic_tokenizer(d, 256)
    return d


def check_pngs(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    for name in PNGS:
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, name


def test_bench_tiny_model_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "quantchat", "bench", "--model", str(tiny_model), "--quant", "none,int8,int4-asym",
           "--steps", "4", "--warmup-steps", "1", "--prompt-lengths", "8,24,300", "--ttft-runs", "1",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decode ms/token" in proc.stdout and "int4-asym g128" in proc.stdout
    assert "[1/3] none" in proc.stderr  # progress on stderr

    report = json.loads((out / "results.json").read_text())
    assert report["partial"] is False
    assert {"meta", "source", "options", "model", "method", "variants", "peers", "ratios", "notes"} <= set(report)
    assert report["options"]["prompt_lengths_kept"] == [8, 24]
    assert report["options"]["prompt_lengths_skipped"] == [300]
    assert any("300" in n and "context of 256" in n for n in report["notes"])
    rows = {r["label"]: r for r in report["variants"]}
    assert list(rows) == ["none", "int8", "int4-asym g128"]
    for r in rows.values():
        assert "error" not in r and not r["skipped"], r
        assert r["engine"] == "quantchat"
        assert r["size_bytes"] > 0 and r["weight_bytes"] > 0 and r["kv_cache_bytes"] > 0
        assert r["load_s"] > 0 and r["import_s"] > 0
        assert r["rss_mb"] > 0 and r["peak_rss_mb"] >= r["rss_mb"] and r["rss_after_load_mb"] > 0
        d = r["decode"]
        assert d["steps"] == 4 and len(d["latencies_ms"]) == 4 and d["warmup_steps"] == 1
        lat = d["latency_ms"]
        assert 0 < lat["min"] <= lat["median"] <= lat["max"] and lat["p10"] <= lat["p90"]
        assert d["tokens_per_s"] == pytest.approx(1000 / lat["median"])
        assert all(0 <= t < 256 for t in d["tokens"])
        assert [t["prompt_len"] for t in r["ttft"]] == [8, 24]
        assert all(t["ms"]["median"] > 0 and t["prefill_tok_s"] > 0 for t in r["ttft"])
        assert r["max_seq_len"] <= 256
    assert rows["none"]["size_kind"] == "disk" and rows["none"]["load_path"] == "float folder"
    for label in ("int8", "int4-asym g128"):
        assert rows[label]["size_kind"] == "packed" and rows[label]["quant_kernels"] in ("quantchat", "torch")
        assert rows[label]["size_bytes"] < rows["none"]["weight_bytes"]
    assert rows["int4-asym g128"]["weight_bytes"] < rows["int8"]["weight_bytes"]

    md = (out / "results.md").read_text()
    assert "| int8 |" in md and "skipped" in md
    check_pngs(out)


def test_bench_refuses_before_running(tiny_model, tmp_path):
    with pytest.raises(QuantchatError, match="context"):
        runner.run_bench(runner.BenchOptions(model=str(tiny_model), steps=1000, out=str(tmp_path)),
                         progress=lambda m: None)
    with pytest.raises(QuantchatError, match="unknown variant"):
        runner.run_bench(runner.BenchOptions(model=str(tiny_model), quants="none,int3"), progress=lambda m: None)
    with pytest.raises(QuantchatError, match="either --model or --synthetic"):
        runner.run_bench(runner.BenchOptions(model="x", synthetic="llama-2-7b"), progress=lambda m: None)


def test_parse_variants():
    assert runner.parse_variants("none, int8,int4-asym:64,awq,int4-asym:64", None) == \
        [("none", None), ("int8", None), ("int4-asym", 64), ("awq", 128)]
    assert runner.parse_variants("gptq,int4-sym", 32) == [("gptq", 32), ("int4-sym", 32)]
    for bad in ("int8:32", "int4-sym:48", "fp8", ""):
        with pytest.raises(QuantchatError):
            runner.parse_variants(bad, None)


def test_synthetic_configs_match_published_shapes():
    t = syn.synthetic_config("tinyllama-1.1b")
    assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"],
            t["intermediate_size"], t["vocab_size"]) == (2048, 22, 32, 4, 5632, 32000)
    llama = syn.synthetic_config("llama-2-7b")
    assert (llama["hidden_size"], llama["num_hidden_layers"], llama["num_attention_heads"],
            llama["num_key_value_heads"], llama["intermediate_size"], llama["vocab_size"]) == \
        (4096, 32, 32, 32, 11008, 32000)
    assert syn.n_params(t) == pytest.approx(1.1e9, rel=0.01)
    assert syn.n_params(llama) == pytest.approx(6.74e9, rel=0.01)
    assert syn.float_bytes(llama, "float32") > 26e9 and syn.float_bytes(llama, "bfloat16") < 14e9
    assert syn.quantized_bytes(llama, "int4-asym", 128) < 4.5e9
    with pytest.raises(QuantchatError, match="unknown synthetic"):
        syn.synthetic_config("gpt-5")


def test_synthetic_tiny_scale_folders_load(tmp_path):
    from quantchat.engine.build import load_engine

    cfg = syn.synthetic_config("tinyllama-1.1b", TINY_SCALE)
    folders = {"float": syn.build_float_model(tmp_path / "f", cfg, "bfloat16", "tinyllama-1.1b")}
    for method, gs in (("int8", None), ("int4-asym", 32), ("awq", 64)):
        folders[method] = syn.build_quantized_model(tmp_path / method, cfg, method, gs, "tinyllama-1.1b")
    assert syn.is_complete(folders["float"])
    sizes = {k: runner.folder_weight_bytes(p) for k, p in folders.items()}
    assert sizes["int4-asym"] < sizes["int8"] < sizes["float"] * 1.2
    for name, folder in folders.items():
        engine = load_engine(str(folder), device="cpu", max_seq_len=32).engine
        logits = engine.prefill([5, 6, 7])
        assert logits.shape == (300,) and torch.isfinite(logits).all(), name


def test_synthetic_too_big_is_skipped_with_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(measure, "mem_available_bytes", lambda: 20 * 10**9)
    v = runner.Variant("none", "none", None, "float")
    runner.prepare_synthetic(v, "llama-2-7b", syn.synthetic_config("llama-2-7b"), "float32", lambda m: None)
    assert v.skipped and "27" in v.skipped and "--dtype bfloat16" in v.skipped and not v.model_path


def test_peer_missing_is_a_clear_error(monkeypatch, capsys):
    from quantchat.cli.main import main

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    assert main(["bench", "--peer", "llama.cpp", "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert "llama-cpp-python" in err and "pip install" in err and "quantchat[peer]" in err


def test_peer_needs_a_gguf(tmp_path):
    with pytest.raises(QuantchatError, match="GGUF"):
        runner.plan_peers({"origin": str(tmp_path)}, [], 1)


def fake_row(label: str, engine: str, family: str, ms: float, ttft: dict[int, float]) -> dict:
    return {"label": label, "engine": engine, "family": family, "size_bytes": 10**6, "size_kind": "disk",
            "load_s": 0.1, "rss_mb": 100.0, "peak_rss_mb": 120.0,
            "decode": {"latency_ms": {"median": ms, "p10": ms * 0.9, "p90": ms * 1.1, "min": ms * 0.8,
                                      "max": ms * 1.2, "mean": ms, "n": 3}, "tokens_per_s": 1000 / ms},
            "ttft": [{"prompt_len": L, "ms": {"median": t, "min": t, "max": t, "runs": [t]}} for L, t in ttft.items()]}


def bench_report(variants: list[dict], peers: list[dict], ratios: list[dict]) -> dict:
    """A results.json as written before the common meta block (no "kind")."""
    return {"meta": {"cpu_model": "cpu", "nproc": 2, "torch": "x", "llama_cpp_python": "0.3"},
            "source": {"name": "m"}, "model": {"n_params": 1e6, "n_layer": 2, "dim": 64, "context": 256},
            "options": {"prompt_lengths_kept": [64, 128], "device": "cpu", "dtype": "float32", "threads": 2},
            "method": "m", "variants": variants, "peers": peers, "ratios": ratios, "notes": []}


def test_peer_ratios_tables_and_plots(tmp_path):
    variants = [fake_row("none", "quantchat", "float", 20.0, {64: 100.0, 128: 200.0}),
                fake_row("int4-asym g128", "quantchat", "4bit", 10.0, {64: 80.0, 128: 160.0}),
                fake_row("int4-sym g128", "quantchat", "4bit", 11.0, {64: 80.0, 128: 160.0})]
    for v, m in zip(variants, ("none", "int4-asym", "int4-sym")):
        v["method"] = m
    peer = fake_row("llama.cpp Q4_1", "llama.cpp", "4bit", 12.0, {64: 40.0, 128: 80.0})
    peer["gguf_type"] = "q4_1"
    ratios = runner.peer_ratios(variants, [peer])
    r = {q["variant"]: q for q in ratios}
    assert r["int4-asym g128"]["same_bits"] and r["int4-asym g128"]["same_type"] and not r["none"]["same_bits"]
    assert r["int4-sym g128"]["same_bits"] and not r["int4-sym g128"]["same_type"]
    assert r["int4-asym g128"]["decode_speed"] == pytest.approx(1.2)
    assert r["int4-asym g128"]["ttft_speed"] == {"64": pytest.approx(0.5), "128": pytest.approx(0.5)}
    report = Results.from_dict(bench_report(variants, [peer], ratios))
    runner.write_outputs(tmp_path, report)
    md = (tmp_path / "results.md").read_text()
    assert "quantchat / llama.cpp" in md and "1.20x" in md
    check_pngs(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_llamacpp_worker_on_default_gguf(tmp_path):
    from quantchat.paths import default_model_path

    gguf = default_model_path()
    if gguf is None:
        pytest.skip("default model not installed")
    job = {"engine": "llama.cpp", "label": "peer", "model": str(gguf), "threads": 1, "steps": 3, "warmup_steps": 1,
           "decode_context": 8, "prompt_lengths": [16], "ttft_runs": 1, "max_seq_len": 64, "seed": 1}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "quantchat.benchmark.worker", str(tmp_path / "job.json"),
                           str(tmp_path / "res.json")], capture_output=True, text=True, timeout=300)
    res = json.loads((tmp_path / "res.json").read_text())
    assert proc.returncode == 0, res
    assert res["decode"]["steps"] == 3 and res["ttft"][0]["prompt_len"] == 16 and res["gguf_main_type"] == "Q4_1"


def test_results_round_trip_and_plots(tmp_path):
    """Results: written as JSON, read back equal (kind, meta, fields), plotted from the file; an old file
    without kind loads too; the common meta block names the machine and masks secrets."""
    variants = [fake_row("none", "quantchat", "float", 20.0, {64: 100.0}),
                fake_row("int8", "quantchat", "8bit", 12.0, {64: 70.0, 128: 150.0})]
    old = bench_report(variants, [], [])
    (tmp_path / "old.json").write_text(json.dumps(old))
    legacy = Results.read(tmp_path / "old.json")
    assert legacy.kind == "bench" and legacy.meta["cpu_model"] == "cpu" and legacy["variants"] == variants
    assert [r["label"] for r in legacy.rows] == ["none", "int8"]

    meta = run_meta(["quantchat", "bench", "serve", "--api-key", "sk-1", "--secret=s2"])
    assert {"cpu_model", "nproc", "kernels_variant", "torch", "git_commit", "time", "command", "quantchat"} <= set(meta)
    assert "sk-1" not in json.dumps(meta) and "s2" not in json.dumps(meta)
    fresh = Results("bench", {**meta, **old["meta"]}, {k: v for k, v in old.items() if k != "meta"})
    fresh["ratios"] = []
    fresh.write(tmp_path / "results.json")
    back = Results.read(tmp_path / "results.json")
    assert back == fresh and json.loads((tmp_path / "results.json").read_text())["kind"] == "bench"
    plots.make_plots(back, tmp_path)
    check_pngs(tmp_path)

    serve = Results("bench-serve", fields={"options": {}, "rows": [
        {"setup": "serve (1 worker)", "clients": c, "tokens_per_s": 10.0 * c} for c in (1, 4)]})
    serve.write(tmp_path / "serve.json")
    assert Results.read(tmp_path / "serve.json").rows == serve.rows
    plots.plot_serving(Results.read(tmp_path / "serve.json"), tmp_path / "throughput.png")
    ppl = Results("eval-ppl", fields={"command": "eval ppl", "model": "m", "quant": "none", "dtype": "float32",
                                      "window": 8, "window_ppl": [3.0, float("nan"), 4.0]})
    ppl.write(tmp_path / "ppl.json")
    back = Results.read(tmp_path / "ppl.json")
    assert back["window_ppl"] == [3.0, None, 4.0]  # JSON has no NaN
    old_ppl = {k: v for k, v in back.to_dict().items() if k not in ("kind", "meta")}
    assert Results.from_dict(old_ppl).kind == "eval-ppl"
    plots.plot_ppl(back, tmp_path / "ppl_windows.png")
    mc = Results("eval-mc", fields={"model": "m", "quant": "int8", "accuracy": 0.5,
                                    "subjects": {"a": {"n": 2, "correct": 1, "accuracy": 0.5}}})
    plots.plot_mc(Results.read(mc.write(tmp_path / "mc.json")), tmp_path / "mc.png")
    import matplotlib.image as mpimg

    for name in ("throughput.png", "ppl_windows.png", "mc.png"):
        assert mpimg.imread(tmp_path / name).shape[0] > 100, name
