"""export_configs/*.yaml: every shipped config validates; bad ones fail naming file, key and allowed values."""
import pytest
import yaml

from edgetok.config import ConfigError, VersionRange, list_configs, load_config

SHIPPED = ["cpu-ort", "cuda-ort", "jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "jetson-xavier",
           "a100", "h100", "l4", "t4", "rtx"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.batch.min <= cfg.batch.opt <= cfg.batch.max
    if cfg.runtime == "tensorrt":
        assert cfg.tensorrt is not None and cfg.sm is not None


def test_every_shipped_config_is_listed():
    assert set(SHIPPED) <= set(list_configs())


def test_device_facts():
    nano, nx, agx, xavier = (load_config(n) for n in ("jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin",
                                                       "jetson-xavier"))
    assert nano.dla_cores == 0 and nx.dla_cores > 0 and agx.dla_cores > 0
    for c in (nano, nx, agx):
        assert (c.sm, c.cuda, c.target, c.plugin_api) == (87, "12.6", "trt", "IPluginV3")
        assert c.tensorrt.contains("10.3.0")
    assert xavier.sm == 72 and xavier.plugin_api == "none" and not xavier.adaptive and xavier.target == "inlined" and xavier.tensorrt.contains("8.5.2")
    assert not xavier.tensorrt.contains("10.3")


def _write(tmp_path, **change):
    data = yaml.safe_load(open(list_configs()["t4"]))
    data.update(change)
    for k, v in list(data.items()):
        if v is None:
            del data[k]
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(
    "change, words",
    [
        ({"precisoin": "fp16"}, ["unknown key 'precisoin'", "precision"]),
        ({"precision": "fp8"}, ["'precision'", "'fp8'", "fp32, fp16, int8, best"]),
        ({"target": "tensorrt"}, ["'target'", "portable, trt, trt-override, inlined"]),
        ({"batch": {"min": 4, "opt": 1, "max": 8}}, ["'batch'", "min <= opt <= max"]),
        ({"opset": 9}, ["'opset'", "17"]),
        ({"tensorrt": {"min": "ten"}}, ["'tensorrt'", "version"]),
        ({"runtime": None}, ["missing required key 'runtime'"]),
    ],
)
def test_bad_config_names_file_key_and_allowed(tmp_path, change, words):
    p = _write(tmp_path, **change)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg
    for w in words:
        assert w in msg


def test_unknown_config_name_lists_known():
    with pytest.raises(ConfigError, match="known configs: .*jetson-orin-nano"):
        load_config("jetson-nano-2gb")


def test_version_range():
    r = VersionRange("10.7", "10.14")
    assert r.contains("10.7.0.23") and r.contains("10.14") and not r.contains("10.15.1") and not r.contains("10.6")
