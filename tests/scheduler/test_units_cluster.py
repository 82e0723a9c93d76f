import pytest

from ollama_distributed.scheduler import ClusterSpec, ClusterSpecError, LinkSpec
from ollama_distributed.scheduler.units import (format_bytes, parse_bandwidth, parse_bytes, parse_duration,
                                                parse_flops)


@pytest.mark.parametrize("text,expected", [
    ("8GB", 8e9), ("16GiB", 16 * 2**30), ("512MB", 512e6), ("1.5TB", 1.5e12), (4096, 4096), ("100 B", 100),
    ("2kB", 2000),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == int(expected)


@pytest.mark.parametrize("text,expected", [
    ("100GB/s", 1e11), ("1Gbit/s", 1.25e8), ("10Gbps", 1.25e9), ("1Gb/s", 1.25e8), ("2GiB/s", 2 * 2**30),
    (5e9, 5e9),
])
def test_parse_bandwidth(text, expected):
    assert parse_bandwidth(text) == pytest.approx(expected)


@pytest.mark.parametrize("text,expected", [("2TFLOPS", 2e12), ("500 GFLOP/s", 5e11), ("1.5e12", 1.5e12)])
def test_parse_flops(text, expected):
    assert parse_flops(text) == pytest.approx(expected)


@pytest.mark.parametrize("text,expected", [("0.2ms", 2e-4), ("50us", 5e-5), ("1s", 1.0), ("3ns", 3e-9), (0.001, 1e-3)])
def test_parse_duration(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("fn,text", [(parse_bytes, "8 parsecs"), (parse_bandwidth, "100GB"), (parse_flops, "2T"),
                                     (parse_duration, "3 fortnights"), (parse_bytes, "-1"), (parse_bytes, True)])
def test_bad_units_raise_with_the_text(fn, text):
    with pytest.raises(ValueError) as info:
        fn(text)
    assert str(text) in str(info.value) or "must be" in str(info.value)


def test_format_bytes():
    assert format_bytes(9.1e9) == "9.1 GB" and format_bytes(512) == "512 B"


YAML_DICT = {
    "nodes": [{"name": "a", "memory": "8GB", "memory_bandwidth": "100GB/s", "flops": "2TFLOPS"},
              {"name": "gpu-box", "memory": "24GB", "memory_bandwidth": "1TB/s", "flops": "80TFLOPS"},
              {"name": "b", "memory": "16GiB", "memory_bandwidth": "50GB/s", "flops": "1TFLOPS"}],
    "links": {"default": {"latency": "0.2ms", "bandwidth": "1Gbit/s"},
              "a-gpu-box": {"latency": "0.05ms", "bandwidth": "10Gbit/s"}},
}


def test_cluster_from_dict_with_units_and_hyphenated_names():
    c = ClusterSpec.from_dict(YAML_DICT)
    assert c.node("a").memory_bytes == 8 * 10**9 and c.node("b").memory_bytes == 16 * 2**30
    assert c.link("gpu-box", "a") == LinkSpec(5e-5, 1.25e9)
    assert c.link("a", "b") == LinkSpec(2e-4, 1.25e8)
    assert c.link("a", "a").latency == 0.0
    assert not c.links_uniform() and c.links_uniform(["a", "b"])
    assert ClusterSpec.from_dict(c.to_dict()) == c


def test_measurements_override_declared_values():
    c = ClusterSpec.from_dict(YAML_DICT)
    m = c.with_measurements({"a": {"memory_bandwidth": 42e9}}, {("b", "a"): LinkSpec(1e-3, 1e6)})
    assert m.node("a").memory_bandwidth == 42e9 and m.node("a").flops == 2e12
    assert m.link("a", "b") == LinkSpec(1e-3, 1e6)
    assert c.node("a").memory_bandwidth == 100e9  # original untouched
    with pytest.raises(ClusterSpecError, match="zz"):
        c.with_measurements({"zz": {"flops": 1.0}})


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["nodes"].append(dict(d["nodes"][0])), "duplicate node names: a"),
    (lambda d: d["links"].update({"a-c": {"latency": 0, "bandwidth": 1}}), "'a-c' matches no node pair"),
    (lambda d: d["nodes"][0].pop("flops"), "lacks flops"),
    (lambda d: d["nodes"][0].update(memory="lots"), "node 'a'"),
    (lambda d: d["links"].update(default={"latency": "1ms"}), "needs 'latency' and 'bandwidth'"),
])
def test_bad_cluster_descriptions_name_the_problem(mutate, needle):
    import copy
    d = copy.deepcopy(YAML_DICT)
    mutate(d)
    with pytest.raises(ClusterSpecError, match=needle):
        ClusterSpec.from_dict(d)
