"""Rebuild a Hugging Face tokenizer (tokenizer.json + configs) from a GGUF file's metadata.

A GGUF carries no tokenizer.json, only llama.cpp's ``tokenizer.ggml.*`` keys. We rebuild one with
the ``tokenizers`` library so that it splits text exactly as llama.cpp does (src/llama-vocab.cpp):

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE; the pre-tokenizer regexes are chosen by
  ``tokenizer.ggml.pre`` from llama.cpp's table (e.g. "smollm" = ``\\p{N}`` then the GPT-2 regex).
* ``tokenizer.ggml.model == "llama"``: SentencePiece BPE with scores, byte-fallback ``<0x..>``
  tokens, spaces as "▁" and a "▁" prefix on each text run (``add_space_prefix``).
* ``tokenizer.ggml.model == "gemma4"``: BPE with ranked merges over raw UTF-8 (no byte-level
  mapping), spaces as "▁" (no prefix), text split only into newline / non-newline runs, a
  newline run that is itself a token taken whole, byte-fallback ``<0x..>`` tokens; BOS always on.

Control (3) and unknown (2) tokens become special added tokens; user-defined (4) ones become
added, non-special tokens (always matched whole, and kept when special tokens are skipped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from quantchat.errors import ModelLoadError
from quantchat.tokenizer.chat_template import GEMMA as GEMMA_TEMPLATE

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

SPIECE_SPACE = "\u2581"  # "▁"

# Tokens llama.cpp treats as end-of-generation by their text (llama-vocab.cpp); made special here.
EOG_TOKEN_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>", "<turn|>", "<|tool_response>",
)

# --- pre-tokenizer regexes, as in llama.cpp's llm_tokenizer_bpe (tokenizer.json spelling) ---
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + "(?:" + _CONTRACTIONS + ")?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + "(?:" + _CONTRACTIONS + ")?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
_DEEPSEEK3 = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]
_NEWLINE_RUNS = r"[^\n]+|[\n]+"
_FALCON = [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"]


def _pre(
    regexes: list[str], ignore_merges: bool = False, add_bos: bool = False, byte_encode: bool = True
) -> dict[str, Any]:
    """One pre-tokenizer spec; byte_encode False: raw UTF-8 with "▁" spaces and <0x..> byte tokens."""
    return {"regexes": regexes, "ignore_merges": ignore_merges, "add_bos": add_bos, "byte_encode": byte_encode,
            "byte_fallback": not byte_encode}


def _table() -> dict[str, dict[str, Any]]:
    t: dict[str, dict[str, Any]] = {"default": _pre(_DEFAULT), "falcon": _pre(_FALCON)}
    for n in ("gpt2", "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
              "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4",
              "jina-v1-en", "jina-v2-code", "roberta-bpe"):
        t[n] = _pre([_GPT2])
    for n in ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"):
        t[n] = _pre([r"\p{N}", _GPT2])
    for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
              "jina-v5-nano"):
        t[n] = _pre([_LLAMA3], ignore_merges=True, add_bos=True)
    for n in ("dbrx", "smaug-bpe", "chatglm-bpe"):
        t[n] = _pre([_LLAMA3])
    for n in ("glm4", "glm5"):
        t[n] = _pre([_LLAMA3], ignore_merges=True)
    for n in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open",
              "grok-2"):
        t[n] = _pre([_QWEN2])
    t["qwen35"] = _pre([_QWEN35])
    t["tekken"] = _pre([_TEKKEN], ignore_merges=True, add_bos=True)
    for n in ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"):
        t[n] = _pre([_GPT4O])
    t["seed-coder"] = _pre([_SEED_CODER])
    for n in ("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"):
        t[n] = _pre(list(_DEEPSEEK3))
    # SentencePiece-style BPE (llama.cpp forces BOS on for Gemma 4)
    t["gemma4"] = _pre([_NEWLINE_RUNS], add_bos=True, byte_encode=False)
    return t


PRE_TOKENIZERS: dict[str, dict[str, Any]] = _table()


def _gguf_name(reader: gguf.GGUFReader) -> str:
    """The file a reader was opened on, for error messages."""
    return str(getattr(reader.data, "filename", None) or "<gguf>")


def _get(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_tokenizer_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The ``tokenizer.*`` keys (short names) plus architecture, model name and context length."""
    meta: dict[str, Any] = {}
    for key in reader.fields:
        if key.startswith("tokenizer."):
            meta[key[len("tokenizer."):]] = reader.fields[key].contents()
    arch = _get(reader, "general.architecture")
    meta["architecture"] = arch
    meta["model_name"] = _get(reader, "general.name")
    meta["context_length"] = _get(reader, f"{arch}.context_length") if arch else None
    meta["source"] = _gguf_name(reader)
    return meta


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _regex_pre_tokenizer(regexes: list[str]) -> pre_tokenizers.PreTokenizer:
    """Isolating splits by each regex in turn, then the byte-level mapping (as llama.cpp does)."""
    steps: list[pre_tokenizers.PreTokenizer] = []
    for i, rx in enumerate(regexes):
        last = i == len(regexes) - 1
        if rx == r"\p{N}":
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        elif rx == _GPT2 and last:
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
            return pre_tokenizers.Sequence(steps)
        else:
            steps.append(pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _tokens(meta: dict[str, Any]) -> list[str]:
    tokens = meta.get("ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{meta['source']}: no tokenizer.ggml.tokens in the GGUF metadata")
    # llama.cpp renames empty tokens so that every id keeps a distinct text
    return [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]


def _vocab(tokens: list[str], meta: dict[str, Any]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise ModelLoadError(f"{meta['source']}: duplicate token {t!r} (ids {vocab[t]} and {i}) in the vocabulary")
        vocab[t] = i
    return vocab


def _pre_spec(meta: dict[str, Any]) -> dict[str, Any]:
    """The PRE_TOKENIZERS entry for this metadata (gemma4 vocabularies always use "gemma4")."""
    pre_name = "gemma4" if meta.get("ggml.model") == "gemma4" else meta.get("ggml.pre") or "default"
    spec = PRE_TOKENIZERS.get(pre_name)
    if spec is None:
        raise ModelLoadError(
            f"{meta['source']}: unsupported pre-tokenizer tokenizer.ggml.pre={pre_name!r} "
            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    return spec


def _merges(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges as (left, right) pairs, in rank order."""
    raw_merges = meta.get("ggml.merges")
    if not raw_merges:
        raise ModelLoadError(f"{meta['source']}: BPE tokenizer without tokenizer.ggml.merges")
    merges = []
    for m in raw_merges:
        pos = m.find(" ", 1)  # like llama.cpp: the first space after the first character
        if pos < 0:
            raise ModelLoadError(f"{meta['source']}: malformed BPE merge {m!r}")
        merges.append((m[:pos], m[pos + 1:]))
    return merges


def _bpe_model(meta: dict[str, Any], tokens: list[str]) -> tuple[models.Model, dict[str, Any]]:
    spec = _pre_spec(meta)
    model = models.BPE(
        vocab=_vocab(tokens, meta), merges=_merges(meta), unk_token=None, fuse_unk=False,
        byte_fallback=spec["byte_fallback"], ignore_merges=spec["ignore_merges"],
    )
    return model, spec


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: best-scored merged piece first.

    llama.cpp's SPM tokenizer merges the adjacent pair whose concatenation is the highest-scored
    token; ranking every (left, right) split of each token by that score reproduces it.
    """
    usable = {t: i for i, t in enumerate(tokens) if types[i] not in (TOKEN_BYTE, TOKEN_CONTROL, TOKEN_UNKNOWN)}
    ranked = []
    for piece, pid in usable.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in usable and right in usable:
                ranked.append((-scores[pid], pid, usable[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm_model(meta: dict[str, Any], tokens: list[str], types: list[int]) -> models.Model:
    scores = meta.get("ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ModelLoadError(f"{meta['source']}: SentencePiece tokenizer without per-token tokenizer.ggml.scores")
    scores = [float(s) for s in scores]
    unk_id = meta.get("ggml.unknown_token_id", 0)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    has_bytes = any(t == TOKEN_BYTE for t in types)
    return models.BPE(
        vocab=_vocab(tokens, meta), merges=_spm_merges(tokens, scores, types), unk_token=unk, fuse_unk=True,
        byte_fallback=has_bytes,
    )


def _special_ids(meta: dict[str, Any], n: int) -> dict[str, int | None]:
    """bos/eos/unk/pad ids, with llama.cpp's defaults for SentencePiece vocabularies."""
    spm = meta.get("ggml.model") == "llama"
    defaults: dict[str, int | None] = {"bos": 1, "eos": 2, "unk": 0, "pad": None} if spm else {}
    keys = {"bos": "ggml.bos_token_id", "eos": "ggml.eos_token_id", "unk": "ggml.unknown_token_id",
            "pad": "ggml.padding_token_id"}
    out: dict[str, int | None] = {}
    for name, key in keys.items():
        v = meta.get(key, defaults.get(name))
        out[name] = int(v) if v is not None and 0 <= int(v) < n else None
    return out


def _added_tokens(
    meta: dict[str, Any], tokens: list[str], types: list[int], ids: dict[str, int | None]
) -> list[AddedToken]:
    """Control/unknown tokens (special) and user-defined ones (not special), in id order."""
    special = {i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)}
    special |= {i for i in ids.values() if i is not None}
    eog = set(EOG_TOKEN_TEXTS)
    special |= {i for i, t in enumerate(tokens) if t in eog}
    user = {i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED} - special
    # Phi-3: llama.cpp strips whitespace to the right of most special tokens
    name = (meta.get("model_name") or "").lower()
    phi3 = "phi-3" in name or "phi3" in name
    out = []
    for i in sorted(special | user):
        rstrip = phi3 and ((i in special and tokens[i] not in ("<unk>", "<s>", "<|endoftext|>")) or tokens[i] == "</s>")
        out.append(AddedToken(tokens[i], special=i in special, normalized=False, lstrip=False, rstrip=rstrip,
                              single_word=False))
    return out


def default_add_bos(meta: dict[str, Any]) -> bool:
    """llama.cpp's add-BOS rule: the file's flag, else on for SentencePiece and LLaMA-3-style BPE;
    always on for Gemma 4 (llama.cpp overrides a false flag there)."""
    if meta.get("ggml.model") == "gemma4":
        return True
    flag = meta.get("ggml.add_bos_token")
    if flag is not None:
        return bool(flag)
    if meta.get("ggml.model") == "llama":
        return True
    spec = PRE_TOKENIZERS.get(meta.get("ggml.pre") or "default")
    return bool(spec and spec["add_bos"])


def build_tokenizer(meta: dict[str, Any]) -> HFTokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to llama.cpp's for this metadata (see module doc)."""
    kind = meta.get("ggml.model")
    tokens = _tokens(meta)
    types = [int(t) for t in (meta.get("ggml.token_type") or [TOKEN_NORMAL] * len(tokens))]
    if len(types) != len(tokens):
        raise ModelLoadError(
            f"{meta['source']}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )
    ids = _special_ids(meta, len(tokens))
    if kind == "gpt2":
        model, spec = _bpe_model(meta, tokens)
        tok = HFTokenizer(model)
        tok.pre_tokenizer = _regex_pre_tokenizer(spec["regexes"])
        tok.decoder = decoders.ByteLevel()
    elif kind == "gemma4":
        model, spec = _bpe_model(meta, tokens)
        tok = HFTokenizer(model)
        tok.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(spec["regexes"][0]), behavior="isolated", invert=False)
        tok.decoder = decoders.Sequence(
            [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        )
    elif kind == "llama":
        tok = HFTokenizer(_spm_model(meta, tokens, types))
        add_prefix = bool(meta.get("ggml.add_space_prefix", True))
        replace = normalizers.Replace(" ", SPIECE_SPACE)
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), replace]) if add_prefix else replace
        steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
    else:
        raise ModelLoadError(
            f"{meta['source']}: unsupported tokenizer.ggml.model={kind!r} "
            "(supported: 'gpt2', 'llama', 'gemma4')"
        )
    tok.add_tokens(_added_tokens(meta, tokens, types, ids))
    if ids["bos"] is not None and default_add_bos(meta):
        bos = tokens[ids["bos"]]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, ids["bos"])]
        )
    return tok


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The ``tokenizer_config.json`` contents (special tokens, BOS rule, chat template, length)."""
    tokens = _tokens(meta)
    ids = _special_ids(meta, len(tokens))
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": default_add_bos(meta),
        "add_eos_token": bool(meta.get("ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for name in ("bos", "eos", "unk", "pad"):
        cfg[f"{name}_token"] = tokens[ids[name]] if ids[name] is not None else None
    if meta.get("context_length"):
        cfg["model_max_length"] = int(meta["context_length"])
    template = meta.get("chat_template")
    if not template and "<start_of_turn>" in tokens and "<end_of_turn>" in tokens:  # a Gemma GGUF without one
        template = GEMMA_TEMPLATE
    named = [n for n in (meta.get("chat_templates") or []) if meta.get(f"chat_template.{n}")]
    if named:
        cfg["chat_template"] = ([{"name": "default", "template": template}] if template else []) + [
            {"name": n, "template": meta[f"chat_template.{n}"]} for n in named
        ]
    elif template:
        cfg["chat_template"] = template
    cfg["quantchat"] = {
        "source": "gguf",
        "tokenizer_model": meta.get("ggml.model"),
        "tokenizer_pre": meta.get("ggml.pre"),
        "model_name": meta.get("model_name"),
        "architecture": meta.get("architecture"),
    }
    return cfg


def special_tokens_map(meta: dict[str, Any]) -> dict[str, Any]:
    """The ``special_tokens_map.json`` contents."""
    tokens = _tokens(meta)
    ids = _special_ids(meta, len(tokens))
    out: dict[str, Any] = {f"{n}_token": tokens[i] for n, i in ids.items() if i is not None}
    types = meta.get("ggml.token_type") or []
    named = set(out.values())
    extra = [t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL and t not in named]
    if extra:
        out["additional_special_tokens"] = extra
    return out


def write_tokenizer_files(reader: gguf.GGUFReader | str | Path, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for a GGUF into out_dir."""
    if not isinstance(reader, gguf.GGUFReader):
        try:
            reader = gguf.GGUFReader(Path(reader))
        except Exception as e:  # noqa: BLE001 - report any parse failure as one line
            raise ModelLoadError(f"{reader}: cannot read GGUF file: {e}") from e
    meta = read_tokenizer_metadata(reader)
    tok = build_tokenizer(meta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(meta), indent=2, ensure_ascii=False) + "\n"
    )
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(special_tokens_map(meta), indent=2, ensure_ascii=False) + "\n"
    )
