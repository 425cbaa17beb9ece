"""The ONNX ops and the TensorRT plugins agree: what edgetok/ops/onnx.py emits (op type,
plugin_namespace, plugin_version, attribute names and types, outputs and their types) is what
plugins/trt/plugins.cpp registers (creator names, kNamespace, kVersion, PluginField names and
types, getNbOutputs, getOutputDataTypes, and the formats supportsFormatCombination takes), and
the build-time stand-ins in edgetok/trt/pyplugins.py copy the C++ side. TensorRT's ONNX parser
finds a plugin by op type + plugin_version + plugin_namespace and passes each node attribute as a
field (ONNX INT -> kINT32, FLOAT -> kFLOAT32); a mismatch shows only when a plugin build fails on
the device, so it is checked here from the sources, without TensorRT.

The last test builds each op with the stand-ins in TensorRT-RTX (no GPU needed).
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from onnx.defs import OpSchema

from edgetok.ops.onnx import OPS, PLUGIN_ATTRS
from edgetok.trt import pyplugins

ROOT = Path(__file__).resolve().parents[1]
PLUGINS_CPP = ROOT / "plugins" / "trt" / "plugins.cpp"
NO_PLUGIN = {"DiffDrop"}  # ONNX ops without a TensorRT plugin (they run as their function body)
# Serialized fields that are not ONNX attributes (e.g. a format version, "edgetok_format") may use
# this prefix: the parser never passes them, and no ONNX attribute is allowed to start with it.
EXTRA_FIELD_PREFIX = "edgetok_"

ONNX_FIELD_TYPE = {OpSchema.AttrType.INT: "kINT32", OpSchema.AttrType.FLOAT: "kFLOAT32"}
STANDIN_FIELD_TYPE = {"int32": "kINT32", "float32": "kFLOAT32"}
CPP_OUT_TYPE = {"in[0]": "x", "DataType::kINT64": "int64", "DataType::kINT32": "int32"}


# ---------------------------------------------------------------------------------------------
# plugins.cpp, read with regular expressions (each parse fails loudly when it finds nothing)
# ---------------------------------------------------------------------------------------------


def _one(pattern: str, text: str, what: str, flags=0) -> str:
    m = re.search(pattern, text, flags)
    assert m, f"plugins.cpp: cannot find {what} (pattern {pattern!r}); update {__file__} to its new form"
    return m.group(1)


def _body(text: str, start: str, what: str) -> str:
    """The brace-balanced body of the first function whose declaration contains ``start``."""
    i = text.find(start)
    assert i >= 0, f"plugins.cpp: cannot find {what} ({start!r})"
    i = text.index("{", i)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    raise AssertionError(f"plugins.cpp: unbalanced braces in {what}")


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def parse_plugins_cpp(src: str) -> dict:
    """{"namespace", "version", "plugins": {name: {fields, defaults, n_outputs, outputs, n_inputs,
    input_ranks, out_ranks, typed_positions, size_tensor}}}."""
    code = _strip_comments(src)
    info = {
        "namespace": _one(r'constexpr\s+char\s+kNamespace\[\]\s*=\s*"([^"]*)"', code, "kNamespace"),
        "version": _one(r'constexpr\s+char\s+kVersion\[\]\s*=\s*"([^"]*)"', code, "kVersion"),
        "plugins": {},
    }
    registered = re.findall(r"static\s+Creator<(\w+)>\s+\w+\s*;", _body(code, "getCreators(", "getCreators"))
    assert registered, "plugins.cpp: getCreators registers no Creator<...> (cannot check the mapping)"
    classes = list(re.finditer(r"class\s+(\w+)\s+final\s*:\s*public\s+PluginBase\s*\{", code))
    assert classes, "plugins.cpp: no `class X final : public PluginBase` found"
    spans = {m.group(1): (m.start(), classes[k + 1].start() if k + 1 < len(classes) else len(code))
             for k, m in enumerate(classes)}
    # fields declared outside the plugin classes (PluginBase, shared constants) belong to every plugin
    outside = code[:classes[0].start()]
    shared = re.findall(r'"(\w+)"\s*,\s*(?:[^,;{}()"]*,\s*)?PluginFieldType::(k\w+)', outside)
    for cls in registered:
        assert cls in spans, f"plugins.cpp: getCreators registers {cls}, but no such plugin class is defined"
        block = code[slice(*spans[cls])]
        name = _one(r'PluginBase\("(\w+)"\)', block, f"{cls}'s plugin name")
        fields = re.findall(r'"(\w+)"\s*,\s*(?:[^,;{}()"]*,\s*)?PluginFieldType::(k\w+)', block) + shared
        assert fields, f"plugins.cpp: {cls} declares no PluginField (name, PluginFieldType::k...)"
        members = dict(re.findall(r'\{\s*"(\w+)"\s*,\s*PluginFieldType::k\w+\s*,\s*&(\w+)\s*\}', block))
        inits = dict(re.findall(r"\b(m\w+)\s*\{\s*([-+0-9.eE]+)f?\s*\}", block))
        n_out = int(_one(r"getNbOutputs\(\)\s*const\s+noexcept\s+override\s*\{\s*return\s+(\d+)\s*;", block,
                         f"{cls}::getNbOutputs"))
        outputs: dict[int, str] = {}
        for stmt in _body(block, "getOutputDataTypes(", f"{cls}::getOutputDataTypes").split(";"):
            targets = re.findall(r"out\[(\d+)\]\s*=", stmt)
            if targets:
                rhs = stmt.rsplit("=", 1)[1].strip()
                assert rhs in CPP_OUT_TYPE, f"plugins.cpp: {cls}::getOutputDataTypes sets an output to {rhs!r}"
                outputs.update({int(t): CPP_OUT_TYPE[rhs] for t in targets})
        shapes = _body(block, "getOutputShapes(", f"{cls}::getOutputShapes")
        formats = _body(block, "supportsFormatCombination(", f"{cls}::supportsFormatCombination")
        info["plugins"][name] = {
            "fields": fields,
            "defaults": {f: float(inits[m]) for f, m in members.items() if m in inits},
            "n_outputs": n_out,
            "outputs": [outputs.get(i) for i in range(n_out)],
            "n_inputs": int(_one(r"nbInputs\s*!=\s*(\d+)", shapes, f"{cls}'s input count check")),
            "input_ranks": {int(i): int(r) for i, r in re.findall(r"in\[(\d+)\]\.nbDims\s*!=\s*(\d+)", shapes)},
            "out_ranks": {int(i): int(r) for i, r in re.findall(r"out\[(\d+)\]\.nbDims\s*=\s*(\d+)", shapes)},
            "typed_positions": {int(p): t for p, t in re.findall(
                r"pos\s*==\s*(\d+)\s*\)\s*return\s+io\[pos\]\.desc\.type\s*==\s*DataType::(k\w+)", formats)},
            "size_tensor": [int(i) for i in re.findall(r"declareSizeTensor\(\s*(\d+)", shapes)],
        }
    return info


CPP = parse_plugins_cpp(PLUGINS_CPP.read_text())


def onnx_outputs(name: str) -> list[str]:
    """Each schema output as "x" (a float type like input 0), "int64" or "int32"."""
    schema = OPS[name].schema
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    kinds = []
    for p in schema.outputs:
        types = allowed.get(p.type_str, {p.type_str})
        if types == {"tensor(int64)"}:
            kinds.append("int64")
        elif types == {"tensor(int32)"}:
            kinds.append("int32")
        else:
            assert types <= {"tensor(float)", "tensor(float16)", "tensor(bfloat16)"}, (name, p.name, types)
            kinds.append("x")
    return kinds


def onnx_fields(name: str) -> dict[str, str]:
    attrs = OPS[name].schema.attributes
    return {a: ONNX_FIELD_TYPE.get(attrs[a].type, str(attrs[a].type)) for a in attrs if a not in PLUGIN_ATTRS}


# ---------------------------------------------------------------------------------------------


def test_the_parse_found_the_plugins():
    assert set(CPP["plugins"]) == {"TokenMerge", "TokenDrop", "ThresholdMerge"}, sorted(CPP["plugins"])
    for name, p in CPP["plugins"].items():
        assert p["fields"] and p["n_outputs"] > 0 and p["n_inputs"] > 0, (name, p)


def test_lookup_keys_match():
    # the parser reads these two node attributes; the registry key is (op type, version, namespace)
    assert set(PLUGIN_ATTRS) == {"plugin_namespace", "plugin_version"}
    assert PLUGIN_ATTRS["plugin_namespace"] == CPP["namespace"] == pyplugins.NAMESPACE
    assert PLUGIN_ATTRS["plugin_version"] == CPP["version"] == pyplugins.VERSION
    for name in OPS:
        attrs = OPS[name].schema.attributes
        for key in PLUGIN_ATTRS:
            assert attrs[key].type == OpSchema.AttrType.STRING, (name, key)


def test_every_plugin_has_an_op_and_only_diffdrop_has_none():
    assert set(CPP["plugins"]) <= set(OPS), f"plugins without an ONNX op: {set(CPP['plugins']) - set(OPS)}"
    without = set(OPS) - set(CPP["plugins"])
    assert without == NO_PLUGIN, (
        f"ONNX ops without a C++ plugin: {sorted(without)}, expected {sorted(NO_PLUGIN)}; a new plugin needs its "
        "entry here (NO_PLUGIN) and in edgetok/trt/pyplugins.py, a new op needs a plugin or an entry in NO_PLUGIN")


@pytest.mark.parametrize("name", sorted(CPP["plugins"]))
def test_fields_are_the_onnx_attributes(name):
    cpp = dict(CPP["plugins"][name]["fields"])
    assert len(cpp) == len(CPP["plugins"][name]["fields"]), f"{name}: a field is declared twice"
    onnx_attrs = onnx_fields(name)
    assert not [a for a in onnx_attrs if a.startswith(EXTRA_FIELD_PREFIX)], onnx_attrs
    extra = {f: t for f, t in cpp.items() if f not in onnx_attrs}
    assert all(f.startswith(EXTRA_FIELD_PREFIX) for f in extra), (
        f"{name}: plugins.cpp fields {sorted(extra)} are no attribute of the ONNX op; the parser only passes node "
        f"attributes, so a field it need not pass must be named {EXTRA_FIELD_PREFIX}*")
    assert {f: cpp.get(f) for f in onnx_attrs} == onnx_attrs, (
        f"{name}: ONNX attributes (INT -> kINT32, FLOAT -> kFLOAT32) {onnx_attrs} vs plugins.cpp fields {cpp}")
    assert set(OPS[name].attrs) == set(onnx_attrs), (name, OPS[name].attrs)


@pytest.mark.parametrize("name", sorted(CPP["plugins"]))
def test_outputs_and_their_types(name):
    p = CPP["plugins"][name]
    assert None not in p["outputs"], f"{name}: getOutputDataTypes leaves an output unset: {p['outputs']}"
    assert p["n_outputs"] == len(OPS[name].schema.outputs), (name, p["n_outputs"], OPS[name].schema.outputs)
    assert p["outputs"] == onnx_outputs(name), (name, p["outputs"], onnx_outputs(name))
    assert p["n_inputs"] == len(OPS[name].schema.inputs), name
    assert [p["out_ranks"].get(i) for i in range(p["n_outputs"])] == list(OPS[name].out_ranks), (name, p["out_ranks"])
    # supportsFormatCombination fixes exactly the integer outputs, at position nbInputs + output index
    ints = {p["n_inputs"] + i: {"int64": "kINT64", "int32": "kINT32"}[t]
            for i, t in enumerate(p["outputs"]) if t != "x"}
    assert p["typed_positions"] == ints, (name, p["typed_positions"], ints)


def test_threshold_merge_size_tensor():
    # the data-dependent row count: a 0-D INT32 output declared as a size tensor (TensorRT 10 requires INT32)
    p = CPP["plugins"]["ThresholdMerge"]
    assert p["size_tensor"] == [3] and p["outputs"][3] == "int32" and p["out_ranks"][3] == 0
    assert OPS["ThresholdMerge"].schema.outputs[3].type_str == "tensor(int32)"


@pytest.mark.parametrize("name", sorted(CPP["plugins"]))
def test_standins_copy_the_cpp_plugins(name):
    assert set(pyplugins.SPECS) == set(CPP["plugins"])
    spec, cpp = pyplugins.SPECS[name], CPP["plugins"][name]
    onnx_attrs = onnx_fields(name)
    assert {f.name: STANDIN_FIELD_TYPE[f.kind] for f in spec.fields} == onnx_attrs, name
    # the C++ member defaults (used when a node lacks an attribute); at least the parsed ones agree
    assert cpp["defaults"], f"{name}: no field default parsed from plugins.cpp"
    for f in spec.fields:
        if f.name in cpp["defaults"]:
            assert f.default == pytest.approx(cpp["defaults"][f.name]), (name, f.name)
    assert list(spec.outputs) == cpp["outputs"]
    assert len(spec.input_ranks) == cpp["n_inputs"]
    assert {i: r for i, r in enumerate(spec.input_ranks)} == cpp["input_ranks"], (name, cpp["input_ranks"])
    assert pyplugins.BUILD_CHECK_VERSION != pyplugins.VERSION  # engines built with stand-ins cannot load the C++ one


def test_a_parse_that_finds_nothing_fails():
    with pytest.raises(AssertionError, match="cannot find kNamespace"):
        parse_plugins_cpp("// no plugins here\n")
    renamed = PLUGINS_CPP.read_text().replace("getNbOutputs()", "numOutputs()")
    with pytest.raises(AssertionError, match="getNbOutputs"):
        parse_plugins_cpp(renamed)


# ---------------------------------------------------------------------------------------------
# The stand-ins in TensorRT-RTX: parse and build each op (a fresh process: the loader fix must
# come before tensorrt_rtx_bindings is imported, which other test modules do at collection)
# ---------------------------------------------------------------------------------------------

BUILD_SCRIPT = textwrap.dedent("""
    import json, sys
    import onnx
    from edgetok.ops.onnx import op_model
    from edgetok.trt import pyplugins

    CASES = {"TokenDrop": ({"x": 3, "score": 2}, dict(keep=5, protect_first=1, fuse_dropped=1)),
             "TokenMerge": ({"x": 3, "metric": 3, "size": 3}, dict(r=4, protect_first=1)),
             "ThresholdMerge": ({"x": 3, "metric": 3, "size": 3}, dict(threshold=0.5, protect_first=1))}
    out = {}
    for name, (ranks, attrs) in CASES.items():
        for dtype in ("float32", "float16"):
            model = op_model(name, ranks, attrs, bodies=False)  # the trt target's form: the node alone
            if dtype == "float16":
                for v in [*model.graph.input, *model.graph.output]:
                    if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
                        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
            dims = {1: 16, 2: 8}  # static tokens and channels, dynamic batch
            for v in model.graph.input:
                for i, d in enumerate(v.type.tensor_type.shape.dim):
                    if i:
                        d.dim_value = dims[i]
            shapes = {k: tuple(tuple([b] + [dims[i] for i in range(1, r)]) for b in (1, 2, 4))
                      for k, r in ranks.items()}
            rep = pyplugins.check_build(model, shapes, keep_engine=True)
            rep["records_buildcheck"] = pyplugins.BUILD_CHECK_VERSION.encode() in rep.pop("engine")
            out[f"{name}/{dtype}"] = rep
    print("REPORT" + json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.tensorrt
def test_standins_build_each_op_in_tensorrt_rtx():
    if importlib.util.find_spec("tensorrt_rtx_bindings") is None:
        pytest.skip("TensorRT-RTX is not installed: pip install 'edgetok[rtx]'")
    proc = subprocess.run([sys.executable, "-c", BUILD_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    fused = 5 + 1
    expect = {  # (shape, dtype) of each plugin output; -1 = dynamic (batch, or the data-dependent row count)
        "TokenDrop": [((-1, fused, 8), "x"), ((-1, 5), "INT64")],
        "TokenMerge": [((-1, 16 - 4, 8), "x"), ((-1, 16 - 4, 1), "x")],
        "ThresholdMerge": [((-1, -1, 8), "x"), ((-1, -1, 1), "x"), ((-1,), "INT64"), ((), "INT32")],
    }
    for key, rep in report.items():
        name, dtype = key.split("/")
        x = {"float32": "FLOAT", "float16": "HALF"}[dtype]
        assert rep["engine_bytes"] > 0 and rep["records_buildcheck"], (key, rep)
        (layer,) = rep["plugin_layers"]
        got = [(tuple(shape), t) for _, shape, t in layer["outputs"]]
        assert got == [(shape, x if t == "x" else t) for shape, t in expect[name]], (key, got)
