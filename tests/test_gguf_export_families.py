"""GGUF export of every family (quant/gguf_export.py): qwen2, gemma3, gpt2, mpt and falcon files that
llama.cpp loads and runs as quantchat does.

Each tiny model is a random transformers model written as llama.cpp's converter would
(tests/test_gguf_families.py ``write_gguf``; gemma3 from its own folder); quantchat exports it as Q8_0 under
its own architecture. The export read back by quantchat stays within Q8_0's error of the source, and
llama.cpp (llama-cpp-python, where installed) computes the same logits from it: the independent check of
the names, layouts and metadata.
"""

from __future__ import annotations

import numpy as np
import pytest

from quantchat.errors import QuantchatError
from quantchat.loading.gguf_io import read_gguf
from quantchat.loading.hf_loader import load_model
from quantchat.loading.resolve import resolve_model
from quantchat.quant.gguf_export import export_gguf, gguf_tensors, n_gguf_tensors
from test_gguf_families import CASES, build, write_gguf

torch = pytest.importorskip("torch")
# the families llama.cpp's graph runs; falcon-new-arch-1ln: llama.cpp's falcon graph needs the two-norm form
EXPORT_CASES = ["qwen2", "qwen2-untied", "gpt2", "gpt2-untied", "mpt", "mpt-6heads-clip", "falcon-7b-layout",
                "falcon-new-arch"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("QUANTCHAT_HOME", str(tmp_path / "home"))


def rel_mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a.astype(np.float64) - b) ** 2).sum() / (b.astype(np.float64) ** 2).sum())


def seq(n_vocab: int) -> list[int]:
    """12 random token ids (past the first few specials) of a vocabulary of ``n_vocab``."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, n_vocab, (12,), generator=g).tolist()


def quantchat_logits(path) -> tuple[np.ndarray, list[int]]:
    """quantchat's logits for ``seq`` of the model's vocabulary, and those ids."""
    model = load_model(resolve_model(str(path)).hf_dir)
    ids = seq(model.config.vocab_size)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy(), ids


def llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    try:
        llm.eval(ids)
        return np.asarray(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_runs_in_quantchat_and_llama_cpp(tmp_path, case):
    arch, _ = CASES[case]
    src = tmp_path / "src.gguf"
    write_gguf(src, arch, build(case))
    res = export_gguf(src, tmp_path / "out.gguf", "q8_0")
    g = read_gguf(res.path)
    assert g.architecture == arch
    model = load_model(resolve_model(str(src)).hf_dir)
    assert n_gguf_tensors(model) == len(list(gguf_tensors(model))) == len(g.tensor_names)
    want, _ = quantchat_logits(src)
    ours, ids = quantchat_logits(res.path)
    assert rel_mse(ours, want) < 1e-3  # Q8_0's rounding of the linears
    theirs = llama_cpp_logits(res.path, ids)
    assert rel_mse(theirs, ours) < 1e-3, case  # llama.cpp also rounds the activations to 8 bits
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.8


def test_sequential_falcon_is_refused(tmp_path):
    from test_families import build as build_hf

    build_hf(tmp_path / "m", "falcon-sequential")
    with pytest.raises(QuantchatError, match="parallel only"):
        export_gguf(tmp_path / "m", tmp_path / "out.gguf", "q8_0")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("pattern", [3, None], ids=["every-3rd-global", "default-pattern"])
def test_gemma3_export_runs_in_quantchat_and_llama_cpp(tmp_path, pattern):
    """Gemma 3: q/k norms, sandwich norms, norms stored + 1, sliding layers (a pattern of its own is
    written as a per-layer array), soft-capping; llama.cpp reads the same model from the export."""
    from test_gguf_gemma3 import write_tiny_gemma3_gguf

    src = tmp_path / "src.gguf"
    write_tiny_gemma3_gguf(src, pattern=pattern)
    res = export_gguf(src, tmp_path / "out.gguf", "q8_0")
    assert read_gguf(res.path).architecture == "gemma3"
    a = load_model(resolve_model(str(src)).hf_dir).config
    b = load_model(resolve_model(str(res.path)).hf_dir).config
    for field in ("sliding_layers", "sliding_window", "rope_local_theta", "final_softcap", "head_dim"):
        assert getattr(a, field) == getattr(b, field), field
    ours, ids = quantchat_logits(res.path)
    assert rel_mse(ours, quantchat_logits(src)[0]) < 1e-3
    theirs = llama_cpp_logits(res.path, ids)
    assert rel_mse(theirs, ours) < 1e-3
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.8
