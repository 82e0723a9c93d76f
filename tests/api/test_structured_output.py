"""Structured output, logprobs and tool calls through the real server with the official clients: JSON schemas
are enforced (answers validate with `jsonschema`) or refused with a 400 naming the problem, on both APIs;
logprobs come in each API's shape and agree with greedy choices; `tool_choice` constrains a tool call."""

from __future__ import annotations

import json
import math
import random

import httpx
import jsonschema
import ollama
import openai
import pytest

from .conftest import create_model

CAT = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colour"],
       "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0,
                                                                          "maximum": 30},
                      "colour": {"enum": ["black", "white", "ginger"]}}}
CITY = {"type": "object", "required": ["city", "country", "population", "landmarks"], "additionalProperties": False,
        "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,15}$"},
                       "country": {"type": "string", "maxLength": 20},
                       "population": {"type": "integer", "minimum": 1000, "maximum": 50000000},
                       "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 30},
                                     "minItems": 1, "maxItems": 3},
                       "capital": {"type": "boolean"}}}
ORDER = {"type": "object", "required": ["id", "status", "items", "customer"], "additionalProperties": False,
         "properties": {"id": {"const": "A-1"}, "status": {"anyOf": [{"enum": ["open", "shipped"]}, {"type": "null"}]},
                        "customer": {"type": "object", "required": ["name"], "additionalProperties": False,
                                     "properties": {"name": {"type": "string", "maxLength": 20}}},
                        "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                            "type": "object", "required": ["sku", "qty"], "additionalProperties": False,
                            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}}}}}}
BAD_SCHEMAS = [({"type": "nonsense-type"}, "nonsense-type"),
               ({"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}, "regex"),
               ({"type": "string", "format": "no-such-format"}, "no-such-format")]


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url)


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


# ---- bad schemas ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schema, problem", BAD_SCHEMAS)
def test_bad_schema_is_a_400_naming_the_problem(client, oai, server, schema, problem: str) -> None:
    with pytest.raises(ollama.ResponseError) as exc:
        client.generate(model="tiny", prompt="x", format=schema, options={"num_predict": 2})
    assert exc.value.status_code == 400 and problem in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        list(client.chat(model="tiny", messages=[{"role": "user", "content": "x"}], format=schema, stream=True))
    assert exc.value.status_code == 400 and problem in exc.value.error
    with pytest.raises(openai.BadRequestError) as oexc:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": schema}})
    assert problem in oexc.value.message
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code == 400 and problem in r.json()["error"]["message"]


def test_json_object_and_json_format_still_any_object(client, oai) -> None:
    resp = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON"}], max_tokens=12,
                                       seed=2, response_format={"type": "json_object"})
    assert isinstance(json.loads(resp.choices[0].message.content), dict)
    out = client.generate(model="tiny", prompt="JSON", format="json", options={"num_predict": 5, "seed": 1,
                                                                               "temperature": 1})
    assert isinstance(json.loads(out.response), dict)  # closed within 5 tokens


# ---- SmolLM2: schemas enforced across prompts -----------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_answers_validate_against_their_schema(client, oai) -> None:
    cases = [(CAT, "Describe a cat called Tom as JSON."), (CAT, "Invent a pet cat."),
             (CITY, "Give facts about Paris as JSON."), (CITY, "Describe the city of Tokyo."),
             (ORDER, "Write an order for two items as JSON.")]
    for schema, prompt in cases:
        resp = client.chat(model="smollm2:135m", messages=[{"role": "user", "content": prompt}], format=schema,
                           options={"temperature": 0, "num_predict": 160})
        assert resp.done_reason == "stop", resp.message.content
        jsonschema.validate(json.loads(resp.message.content), schema)
    # streamed, and through OpenAI's json_schema response_format
    streamed = "".join(part.message.content for part in client.chat(
        model="smollm2:135m", messages=[{"role": "user", "content": cases[2][1]}], format=CITY, stream=True,
        options={"temperature": 0, "num_predict": 160}))
    jsonschema.validate(json.loads(streamed), CITY)
    resp = oai.chat.completions.create(
        model="smollm2:135m", messages=[{"role": "user", "content": "Describe a cat."}], temperature=0,
        max_tokens=160, response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT}})
    assert resp.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(resp.choices[0].message.content), CAT)


# ---- fuzz: random schemas either validate or are refused ------------------------------------------------------


def _random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random bounded schema (every value has a bounded length, so answers end within the token budget), or
    now and then a broken one that must be refused."""
    kind = rng.choice(["string", "integer", "boolean", "null", "enum", "const", "array", "anyOf", "pattern"]
                      + ["object"] * (2 if depth < 2 else 0))
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 6)}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "enum":
        return {"enum": rng.sample(["a", "bb", 3, True, None, "x y"], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["k", 7, False])}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{1,4}$", "^[0-9]{2}-[A-Z]$", "^(yes|no)$"])}
    if kind == "array":
        lo = rng.randint(0, 2)
        return {"type": "array", "items": _random_schema(rng, depth + 1), "minItems": lo,
                "maxItems": lo + rng.randint(0, 2)}
    if kind == "anyOf":
        return {"anyOf": [_random_schema(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    props = {f"p{i}": _random_schema(rng, depth + 1) for i in range(rng.randint(0, 3))}
    return {"type": "object", "properties": props, "required": rng.sample(sorted(props), rng.randint(0, len(props))),
            "additionalProperties": False}


def _broken(rng: random.Random) -> dict:
    return rng.choice([{"type": "nonsense-type"}, {"type": "integer", "minimum": "zero"},
                       {"type": "object", "required": "p0"}, {"type": "array", "minItems": -1},
                       {"type": "string", "pattern": "[unclosed"}, {"anyOf": []}])


def test_random_schemas_validate_or_are_refused(server) -> None:
    rng = random.Random(1234)
    refused = validated = 0
    for i in range(30):
        inner = _random_schema(rng, 1) if rng.random() < 0.85 else _broken(rng)
        schema = {"type": "object", "properties": {"v": inner}, "required": ["v"], "additionalProperties": False}
        r = httpx.post(server.url + "/api/generate", timeout=120, json={
            "model": "tiny", "prompt": f"answer {i}", "format": schema, "stream": False,
            "options": {"temperature": 1.0, "seed": i, "num_predict": 150}})
        if r.status_code == 400:
            refused += 1
            assert "error" in r.json() and "schema" in r.json()["error"], r.text
            with pytest.raises(jsonschema.SchemaError):
                jsonschema.Draft202012Validator.check_schema(schema)  # refused only when it really is invalid
            continue
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["done_reason"] == "stop", (schema, body["response"])
        jsonschema.validate(json.loads(body["response"]), schema)
        validated += 1
    assert validated >= 20 and refused >= 1, (validated, refused)


# ---- logprobs -------------------------------------------------------------------------------------------------


def _check_entries(entries, n_top: int) -> None:
    for e in entries:
        e = e if isinstance(e, dict) else e.model_dump()
        assert isinstance(e["token"], str) and e["logprob"] <= 0
        if e.get("bytes") is not None:  # (the ollama client's model drops the field; checked raw below)
            assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
        tops = e["top_logprobs"]
        assert len(tops) == n_top
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        # greedy: the chosen token is the most likely one
        assert tops[0]["token"] == e["token"] and math.isclose(tops[0]["logprob"], e["logprob"], abs_tol=1e-6)


def test_ollama_logprobs(client) -> None:
    opts = {"temperature": 0, "num_predict": 8}
    out = client.generate(model="tiny", prompt="The fox", raw=True, options=opts, logprobs=True, top_logprobs=3)
    assert len(out.logprobs) == out.eval_count == 8
    _check_entries(out.logprobs, 3)
    assert "".join(e.token for e in out.logprobs) == out.response
    parts = list(client.generate(model="tiny", prompt="The fox", raw=True, options=opts, logprobs=True,
                                 top_logprobs=3, stream=True))
    streamed = [e for p in parts for e in (p.logprobs or [])]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in out.logprobs]
    chat = client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], options=opts, logprobs=True)
    assert len(chat.logprobs) == 8 and all(e.top_logprobs in (None, []) for e in chat.logprobs)
    raw = httpx.post(f"{client._client.base_url}/api/generate", json={
        "model": "tiny", "prompt": "The fox", "raw": True, "options": opts, "stream": False, "logprobs": True,
        "top_logprobs": 3}).json()
    assert all("bytes" in e for e in raw["logprobs"])
    _check_entries(raw["logprobs"], 3)
    plain = client.generate(model="tiny", prompt="The fox", raw=True, options=opts)
    assert plain.logprobs is None and plain.response == out.response
    with pytest.raises(ollama.ResponseError) as exc:
        client.generate(model="tiny", prompt="x", logprobs=True, top_logprobs=21)
    assert exc.value.status_code == 400


def test_openai_logprobs(oai, server) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    resp = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == 6
    _check_entries([c.model_dump() for c in content], 2)
    assert "".join(c.token for c in content) == resp.choices[0].message.content
    stream = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=2, stream=True)
    streamed = [c for ch in stream if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.model_dump() for c in streamed] == [c.model_dump() for c in content]
    no_lp = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    assert no_lp.choices[0].logprobs is None
    comp = oai.completions.create(model="tiny", prompt="The fox", max_tokens=5, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == comp.choices[0].text and lp.text_offset[0] == 0
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert max(top, key=top.get) == tok and math.isclose(top[tok], value, abs_tol=1e-6)
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": msgs, "top_logprobs": 2})
    assert r.status_code == 400 and "logprobs" in r.json()["error"]["message"]


# ---- tool calls -----------------------------------------------------------------------------------------------

TOOLS_TEMPLATE = ("{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}{% for m in messages %}"
                  "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object", "required": ["city"],
                                                           "properties": {"city": {"type": "string",
                                                                                   "maxLength": 16}}}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "required": ["a", "b"], "additionalProperties": False,
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                   "b": {"type": "integer", "minimum": 0, "maximum": 99}}}}}


def test_tool_choice_constrains_a_tool_call(server, oai, tiny_gguf_factory) -> None:
    create_model(server.url, "tinytools", tiny_gguf_factory(chat_template=TOOLS_TEMPLATE))
    msgs = [{"role": "user", "content": "What is the weather in Oslo?"}]
    for seed, choice in enumerate(["required", {"type": "function", "function": {"name": "add"}}]):
        resp = oai.chat.completions.create(model="tinytools", messages=msgs, tools=[WEATHER, ADD], tool_choice=choice,
                                           max_tokens=80, seed=seed, temperature=1.0)
        c = resp.choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c.message
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        spec = {"get_weather": WEATHER, "add": ADD}[call.function.name]["function"]
        jsonschema.validate(json.loads(call.function.arguments), spec["parameters"])
        if isinstance(choice, dict):
            assert call.function.name == "add"
    streamed = list(oai.chat.completions.create(model="tinytools", messages=msgs, tools=[ADD], tool_choice="required",
                                                max_tokens=80, seed=5, stream=True))
    calls = [tc for ch in streamed if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "add"
    reasons = [ch.choices[0].finish_reason for ch in streamed if ch.choices and ch.choices[0].finish_reason]
    assert reasons == ["tool_calls"]
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="tinytools", messages=msgs, tools=[ADD], max_tokens=5,
                                    tool_choice={"type": "function", "function": {"name": "nope"}})


def test_ollama_chat_with_tools_is_prose_or_a_valid_call(server, tiny_gguf_factory) -> None:
    create_model(server.url, "tinytools", tiny_gguf_factory(chat_template=TOOLS_TEMPLATE))
    client = ollama.Client(host=server.url)
    for seed in range(4):
        resp = client.chat(model="tinytools", messages=[{"role": "user", "content": "Add 2 and 3."}], tools=[ADD],
                           options={"seed": seed, "temperature": 1.0, "num_predict": 40})
        if resp.message.tool_calls:
            call = resp.message.tool_calls[0]
            assert call.function.name == "add"
            jsonschema.validate(dict(call.function.arguments), ADD["function"]["parameters"])
        else:
            assert resp.message.content and not resp.message.content.lstrip().startswith("{")
