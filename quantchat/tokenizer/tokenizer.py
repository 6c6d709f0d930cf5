"""The tokenizer the engine uses: a ``tokenizers.Tokenizer`` plus special tokens, chat template and streaming decode."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from quantchat.errors import ModelLoadError, QuantchatError
from quantchat.tokenizer.chat_template import BUILTIN_TEMPLATES, guess_builtin_template, render_chat_template

# Tokens that end an assistant turn in common chat formats (llama.cpp's EOG list, by text).
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "</s>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<|end_of_text|>", "<EOT>", "<end_of_utterance>", "<｜end▁of▁sentence｜>", "<turn|>",
    "<|tool_response>",
)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config spells it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _convert_sentencepiece(path: Path) -> tuple[HFTokenizer, dict[str, Any], dict[str, Any]]:
    """Convert a lone SentencePiece tokenizer.model: BPE models with our llama.cpp-exact builder,
    others with transformers' converter. Needs the sentencepiece package (and protobuf)."""
    model_file = path / "tokenizer.model"
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb  # optional dependency
    except ImportError as e:
        raise ModelLoadError(
            f"{model_file}: only a SentencePiece model here; converting it needs the sentencepiece and "
            "protobuf packages (pip install sentencepiece protobuf)"
        ) from e
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ModelLoadError(f"{model_file}: not a SentencePiece model: {e}") from e
    if proto.trainer_spec.model_type == pb.TrainerSpec.BPE:
        from quantchat.tokenizer.gguf_tokenizer import build_tokenizer, special_tokens_map, tokenizer_config

        spec = proto.trainer_spec
        meta: dict[str, Any] = {
            "source": str(model_file),
            "ggml.model": "llama",
            "ggml.tokens": [p.piece for p in proto.pieces],
            "ggml.scores": [p.score for p in proto.pieces],
            "ggml.token_type": [int(p.type) for p in proto.pieces],
            "ggml.add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
        }
        for key, value in (("bos", spec.bos_id), ("eos", spec.eos_id), ("unknown", spec.unk_id),
                           ("padding", spec.pad_id)):
            meta[f"ggml.{key}_token_id"] = value if value >= 0 else None
        return build_tokenizer(meta), tokenizer_config(meta), special_tokens_map(meta)
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path)).backend_tokenizer, {}, {}
    except Exception as e:  # noqa: BLE001 - whatever the converter raises, report one line
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{model_file}: cannot convert this SentencePiece model with transformers: {msg}") from e


class Tokenizer:
    """Encode/decode text and render chat prompts for one model."""

    def __init__(
        self,
        backend: HFTokenizer,
        config: dict[str, Any] | None = None,
        special_tokens_map: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        chat_template: str | list[dict[str, str]] | None = None,
    ) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self.special_tokens_map = dict(special_tokens_map or {})
        self.generation_config = dict(generation_config or {})
        self._templates: dict[str, str] = {}
        raw = chat_template if chat_template is not None else self.config.get("chat_template")
        if isinstance(raw, str):
            self._templates["default"] = raw
        elif isinstance(raw, list):
            for item in raw:
                if isinstance(item, dict) and isinstance(item.get("template"), str):
                    self._templates[str(item.get("name", "default"))] = item["template"]
        self.bos_token = self._special("bos_token")
        self.eos_token = self._special("eos_token")
        self.bos_id: int | None = self.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id: int | None = self.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos: bool = self._default_add_bos()
        self.eos_ids: set[int] = self._eos_ids()

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: Path | str) -> Tokenizer:
        """Load tokenizer.json (or convert a lone SentencePiece tokenizer.model) and the JSON configs beside it."""
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"{path}: tokenizer directory not found")
        tj = path / "tokenizer.json"
        base_config: dict[str, Any] = {}
        base_special: dict[str, Any] = {}
        if tj.is_file():
            try:
                backend = HFTokenizer.from_file(str(tj))
            except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ModelLoadError(f"{tj}: cannot load tokenizer: {msg}") from e
        elif (path / "tokenizer.model").is_file():
            backend, base_config, base_special = _convert_sentencepiece(path)
        else:
            raise ModelLoadError(f"{path}: no tokenizer.json or tokenizer.model")
        config = {**base_config, **_read_json(path / "tokenizer_config.json")}
        template: str | None = None
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        elif "chat_template" not in config:
            template = _read_json(path / "chat_template.json").get("chat_template")
        return cls(
            backend,
            config,
            {**base_special, **_read_json(path / "special_tokens_map.json")},
            _read_json(path / "generation_config.json"),
            chat_template=template,
        )

    @classmethod
    def from_gguf(cls, path: Path | str) -> Tokenizer:
        """Build the tokenizer straight from a GGUF file's metadata (no files written)."""
        import gguf

        from quantchat.tokenizer.gguf_tokenizer import (
            build_tokenizer,
            read_tokenizer_metadata,
            special_tokens_map,
            tokenizer_config,
        )

        try:
            reader = gguf.GGUFReader(Path(path))
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{path}: cannot read GGUF file: {e}") from e
        meta = read_tokenizer_metadata(reader)
        return cls(build_tokenizer(meta), tokenizer_config(meta), special_tokens_map(meta))

    def _special(self, key: str) -> str | None:
        return _token_text(self.config.get(key)) or _token_text(self.special_tokens_map.get(key))

    def _default_add_bos(self) -> bool:
        flag = self.config.get("add_bos_token")
        if isinstance(flag, bool):
            return flag and self.bos_id is not None
        # no flag: does the tokenizer's own post-processor put BOS first?
        if self.bos_id is None:
            return False
        with_special = self.backend.encode("a", add_special_tokens=True).ids
        return bool(with_special) and with_special[0] == self.bos_id

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.eos_id is not None:
            ids.add(self.eos_id)
        gen = self.generation_config.get("eos_token_id")
        for i in gen if isinstance(gen, list) else [gen]:
            if isinstance(i, int) and 0 <= i < self.vocab_size:
                ids.add(i)
        added = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        templates = "".join(self._templates.values())
        for text in END_OF_TURN_TOKENS:
            tid = self.backend.token_to_id(text)
            if tid is not None and (text in added or text in templates):
                ids.add(tid)
        return ids

    # --- properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        """The model's own default chat template, or None."""
        return self._templates.get("default")

    @property
    def model_name(self) -> str | None:
        """The model name recorded by the GGUF conversion, if any."""
        q = self.config.get("quantchat")
        return q.get("model_name") if isinstance(q, dict) else self.config.get("name_or_path")

    # --- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids for text; special tokens written in the text become their single ids.

        add_bos None follows the tokenizer's default, but adds no second BOS when the text
        (e.g. a rendered chat prompt) already starts with one.
        """
        if not isinstance(text, str):
            raise QuantchatError(f"text to encode must be a string, not {type(text).__name__}")
        # lone surrogates (undecodable input read with surrogateescape) become U+FFFD
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if not text.isascii() else text
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos and not (ids and ids[0] == self.bos_id)
        if add_bos:
            if self.bos_id is None:
                raise QuantchatError("this tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for token ids (byte-level/byte-fallback pieces joined before UTF-8 decoding)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary string of a token id (None if out of range)."""
        return self.backend.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string (None if absent)."""
        return self.backend.token_to_id(token)

    def is_special(self, i: int) -> bool:
        """Whether a token id is a special (control) token."""
        t = self.backend.get_added_tokens_decoder().get(i)
        return bool(t and t.special)

    # --- chat -----------------------------------------------------------------------------------

    def guessed_template(self) -> str:
        """The built-in template used for a model without its own (see ``guess_builtin_template``)."""
        return guess_builtin_template(self.backend.get_vocab(), self.model_name)

    def resolve_chat_template(self, template: str | None = None) -> str:
        """The Jinja source to use: a built-in or named template, a literal template, or the model's own/fallback."""
        if template is None:
            if self.chat_template is not None:
                return self.chat_template
            return BUILTIN_TEMPLATES[self.guessed_template()]
        if template in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[template]
        if template in self._templates:
            return self._templates[template]
        if "{" not in template:
            raise QuantchatError(
                f"unknown chat template {template!r} (built-in: {', '.join(BUILTIN_TEMPLATES)}"
                + (f"; model: {', '.join(self._templates)}" if self._templates else "") + ")"
            )
        return template

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        template: str | None = None,
        **context: Any,
    ) -> str:
        """Render messages into a prompt string with the chat template (see resolve_chat_template)."""
        return render_chat_template(
            self.resolve_chat_template(template),
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **context,
        )

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder for generated tokens."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turn generated token ids into text piece by piece, never emitting a partial character.

    Like vLLM/HF TextStreamer: decode a short window of previous tokens with and without the new
    ones and emit the difference once it no longer ends in U+FFFD (an unfinished UTF-8 sequence).
    Decoding a window (not single tokens) keeps SentencePiece's leading-space rule right.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is unfinished)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd") and new_text.startswith(prefix_text):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character at the end of output); call once at the end."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        self._prefix, self._read = self._read, len(self.ids)
        if new_text.startswith(prefix_text):
            return new_text[len(prefix_text):]
        return new_text
