"""The Go text/template subset used for classic Ollama prompt templates."""

from __future__ import annotations

import pytest

from ollama_distributed.service.gotemplate import UnsupportedTemplateError, is_supported, render_go_template

T = "{{ if .System }}<|system|>\n{{ .System }}</s>\n{{ end }}<|user|>\n{{ .Prompt }}</s>\n<|assistant|>\n{{ .Response }}"


def test_render() -> None:
    assert render_go_template(T, {"System": "S", "Prompt": "P"}) == "<|system|>\nS</s>\n<|user|>\nP</s>\n<|assistant|>\n"
    assert render_go_template(T, {"Prompt": "P"}) == "<|user|>\nP</s>\n<|assistant|>\n"


def test_trim_else_comments() -> None:
    t = "A  {{- if .X }} yes {{- else if .Y }} y {{- else }} no {{- end -}}  B{{/* note */}}"
    assert render_go_template(t, {"X": 1}) == "A yesB"
    assert render_go_template(t, {"Y": 1}) == "A yB"
    assert render_go_template(t, {}) == "A noB"


@pytest.mark.parametrize("t", ["{{ range .Messages }}x{{ end }}", "{{ if .X }}", "{{ end }}", "{{ len .X }}"])
def test_unsupported(t: str) -> None:
    assert not is_supported(t)
    with pytest.raises(UnsupportedTemplateError):
        render_go_template(t, {"X": [1]})
