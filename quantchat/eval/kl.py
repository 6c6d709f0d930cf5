"""KL divergence of a model's next-token distributions from a reference model's, window by window.

Like llama.cpp's ``perplexity --kl-divergence``: over the same windows as the perplexity (see
``quantchat.eval.perplexity``), for every scored position, KL(P_ref || P_model) =
sum_v p_ref(v) (log p_ref(v) - log p_model(v)) in nats, whether both pick the same most likely
token (top-1 agreement), both perplexities, and the change in the probability of the actual next
token (delta p). Both models run in the same process on the same token ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from quantchat.errors import QuantchatError
from quantchat.eval.perplexity import LogitsFn, PerplexityResult, count_windows, iter_windows

PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0)
ROW_CHUNK = 128  # positions per float64 log-softmax (bounds memory for large vocabularies)


@dataclass
class KLResult:
    kl: Tensor  # [tokens] float64, per scored position
    delta_p: Tensor  # [tokens] float64, p_model(next) - p_ref(next)
    top1_agree: int
    reference: PerplexityResult
    model: PerplexityResult
    window_kl: list[float] = field(default_factory=list)  # mean KL of each window

    @property
    def tokens(self) -> int:
        return int(self.kl.numel())

    @property
    def mean(self) -> float:
        return float(self.kl.mean())

    def summary(self) -> dict:
        n = self.tokens
        kl = self.kl
        std = float(kl.std()) if n > 1 else 0.0
        q = torch.quantile(kl, torch.tensor([p / 100 for p in PERCENTILES], dtype=kl.dtype)).tolist()
        agree = self.top1_agree / n
        return {
            "tokens": n,
            "windows": self.reference.windows,
            "kl_mean": float(kl.mean()),
            "kl_mean_stderr": std / math.sqrt(n),
            "kl_max": float(kl.max()),
            "kl_min": float(kl.min()),
            "kl_percentiles": {f"p{p:g}": v for p, v in zip(PERCENTILES, q)},
            "kl_median": q[PERCENTILES.index(50.0)],
            "top1_agreement": agree,
            "top1_agreement_stderr": math.sqrt(agree * (1 - agree) / n),
            "ppl_reference": self.reference.ppl,
            "ppl_model": self.model.ppl,
            "ppl_ratio": self.model.ppl / self.reference.ppl,
            "ln_ppl_ratio": (self.model.nll_sum - self.reference.nll_sum) / n,
            "delta_p_mean": float(self.delta_p.mean()),
            "delta_p_rms": float(self.delta_p.pow(2).mean().sqrt()),
        }


def _window_stats(ref: Tensor, mod: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, int, float, float]:
    """Per position KL and delta p; top-1 agreements; NLL sums of ref and model for one window."""
    kls, dps, agree, nll_r, nll_m = [], [], 0, 0.0, 0.0
    for s in range(0, ref.shape[0], ROW_CHUNK):
        lr = F.log_softmax(ref[s:s + ROW_CHUNK].double(), dim=-1)
        lm = F.log_softmax(mod[s:s + ROW_CHUNK].double(), dim=-1)
        pr = lr.exp()
        kl = torch.where(pr > 0, pr * (lr - lm), torch.zeros_like(pr)).sum(-1).clamp_min(0.0)
        t = targets[s:s + ROW_CHUNK, None]
        tr, tm = lr.gather(1, t)[:, 0], lm.gather(1, t)[:, 0]
        kls.append(kl.cpu())
        dps.append((tm.exp() - tr.exp()).cpu())
        agree += int((lr.argmax(-1) == lm.argmax(-1)).sum())
        nll_r -= float(tr.sum())
        nll_m -= float(tm.sum())
    return torch.cat(kls), torch.cat(dps), agree, nll_r, nll_m


@torch.inference_mode()
def kl_divergence(
    reference_fn: LogitsFn, model_fn: LogitsFn, ids: list[int], window: int = 512, stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> KLResult:
    """KL(reference || model) over the windows of ``ids`` (both functions see the same spans)."""
    total = count_windows(len(ids), window, stride) if progress else 0
    ref_res, mod_res = PerplexityResult(0.0, 0, 0), PerplexityResult(0.0, 0, 0)
    kls, dps, agree, window_kl = [], [], 0, []
    windows = zip(iter_windows(reference_fn, ids, window, stride), iter_windows(model_fn, ids, window, stride))
    for i, ((span, ref, targets), (_, mod, _)) in enumerate(windows):
        if ref.shape != mod.shape:
            raise QuantchatError(
                f"the models' vocabularies differ ({ref.shape[-1]} vs {mod.shape[-1]} logits): "
                "KL needs the same tokenizer on both sides"
            )
        kl, dp, a, nll_r, nll_m = _window_stats(ref, mod.to(ref.device), targets)
        kls.append(kl)
        dps.append(dp)
        agree += a
        window_kl.append(float(kl.mean()))
        ref_res.add_window(nll_r, len(targets))
        mod_res.add_window(nll_m, len(targets))
        if progress:
            progress(i + 1, total)
    return KLResult(torch.cat(kls), torch.cat(dps), agree, ref_res, mod_res, window_kl)


def check_same_tokenizer(tok_a, tok_b, probe: str) -> None:
    """Raise unless both tokenizers encode ``probe`` to the same ids (and have the same vocabulary size)."""
    if tok_a.vocab_size != tok_b.vocab_size or tok_a.encode(probe, add_bos=False) != tok_b.encode(probe, add_bos=False):
        raise QuantchatError(
            "the model and the reference tokenize differently; KL compares next-token distributions "
            "and needs the same tokenizer (compare a quantized model with the model it came from)"
        )
