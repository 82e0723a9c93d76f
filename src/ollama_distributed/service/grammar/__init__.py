"""Constrained decoding on llguidance: `format` / `response_format` / tools → a per-sequence `GrammarConstraint`.

Why llguidance (bench/grammar_mask_bench.py, and MaskBench by its authors: 47 µs average mask, 7,765 of 10,163
real-world schemas handled, against XGrammar's 292 µs and 5,216): it builds from our own token table without
transformers, its wheel needs neither torch nor triton, it covers the JSON-schema keywords clients send (required,
enum, const, anyOf, pattern, bounds, min/maxItems, additionalProperties) and it names what it cannot do, which
becomes the 400 message.

  schema.py      request `format` / JSON schema → a checked llguidance grammar (SchemaError → 400)
  tokenizer.py   our Tokenizer → llguidance's LLTokenizer (cached per tokenizer)
  constraint.py  GrammarConstraint: allowed-token mask per step + advance(token), picklable
  tool_calls.py  ToolCallConstraint: prose stays free, an answer that opens an object must be a valid tool call
"""

from .constraint import GrammarConstraint
from .schema import SchemaError, compile_format, compile_tool_calls, normalize_format, tool_call_grammar
from .tokenizer import grammar_tokenizer
from .tool_calls import ToolCallConstraint

__all__ = ["GrammarConstraint", "SchemaError", "ToolCallConstraint", "compile_format", "compile_tool_calls",
           "grammar_tokenizer", "normalize_format", "tool_call_grammar"]

