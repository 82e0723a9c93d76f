"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False) does."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from ollama_distributed.model.chat_template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError
from ollama_distributed.model.tokenizer import Tokenizer
from tests.helpers.tiny_gguf import INST_CHAT_TEMPLATE, sentencepiece_tokenizer_metadata

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello 😀"},
        {"role": "assistant", "content": "Arr!\n\nAhoy."},
        {"role": "user", "content": "2+2? <b>bold</b> & \"quotes\""},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "user", "content": "  spaced  \n", "images": None}],  # None-valued keys are dropped, as HF does
]

# A tools-aware template in the style of Qwen2.5/Llama-3.1 (tools|tojson, tool_calls, tool role, loop controls,
# namespace, strftime_now and custom kwargs) to compare the rendering environment, not just ChatML.
TOOLS_TEMPLATE = """{%- set ns = namespace(sys='') -%}
{%- if messages[0]['role'] == 'system' %}{% set ns.sys = messages[0]['content'] %}{% endif -%}
<|im_start|>system
{{ ns.sys or 'You are helpful.' }} Today is {{ date_string | default(strftime_now('%d %b %Y')) }}.
{%- if tools %}

# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
{%- endif %}<|im_end|>
{% for message in messages %}
  {% if message['role'] == 'system' %}{% continue %}{% endif %}
  {% if message.tool_calls is defined %}
<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>{{ call.function | tojson(indent=2, sort_keys=True) }}</tool_call>{% endfor %}<|im_end|>
  {% elif message['role'] == 'tool' %}
<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
  {% else %}
<|im_start|>{{ message['role'] }}
{% generation %}{{ message['content'] }}{% endgeneration %}<|im_end|>
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city <now> & later",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "22°C, sunny"},
]


@pytest.fixture(scope="module")
def smollm(tiny_gguf: Path):
    """(ours, transformers' tokenizer) for SmolLM2's template (the tiny GGUF carries it verbatim)."""
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    return ChatTemplate.from_gguf(tiny_gguf), hf


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_smollm2_template_equals_transformers(smollm, conversation, add_generation_prompt) -> None:
    ours, hf = smollm
    expected = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.render(conversation, add_generation_prompt=add_generation_prompt) == expected
    assert not ours.is_fallback and not ours.supports_tools
    assert ours.bos_token == hf.bos_token and ours.eos_token == hf.eos_token


def test_rendered_prompt_tokenizes_like_transformers(smollm, tiny_gguf: Path) -> None:
    ours, hf = smollm
    tok = Tokenizer.from_gguf(tiny_gguf)
    conv = CONVERSATIONS[2]
    expected = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    ids = tok.encode(ours.render(conv))
    assert ids == list(expected)
    assert ids.count(tok.token_to_id("<|im_start|>")) == 5  # 4 turns + prompt; special tokens in the prompt are single ids


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tools_template_equals_transformers(smollm, add_generation_prompt) -> None:
    _, hf = smollm
    ours = ChatTemplate(TOOLS_TEMPLATE, hf.bos_token, hf.eos_token)
    assert ours.supports_tools
    for tools in (TOOLS, None):
        for kwargs in ({"date_string": "26 Jul 2024"}, {}):
            expected = hf.apply_chat_template(TOOL_CONVERSATION, tools=tools, chat_template=TOOLS_TEMPLATE,
                                              tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
            got = ours.render(TOOL_CONVERSATION, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
            assert got == expected
    rendered = ours.render(TOOL_CONVERSATION, tools=TOOLS)
    assert '"description": "Weather for a city <now> & later"' in rendered  # tojson does not HTML-escape
    assert datetime.now().strftime("%Y") in rendered  # strftime_now default date


def test_inst_template_with_bos_and_raise_exception(tmp_path_factory) -> None:
    """Mistral-style template: uses bos_token/eos_token, and rejects bad role order with raise_exception."""
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    meta, _ = sentencepiece_tokenizer_metadata()
    path = write_tiny_llama_gguf(tmp_path_factory.mktemp("inst") / "tiny.gguf", n_layers=1, tokenizer_metadata=meta)
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = ChatTemplate.from_gguf(path)
    assert ours.source == INST_CHAT_TEMPLATE and ours.bos_token == "<s>" and ours.eos_token == "</s>"
    for conv in (CONVERSATIONS[0], CONVERSATIONS[3], [*CONVERSATIONS[3], {"role": "user", "content": "c"}]):
        assert ours.render(conv) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert ours.render(CONVERSATIONS[3]) == "<s>[INST] a [/INST]b</s>"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ours.render(CONVERSATIONS[1])  # system first: the template raises
    with pytest.raises(Exception, match="roles must alternate"):
        hf.apply_chat_template(CONVERSATIONS[1], tokenize=False)


def test_fallback_chatml() -> None:
    t = ChatTemplate(None, "", "")
    assert t.is_fallback and t.source == CHATML_TEMPLATE and not t.supports_tools
    assert t.render([{"role": "user", "content": "Hi"}]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ChatTemplate.from_metadata({}).is_fallback


def test_sandbox_and_errors() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", "", "")
    # Templates are untrusted: attribute access into Python internals is refused by the sandbox.
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", "", "")
    with pytest.raises(ChatTemplateError):
        evil.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set ns = namespace(_x=1) %}", "", "").render([])
    # Immutable sandbox: templates cannot mutate the caller's messages.
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.append(1) }}", "", "").render(msgs)
    assert msgs == [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="message 0"):
        ChatTemplate(None).render(["not a dict"])  # type: ignore[list-item]


@pytest.mark.slow
def test_real_smollm2_template(smollm2_path: Path) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    ours = ChatTemplate.from_gguf(smollm2_path)
    for conv in CONVERSATIONS[:3]:
        assert ours.render(conv) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_real_gemma3_template() -> None:
    """The real Gemma 3 270M GGUF's own template (system folded into the first user turn, `model` role) renders as
    transformers' renderer does with that template and Gemma's special tokens."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from tests.helpers.gemma3_file import SKIP_REASON, gemma3_270m_path

    path = gemma3_270m_path()
    if path is None:
        pytest.skip(SKIP_REASON)
    ours = ChatTemplate.from_gguf(path)
    assert ours.source and "start_of_turn" in ours.source
    for conv in CONVERSATIONS[:4]:
        rendered, _ = render_jinja_template([conv], chat_template=ours.source, add_generation_prompt=True,
                                            bos_token="<bos>", eos_token="<eos>")
        assert ours.render(conv) == rendered[0]
