"""Calibration data for GPTQ/AWQ, and running the decoder block by block on it.

The default text is Python's own documentation (``pydoc_data.topics``, bundled with CPython), so
calibration needs no download. GPTQ and AWQ both use random windows of a fixed length from a
tokenized text (the papers take 128 windows of 2048 / 512 tokens from C4 / the Pile).

The block-runner helpers feed hidden states through one ``TransformerBlock`` at a time, in chunks
of a few sequences, with the same rope tables and sliding-window mask as ``Transformer.forward``
(plain causal pass, no KV cache).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from quantchat.errors import QuantchatError
from quantchat.model.transformer import Context

Progress = Callable[[int, int], None] | None  # (blocks done, blocks in all)
# the built-in corpus's first tokens are what `quantchat eval ppl` scores by default: calibration windows
# from the built-in corpus start after them, so quantization never sees the text it is judged on
EVAL_TOKENS = 32768


def builtin_corpus() -> str:
    """Python's bundled pydoc topic texts (sorted by key), joined with blank lines: ~465k characters."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_batches(
    tokenizer, n_samples: int = 128, seq_len: int = 512, text: str | None = None, seed: int = 0,
    consecutive: bool = False,
) -> Tensor:
    """Token windows [n_samples, seq_len] (int64) from ``text`` (default: ``builtin_corpus()``).

    The text is tokenized once (no BOS). Windows start at seeded random offsets (they may overlap),
    or, with ``consecutive``, tile the token stream from its start without overlap. From the built-in
    corpus, only tokens after the first ``EVAL_TOKENS`` (the perplexity benchmark's) are used.
    """
    if n_samples < 1 or seq_len < 1:
        raise QuantchatError(f"calibration needs n_samples >= 1 and seq_len >= 1 (got {n_samples}, {seq_len})")
    ids = torch.tensor(tokenizer.encode(builtin_corpus() if text is None else text, add_bos=False),
                       dtype=torch.long)
    if text is None:
        ids = ids[EVAL_TOKENS:]
    need = n_samples * seq_len if consecutive else seq_len
    if ids.numel() < need:
        what = f"{n_samples} consecutive windows of {seq_len}" if consecutive else f"a window of {seq_len}"
        raise QuantchatError(
            f"calibration text too short: {ids.numel()} tokens, {what} needs {need}; "
            "give a longer text or use fewer/shorter samples"
        )
    if consecutive:
        return ids[:need].view(n_samples, seq_len).clone()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=g)
    return ids[starts[:, None] + torch.arange(seq_len)]


def limit_tokens(calib: Tensor, max_tokens: int | None) -> Tensor:
    """The first sequences of ``calib`` [n, T] holding at most ``max_tokens`` tokens (at least one row,
    cut to ``max_tokens`` positions if a single row is longer)."""
    if max_tokens is None:
        return calib
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    n, T = calib.shape
    if T > max_tokens:
        return calib[:1, :max_tokens]
    return calib[: max(1, min(n, max_tokens // T))]


# -- block-by-block forward ---------------------------------------------------------------------

def block_context(model: nn.Module, seq_len: int) -> Context:
    """The layers' inputs for a plain causal pass of ``seq_len`` tokens, as ``Transformer.forward``."""
    return model.context(1, seq_len)


@torch.no_grad()
def embed(model: nn.Module, calib: Tensor) -> Tensor:
    """Hidden states entering block 0 [n, T, dim]."""
    return model.embed(calib.to(model.device))


def block_forward(layer: nn.Module, x: Tensor, ctx: Context) -> Tensor:
    """One ``TransformerBlock`` on x [B, T, dim] (plain causal, no cache)."""
    return layer(x, ctx)


def attention_forward(attention: nn.Module, x: Tensor, ctx: Context) -> Tensor:
    """The attention sub-module on its (normalized) input x [B, T, dim]."""
    return attention(x, ctx)


def chunks(n: int, batch_size: int) -> Iterator[slice]:
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


@torch.no_grad()
def run_block_(layer: nn.Module, x: Tensor, ctx: Context, batch_size: int = 8) -> Tensor:
    """Replace x [n, T, dim] by the block's output, in place, ``batch_size`` sequences at a time."""
    for sl in chunks(x.shape[0], batch_size):
        x[sl] = block_forward(layer, x[sl], ctx)
    return x


class _AllCaptured(Exception):
    """Raised by ``feed_linear_inputs``'s hooks once every watched module has seen this chunk's input."""


@torch.no_grad()
def feed_linear_inputs(
    layer: nn.Module, x: Tensor, ctx: Context, modules: dict[str, nn.Module],
    take: Callable[[str, Tensor], None], batch_size: int = 8,
) -> None:
    """Run the block on x [n, T, dim], ``batch_size`` sequences at a time, calling ``take(name, input)``
    with the input of each module in ``modules`` (forward pre-hooks). The block's output is not needed,
    so each chunk's forward stops as soon as the last watched module has its input: the work after it
    (for the four block linears: the w2 matmul, the residual, a post-norm) is skipped."""
    seen: set[str] = set()

    def hook(name: str):
        def pre(_m: nn.Module, inp: tuple[Tensor, ...]) -> None:
            take(name, inp[0])
            seen.add(name)
            if len(seen) == len(modules):
                raise _AllCaptured
        return pre

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for sl in chunks(x.shape[0], batch_size):
            seen.clear()
            try:
                block_forward(layer, x[sl], ctx)
            except _AllCaptured:
                pass
            if len(seen) != len(modules):
                raise RuntimeError(f"the block never called {sorted(set(modules) - seen)}")
    finally:
        for h in hooks:
            h.remove()
