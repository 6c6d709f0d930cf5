"""Tokenizers built from llama.cpp's vocab-only GGUFs give llama.cpp's reference ids exactly.

The vectors are llama.cpp's ``models/ggml-vocab-*.gguf{,.inp,.out}`` (see tests/data/vocab/README.md),
read as ``tests/test-tokenizer-0.cpp`` reads them: texts split on ``\\n__ggml_vocab_test__\\n``, one
line of space-separated ids per text, tokenized with ``add_special=false, parse_special=false`` (so
no BOS; none of the texts spells a special token, so quantchat's always-on special-token matching
changes nothing). No network: the GGUFs are stored xz-compressed and decompressed into a temp dir.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path

import pytest

from quantchat.tokenizer.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data" / "vocab"
SEP = "\n__ggml_vocab_test__\n"

# vocab -> (sha256 of the upstream .gguf, llama.cpp adds BOS with add_special=true)
VOCABS = {
    "gpt-2": ("cedc56ca6e2e89f63e781696d1fd76b4b1d49e6720dee86463e915f6e90016ac", False),
    "mpt": ("59dc382612866d1fc6c11ea531318d327598f3412d9c8f8600607cdf3030898f", False),
    "falcon": ("9f0bf8b0733680398b72e652e90f260f43782f326e75545fc0e49611a5ba35ad", False),
    "qwen2": ("44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c", False),
    "llama-spm": ("16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69", True),
    "llama-bpe": ("97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e", True),
    "gemma-4": ("58b1ba0b57f3b4d7c468ba4ffd91ad85190346a3d7ad7e71d1cabaae8a14bb65", True),
}


def read_cases(name: str) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs as llama.cpp's test-tokenizer-0 reads them (a trailing separator ends the list)."""
    raw = (DATA / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    texts = raw.split(SEP)
    if raw.endswith(SEP):
        texts.pop()
    lines = (DATA / f"ggml-vocab-{name}.gguf.out").read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert len(texts) == len(lines), f"{name}: {len(texts)} texts but {len(lines)} id lines"
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


@pytest.fixture(scope="module", params=list(VOCABS))
def vocab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Tokenizer]:
    """(name, quantchat's tokenizer built from the decompressed GGUF), once per vocab."""
    name = request.param
    path = tmp_path_factory.mktemp("vocab") / f"ggml-vocab-{name}.gguf"
    data = lzma.decompress((DATA / f"ggml-vocab-{name}.gguf.xz").read_bytes())
    assert hashlib.sha256(data).hexdigest() == VOCABS[name][0], f"{name}: not the upstream GGUF"
    path.write_bytes(data)
    return name, Tokenizer.from_gguf(path)


def test_cases_read_like_llama_cpp() -> None:
    for name in VOCABS:
        cases = read_cases(name)
        assert len(cases) == 46, name
        assert cases[0][0] == "ied 4 ½ months" and cases[2] == ("", [])


def test_ids_match_llama_cpp(vocab: tuple[str, Tokenizer]) -> None:
    name, tok = vocab
    cases = read_cases(name)
    failed = [(text, want, got) for text, want in cases if (got := tok.encode(text, add_bos=False)) != want]
    assert not failed, f"{name}: {len(cases) - len(failed)}/{len(cases)} texts match; first failures: " + "; ".join(
        f"{text!r}: want {want} got {got}" for text, want, got in failed[:3]
    )


def test_decode_round_trips(vocab: tuple[str, Tokenizer]) -> None:
    """llama.cpp's test only prints the detokenized text; for these texts it is the text itself."""
    name, tok = vocab
    for text, ids in read_cases(name):
        assert tok.decode(ids) == text, f"{name}: {text!r}"


def test_bos_like_llama_cpp(vocab: tuple[str, Tokenizer]) -> None:
    name, tok = vocab
    assert tok.add_bos is VOCABS[name][1], name
    ids = tok.encode("Hello world")
    assert (ids[0] == tok.bos_id) is VOCABS[name][1], name
    assert tok.encode("Hello world", add_bos=False) == ids[int(tok.add_bos):]


def test_from_dir_gives_the_same_ids(vocab: tuple[str, Tokenizer], tmp_path: Path) -> None:
    """The tokenizer.json + configs written for a GGUF load back to the same tokenizer."""
    name, tok = vocab
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok.config, ensure_ascii=False))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(tok.special_tokens_map, ensure_ascii=False))
    again = Tokenizer.from_dir(tmp_path)
    assert again.add_bos == tok.add_bos and again.eos_ids == tok.eos_ids
    for text, ids in read_cases(name):
        assert again.encode(text, add_bos=False) == ids, f"{name}: {text!r}"


@pytest.mark.parametrize("vocab", ["gemma-4"], indirect=True)
def test_gemma4_details(vocab: tuple[str, Tokenizer]) -> None:
    """Gemma 4: a newline run that is a token is taken whole (llama.cpp's special case); its EOG tokens."""
    _, tok = vocab
    for n in range(1, 32):
        assert tok.encode("\n" * n, add_bos=False) == [tok.token_to_id("\n" * n)], n
    assert {tok.id_to_token(i) for i in tok.eos_ids} == {"<eos>", "<turn|>", "<|tool_response>"}
