"""Modelfile parsing (ollama parser/parser.go, docs/modelfile.md)."""

from __future__ import annotations

import pytest

from ollama_distributed.service.modelfile import ModelfileError, parameters_text, parse_modelfile, render_modelfile


def test_all_instructions() -> None:
    mf = parse_modelfile('''# a comment
FROM ./model.gguf
template """{{ if .System }}<|system|>{{ .System }}{{ end }}
<|user|>{{ .Prompt }}"""
SYSTEM "You are \\"helpful\\"."
PARAMETER temperature 0.2
PARAMETER num_ctx 4096
PARAMETER stop <|im_end|>
PARAMETER stop "</s>"
PARAMETER use_mmap false
LICENSE """MIT"""
MESSAGE user Hello there
MESSAGE assistant Hi!
''')
    assert mf.from_ == "./model.gguf"
    assert mf.template == "{{ if .System }}<|system|>{{ .System }}{{ end }}\n<|user|>{{ .Prompt }}"
    assert mf.system == 'You are "helpful".'
    assert mf.parameters == {"temperature": 0.2, "num_ctx": 4096, "stop": ["<|im_end|>", "</s>"], "use_mmap": False}
    assert mf.license == ["MIT"]
    assert mf.messages == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]


@pytest.mark.parametrize("text, needle", [
    ("SYSTEM hi\n", "FROM"),
    ("FROM x\nBOGUS y\n", "line 2"),
    ("FROM x\nPARAMETER num_ctx lots\n", "num_ctx"),
    ("FROM x\nPARAMETER temperature\n", "line 2"),
    ('FROM x\nTEMPLATE """never closed\n', "unterminated"),
    ("FROM x\nMESSAGE robot hi\n", "role"),
])
def test_errors(text: str, needle: str) -> None:
    with pytest.raises(ModelfileError) as exc:
        parse_modelfile(text)
    assert needle in str(exc.value)


def test_render_roundtrip() -> None:
    text = render_modelfile("/m.gguf", "T {{ .Prompt }}", "S", {"temperature": 0.5, "stop": ["a", "b c"]},
                            ["MIT"], [{"role": "user", "content": "hi"}])
    mf = parse_modelfile(text)
    assert (mf.from_, mf.template, mf.system) == ("/m.gguf", "T {{ .Prompt }}", "S")
    assert mf.parameters == {"temperature": 0.5, "stop": ["a", "b c"]}
    assert "temperature" in parameters_text({"temperature": 0.5})
