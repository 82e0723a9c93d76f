"""GenerationOptions: Ollama's names, defaults, type rules and layering."""

from __future__ import annotations

import pytest

from ollama_distributed.model.options import GenerationOptions, InvalidOptionError, OPTION_NAMES


def test_defaults_match_ollama():
    o = GenerationOptions()
    # api/types.go DefaultOptions
    assert (o.num_predict, o.num_keep, o.temperature, o.top_k, o.top_p) == (-1, 4, 0.8, 40, 0.9)
    assert (o.min_p, o.typical_p, o.repeat_last_n, o.repeat_penalty) == (0.0, 1.0, 64, 1.0)
    assert (o.presence_penalty, o.frequency_penalty, o.seed, o.stop) == (0.0, 0.0, -1, ())
    assert (o.num_batch, o.num_gpu, o.num_ctx) == (512, -1, 4096)


def test_all_documented_option_names_accepted():
    names = (
        "num_keep seed num_predict top_k top_p min_p typical_p repeat_last_n temperature repeat_penalty "
        "presence_penalty frequency_penalty stop num_ctx num_batch num_gpu main_gpu use_mmap num_thread "
        "draft_num_predict"
    ).split()
    assert set(names) <= OPTION_NAMES


def test_unknown_keys_ignored_known_applied():
    o = GenerationOptions.from_dict(
        {"numa": True, "mirostat": 2, "tfs_z": 1.0, "penalize_newline": False, "use_mlock": True,
         "temperature": 0.2, "top_k": 7, "stop": ["###", "\n\n"]}
    )
    assert o.temperature == 0.2 and o.top_k == 7 and o.stop == ("###", "\n\n")
    assert o.top_p == 0.9  # untouched default


def test_int_accepts_whole_float_and_rejects_fraction():
    assert GenerationOptions.from_dict({"top_k": 40.0}).top_k == 40
    assert isinstance(GenerationOptions.from_dict({"num_ctx": 2048.0}).num_ctx, int)
    with pytest.raises(InvalidOptionError, match="top_k"):
        GenerationOptions.from_dict({"top_k": 40.5})


@pytest.mark.parametrize(
    "key,value,word",
    [
        ("top_k", "40", "integer"),
        ("top_k", True, "integer"),
        ("temperature", "hot", "float"),
        ("temperature", [1], "float"),
        ("use_mmap", 1, "boolean"),
        ("stop", [1, 2], "array of strings"),
        ("stop", 5, "array of strings"),
        ("seed", 1.5, "whole number"),
    ],
)
def test_wrong_types_name_the_option(key, value, word):
    with pytest.raises(InvalidOptionError) as exc:
        GenerationOptions.from_dict({key: value})
    assert key in str(exc.value) and word in str(exc.value)
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize(
    "opts,key",
    [
        ({"num_ctx": 0}, "num_ctx"),
        ({"num_ctx": -5}, "num_ctx"),
        ({"num_predict": -3}, "num_predict"),
        ({"num_batch": 0}, "num_batch"),
        ({"repeat_last_n": -2}, "repeat_last_n"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": float("inf")}, "top_p"),
    ],
)
def test_impossible_values_rejected(opts, key):
    with pytest.raises(InvalidOptionError, match=key):
        GenerationOptions.from_dict(opts)


def test_special_num_predict_values_allowed():
    assert GenerationOptions.from_dict({"num_predict": -1}).num_predict == -1
    assert GenerationOptions.from_dict({"num_predict": -2}).num_predict == -2
    assert GenerationOptions.from_dict({"num_predict": 0}).num_predict == 0


def test_single_string_stop_and_none_values():
    o = GenerationOptions.from_dict({"stop": "END", "temperature": None})
    assert o.stop == ("END",) and o.temperature == 0.8


def test_layering_defaults_modelfile_request():
    server = GenerationOptions(num_ctx=8192)  # e.g. OLLAMA_CONTEXT_LENGTH, read at the edge
    model = GenerationOptions.from_modelfile(
        {"temperature": "0.2", "stop": ["<|im_end|>", "<|im_start|>"], "num_ctx": "2048", "top_k": "20"},
        base=server,
    )
    assert model.temperature == 0.2 and model.num_ctx == 2048 and model.top_k == 20
    assert model.stop == ("<|im_end|>", "<|im_start|>")
    req = model.merged({"temperature": 0.9, "seed": 42})
    assert (req.temperature, req.seed, req.num_ctx, req.top_k) == (0.9, 42, 2048, 20)
    assert req.stop == model.stop
    # the request can replace stop entirely
    assert model.merged({"stop": ["x"]}).stop == ("x",)
    # server default survives when neither layer sets it
    assert GenerationOptions.from_modelfile({"top_k": "5"}, base=server).num_ctx == 8192


def test_modelfile_bad_value_named():
    with pytest.raises(InvalidOptionError, match="num_ctx"):
        GenerationOptions.from_modelfile({"num_ctx": "lots"})


def test_to_dict_roundtrip_and_only_changed():
    o = GenerationOptions.from_dict({"temperature": 0.1, "stop": ["a"]})
    assert GenerationOptions.from_dict(o.to_dict()) == o
    assert o.to_dict(only_changed=True) == {"temperature": 0.1, "stop": ["a"]}


def test_options_object_must_be_a_mapping():
    with pytest.raises(InvalidOptionError, match="object"):
        GenerationOptions.from_dict([("top_k", 1)])  # type: ignore[arg-type]
