"""llama.cpp as a peer, through the optional ``llama-cpp-python`` package (``pip install 'quantchat[peer]'``).

``LlamaCppPeer`` opens a GGUF with all-token logits and scores a token stream with the same windows
as quantchat's perplexity (``quantchat.eval.perplexity.window_spans``): each window is evaluated
from an empty KV cache, so both engines see exactly the same tokens and context.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from quantchat.errors import QuantchatError

INSTALL_HINT = "pip install 'quantchat[peer]' (or: pip install llama-cpp-python)"


def import_llama_cpp():
    """The ``llama_cpp`` module, or a one-line QuantchatError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise QuantchatError(
            f"--peer llama.cpp needs the llama-cpp-python package, which is not installed ({e}): {INSTALL_HINT}"
        ) from None
    return llama_cpp


def llama_cpp_version() -> str | None:
    try:
        return import_llama_cpp().__version__
    except QuantchatError:
        return None


class LlamaCppPeer:
    """One GGUF opened by llama.cpp with logits for every position of a window of up to ``n_ctx`` tokens."""

    def __init__(self, gguf_path: str | os.PathLike[str], n_ctx: int = 512, n_threads: int | None = None,
                 n_batch: int = 512, verbose: bool = False) -> None:
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
        return torch.from_numpy(self.llm.scores[:len(ids)].copy())

    def perplexity(self, ids: list[int], window: int = 512, stride: int | None = None,
                   progress: Callable[[int, int], None] | None = None):
        """llama.cpp's perplexity over ``ids`` with quantchat's windows: a ``PerplexityResult``."""
        from quantchat.eval.perplexity import score_windows

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
