"""llama.cpp as a peer, through the optional ``llama-cpp-python`` package (``pip install 'quantchat[peer]'``;
it builds llama.cpp from source on install): ``require_llama_cpp`` turns its absence into one clear error.

Speed (``measure_llamacpp``, the ``quantchat bench --peer llama.cpp`` worker) is measured the way
``quantchat bench`` measures quantchat. Decode: a short fixed prompt, then ``warmup`` + ``steps`` greedy steps of one token each
(``Llama.eval([token])`` + argmax over the returned logits), each timed step on its own; median
latency. Time to first token: the prompt into an emptied KV cache (``Llama.eval(prompt)``, batches of
512 as quantchat's prefill chunks) + argmax. Same token ids (``measure.prompt_ids``), same threads.

Quality (``LlamaCppPeer``, ``quantchat eval ppl --peer llama.cpp``) opens a GGUF with all-token logits and
scores a token stream with the same windows as quantchat's perplexity (``eval.perplexity.window_spans``):
each window is evaluated from an empty KV cache, so both engines see exactly the same tokens and context.

Torch is imported by ``LlamaCppPeer`` only: the speed worker's resident memory must not include torch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from quantchat.benchmark.measure import measure_speed, proc_status_mb
from quantchat.errors import QuantchatError
from quantchat.loading.gguf_io import gguf_main_type, gguf_types

if TYPE_CHECKING:
    import torch

INSTALL_HINT = ("pip install 'quantchat[peer]' (or: pip install llama-cpp-python; it compiles llama.cpp, "
                "a few minutes)")
PREFILL_BATCH = 512  # quantchat's prefill chunk (engine.generate.PREFILL_CHUNK)


def import_llama_cpp():
    """The ``llama_cpp`` module (an optional dependency), or a one-line QuantchatError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise QuantchatError(f"--peer llama.cpp needs llama-cpp-python, which is not installed ({e}); "
                             f"install it with: {INSTALL_HINT}") from None
    return llama_cpp


def require_llama_cpp() -> str:
    """The llama-cpp-python version, or a QuantchatError with the install hint."""
    return getattr(import_llama_cpp(), "__version__", "?")


def peer_build_info() -> dict:
    """How the installed llama.cpp was built: the flags recorded by scripts/build_llamacpp_peer.sh (in the
    environment's prefix) and llama.cpp's own system info (the CPU features it was compiled for)."""
    info: dict = {}
    recorded = Path(sys.prefix) / "quantchat-peer-build.json"
    try:
        info.update(json.loads(recorded.read_text()))
    except (OSError, ValueError):
        pass
    try:
        info["system_info"] = import_llama_cpp().llama_print_system_info().decode(errors="replace").strip()
    except Exception:  # noqa: BLE001 - not installed / an old binding: the recorded part stands
        pass
    return info


def gguf_bits_family(main_type: str) -> str:
    """'4bit', '8bit' or 'float' for a GGUF type name (Q4_0, Q4_1, Q4_K, Q8_0, F16...)."""
    t = main_type.upper()
    if t.startswith("Q8"):
        return "8bit"
    if t.startswith(("Q4", "IQ4")):
        return "4bit"
    if t in ("F32", "F16", "BF16"):
        return "float"
    return t.lower()


def _logits_argmax(llm, np) -> int:
    """Greedy token from the last evaluated position's logits."""
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def measure_llamacpp(job: dict) -> dict:
    """Run the benchmark job (see quantchat.benchmark.worker) on llama.cpp; the worker's result format."""
    t0 = time.perf_counter()
    llama_cpp = import_llama_cpp()
    version = getattr(llama_cpp, "__version__", "?")
    import numpy as np  # comes with llama-cpp-python

    import_s = time.perf_counter() - t0
    gguf = Path(job["model"])
    threads = int(job["threads"])
    mem0 = proc_status_mb()
    t0 = time.perf_counter()
    probe_ctx = int(job.get("max_seq_len") or 2048)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=probe_ctx, n_batch=PREFILL_BATCH, n_ubatch=PREFILL_BATCH,
                          n_threads=threads, n_threads_batch=threads, n_gpu_layers=job.get("n_gpu_layers", 0),
                          logits_all=False, verbose=False, seed=0)
    load_s = time.perf_counter() - t0
    mem1 = proc_status_mb()
    vocab = llm.n_vocab()
    try:
        context = int(llm._model.n_ctx_train())
    except AttributeError:  # private API moved: the context we asked for is what we can use anyway
        context = int(llm.n_ctx())
    res: dict = {"engine": "llama.cpp", "llama_cpp_python": version, "threads": threads, "import_s": import_s,
                 "load_s": load_s, "gguf": str(gguf), "context": context, "max_seq_len": llm.n_ctx(),
                 "vocab_size": vocab, "device": "cpu" if not job.get("n_gpu_layers") else "gpu offload",
                 "rss_before_load_mb": mem0.get("VmRSS"), "rss_after_load_mb": mem1.get("VmRSS"),
                 "rss_anon_after_load_mb": mem1.get("RssAnon"), "rss_file_after_load_mb": mem1.get("RssFile")}
    try:
        types = gguf_types(gguf)
        res["gguf_types"] = types
        res["gguf_main_type"] = gguf_main_type(types)
    except QuantchatError as e:
        res["gguf_types_error"] = str(e)

    def prefill(tokens: list[int]) -> int:
        llm.reset()  # n_tokens = 0: eval() then drops the old cache entries from position 0
        llm.eval(tokens)
        return _logits_argmax(llm, np)

    def step(tok: int, pos: int) -> int:
        if llm.n_tokens != pos:
            raise RuntimeError(f"llama.cpp at position {llm.n_tokens}, expected {pos}")
        llm.eval([tok])
        return _logits_argmax(llm, np)

    res.update(measure_speed(prefill, step, vocab, min(context, llm.n_ctx()), job))
    llm.close()
    return res


class LlamaCppPeer:
    """One GGUF opened by llama.cpp with logits for every position of a window of up to ``n_ctx`` tokens."""

    def __init__(self, gguf_path: str | os.PathLike[str], n_ctx: int = 512, n_threads: int | None = None,
                 n_batch: int = 512, verbose: bool = False) -> None:
        import torch  # here, not at the top: the speed worker (measure_llamacpp) must not load torch

        llama_cpp = import_llama_cpp()
        path = Path(gguf_path)
        if path.suffix.lower() != ".gguf" or not path.is_file():
            raise QuantchatError(f"{path}: llama.cpp needs a .gguf file")
        self.path = path
        self.n_ctx = n_ctx
        self.n_threads = n_threads or torch.get_num_threads()
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_ubatch=min(n_batch, n_ctx),
                n_threads=self.n_threads, n_threads_batch=self.n_threads, logits_all=True, verbose=verbose,
            )
        except (ValueError, RuntimeError) as e:
            raise QuantchatError(f"{path}: llama.cpp cannot open it ({e})") from None
        self.version = getattr(llama_cpp, "__version__", "?")

    @property
    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits [len(ids), n_vocab] (float32) for a window evaluated from an empty cache."""
        if len(ids) > self.n_ctx:
            raise QuantchatError(f"window of {len(ids)} tokens exceeds llama.cpp's context of {self.n_ctx}")
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise QuantchatError(f"token id {bad[0]} is outside llama.cpp's vocabulary of {self.n_vocab}")
        self.llm.reset()
        self.llm.eval(list(ids))
        import torch

        return torch.from_numpy(self.llm.scores[:len(ids)].copy())

    def perplexity(self, ids: list[int], window: int = 512, stride: int | None = None,
                   progress: Callable[[int, int], None] | None = None):
        """llama.cpp's perplexity over ``ids`` with quantchat's windows: a ``PerplexityResult``."""
        from quantchat.eval.perplexity import score_windows  # imports torch (see __init__)

        if window > self.n_ctx:
            raise QuantchatError(f"window {window} exceeds llama.cpp's context of {self.n_ctx}")
        return score_windows(lambda s, e: self.logits(ids[s:e]), ids, window, stride, progress)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

    def __enter__(self) -> LlamaCppPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
