"""The device build bundle: what `edgetok build` writes when TensorRT is not
installed (a laptop preparing a Jetson build, a CI machine).

The bundle (``trt_build/``) is self-contained: the ONNX model (and its
float16 cast when the config's TensorRT range reaches the strongly typed
TensorRT 11), the plugin sources, ``build.json`` (the plan) and
``build_engine.sh``, which on the device checks the TensorRT version and GPU
against the config, builds the edgetok plugin library, runs the equivalent
trtexec command (``--dynamicPlugins``, shapes, precision, timing cache) and
writes ``engine.json``. It skips the build when nothing changed.
"""
from __future__ import annotations

import hashlib
import shlex
import shutil
from pathlib import Path
from typing import Optional

from .._version import __version__
from ..runtime.artifacts import write_atomic, write_json
from .plan import BuildPlan, vtuple

SCRIPT = "build_engine.sh"
PLUGIN_BUILD_DIR = "build/plugins"
DEFAULT_LIBRARY = "libedgetok_trt_plugins.so"
# Tegra SoC -> compute capability, for Jetsons without nvidia-smi
TEGRA_SM = {"tegra234": 87, "tegra194": 72, "tegra186": 62}


def plugin_sources() -> Optional[Path]:
    src = Path(__file__).resolve().parents[2] / "plugins"
    return src if (src / "CMakeLists.txt").exists() else None


def plugin_build_commands(sm: Optional[int]) -> tuple[list[str], str]:
    """(shell commands building the TensorRT plugin library in the bundle, the library they produce);
    the CMake options are those edgetok.ops.plugins.build uses."""
    try:
        from ..ops.plugins import LIBRARIES

        name = LIBRARIES["trt"]
    except (ImportError, KeyError):
        name = DEFAULT_LIBRARY
    arch = f" -DCMAKE_CUDA_ARCHITECTURES={sm}" if sm else ""
    return [
        f"cmake -S plugins -B {PLUGIN_BUILD_DIR} -DCMAKE_BUILD_TYPE=Release -DEDGETOK_BUILD_KERNELS=ON "
        f"-DEDGETOK_BUILD_TRT_PLUGIN=ON{arch}",
        f'cmake --build {PLUGIN_BUILD_DIR} -j"$(nproc)"',
    ], f"{PLUGIN_BUILD_DIR}/{name}"


def _reaches_trt11(plan: BuildPlan) -> bool:
    rng = plan.config.tensorrt
    return rng is None or rng.max is None or vtuple(rng.max)[:1] >= (11,)


def _below_trt11(plan: BuildPlan) -> bool:
    rng = plan.config.tensorrt
    return rng is None or vtuple(rng.min)[:1] < (11,)


def _hash_tree(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _q(args: list[str]) -> str:
    # run the detected trtexec; keep $VARS expandable (double-quoted), quote everything else
    args = ['"$TRTEXEC"'] + args[1:]
    return " ".join(a if a.startswith('"$') else f'"{a}"' if "$" in a else shlex.quote(a) for a in args)


def write_build_bundle(plan: BuildPlan, bundle: Path, plugin_lib: Optional[Path] = None,
                       rtx_check: Optional[dict] = None) -> Path:
    """Write the bundle into ``bundle``; returns the script path. ``rtx_check``: what building the
    graph with TensorRT-RTX here found (builder.rtx_build_check), recorded in build.json."""
    bundle = Path(bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    cfg = plan.config
    write_atomic(bundle / "model.onnx", plan.onnx.read_bytes())
    variants = {}  # "weak" (TensorRT < 11) / "strong" (>= 11) -> (onnx file, argv)
    engine, cache, lib = "engine.plan", "$TIMING_CACHE", "$PLUGIN_LIB"
    if _below_trt11(plan):
        ref = cfg.tensorrt.min if cfg.tensorrt else "10.0"
        variants["weak"] = ("model.onnx", plan.trtexec_command(ref, engine, "model.onnx", lib, cache))
    if _reaches_trt11(plan):
        cast, _, _ = plan.precision_for("11.0")
        onnx_name = "model.onnx"
        if cast:
            import onnx

            from .cast import cast_model, fp32_gemm

            onnx_name = f"model.{cast}.onnx"
            write_atomic(bundle / onnx_name, cast_model(onnx.load(str(plan.onnx)), cast, fp32_gemm(cfg)).SerializeToString())
        variants["strong"] = (onnx_name, plan.trtexec_command("11.0", engine, onnx_name, lib, cache))
    src = plugin_sources()
    plugin_cmds, built_lib = plugin_build_commands(cfg.sm)
    if plan.needs_plugin and src is not None:
        shutil.copytree(src, bundle / "plugins", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("build", "build-*", "*.o", "*.so"))
    plugins_hash = _hash_tree(bundle / "plugins") if (bundle / "plugins").exists() else None
    input_key = hashlib.sha256(f"{plan.onnx_sha256} {plan.config_hash()} {plugins_hash} {plan.dla_core}".encode()).hexdigest()
    profile = {name: {k: list(v) for k, v in p.items()} for name, p in plan.profile().items()}
    write_json(bundle / "build.json", {
        "schema": "edgetok.build-bundle/1",
        "config": cfg.to_dict(),
        "config_sha256": plan.config_hash(),
        "onnx": {"path": "model.onnx", "sha256": plan.onnx_sha256},
        "inputs": [i.to_dict() for i in plan.inputs],
        "profile": profile,
        "outputs": [o.to_dict() for o in plan.outputs],
        "needs_plugin": plan.needs_plugin,
        "plugin_build": plugin_cmds if plan.needs_plugin else [],
        "trtexec": {k: v[1] for k, v in variants.items()},
        "input_key": input_key,
        "rtx_build_check": rtx_check,
        "edgetok": __version__,
    })
    script = bundle / SCRIPT
    write_atomic(script, _script_text(plan, variants, plugin_cmds, built_lib, input_key, profile,
                                      have_sources=(bundle / "plugins").exists()))
    script.chmod(0o755)
    return script


def _precision_notes(plan) -> list[str]:
    """What the builds' precision flags mean, for each TensorRT the config spans (deduplicated)."""
    cfg = plan.config
    versions = [cfg.tensorrt.min if cfg.tensorrt else "10.0"] if _below_trt11(plan) else []
    versions += ["11.0"] if _reaches_trt11(plan) else []
    return list(dict.fromkeys(n for v in versions for n in plan.precision_for(v)[2]))


def _script_text(plan, variants, plugin_cmds, built_lib, input_key, profile, have_sources: bool) -> str:
    cfg = plan.config
    lines = [
        "#!/usr/bin/env bash",
        f"# Build the TensorRT engine for config {cfg.name!r} ({cfg.description}).",
        f"# Written by edgetok {__version__} on a machine without TensorRT; run it on the device:",
        f"#   bash {SCRIPT}            (env: TRTEXEC, EDGETOK_PLUGIN_LIBRARY, TIMING_CACHE, FORCE=1)",
        *[f"# Input {name}: min {p['min']} opt {p['opt']} max {p['max']}" for name, p in profile.items()],
        f"# Precision {cfg.precision}; workspace {cfg.workspace_mib} MiB.",
        *[f"# Note: {note}" for note in _precision_notes(plan)],
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'die() { echo "error: $*" >&2; exit 1; }',
        "",
        *_check_tensorrt(cfg), *_check_gpu(cfg), *_skip_when_built(input_key),
        *(_plugin_library(plugin_cmds, built_lib, have_sources) if plan.needs_plugin else []),
        *_engine(variants), *_engine_manifest(),
    ]
    return "\n".join(lines) + "\n"


def _check_tensorrt(cfg) -> list[str]:
    rng = cfg.tensorrt
    lo = ".".join(map(str, vtuple(rng.min))) if rng else "0"
    hi = ".".join(map(str, vtuple(rng.max))) if rng and rng.max else ""
    return [
        "# -- TensorRT: trtexec and its version --",
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        '[ -x "$TRTEXEC" ] || die "trtexec not found (JetPack: /usr/src/tensorrt/bin/trtexec); install TensorRT or set TRTEXEC"',
        # trtexec prints "TensorRT vMMmmpp" (e.g. v100300 = 10.3.0, v8503 = 8.5.3)
        'V=$("$TRTEXEC" --help 2>&1 | grep -o "TensorRT v[0-9]*" | head -1 | tr -dc 0-9 || true)',
        '[ -n "$V" ] || die "cannot read the TensorRT version from $TRTEXEC --help"',
        'TRT_VERSION="$((V / 10000)).$((V / 100 % 100)).$((V % 100))"',
        'vercmp() { printf "%s\\n%s\\n" "$1" "$2" | sort -V | head -1; }  # prints the smaller version',
        f'LO="{lo}"; HI="{hi}"',
        '[ "$(vercmp "$TRT_VERSION" "$LO")" = "$LO" ] || die "TensorRT $TRT_VERSION is older than $LO, which config '
        + cfg.name + ' needs"',
        'if [ -n "$HI" ]; then MAJMIN="${TRT_VERSION%.*}"; [ "$(vercmp "$MAJMIN" "$HI")" = "$MAJMIN" ] || '
        'die "TensorRT $TRT_VERSION is newer than ' + (hi or "any") + f', the range of config {cfg.name}; use that device\'s config"; fi',
        "",
    ]


def _check_gpu(cfg) -> list[str]:
    return [
        "# -- GPU: the config's compute capability --",
        f'WANT_SM="{cfg.sm or ""}"',
        'SM=""',
        'if command -v nvidia-smi >/dev/null 2>&1; then SM=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -dc 0-9 || true); fi',
        'if [ -z "$SM" ] && [ -r /proc/device-tree/compatible ]; then',
        *[f'  tr "\\0" "\\n" < /proc/device-tree/compatible | grep -qx "nvidia,{soc}" && SM={sm}' for soc, sm in TEGRA_SM.items()],
        '  true',
        "fi",
        'if [ -n "$WANT_SM" ] && [ -n "$SM" ] && [ "$SM" != "$WANT_SM" ]; then',
        f'  die "this GPU is sm_$SM but config {cfg.name} targets sm_$WANT_SM; use the config for this device"',
        "fi",
        '[ -n "$SM" ] || echo "warning: could not detect the GPU compute capability; assuming sm_$WANT_SM" >&2',
        "",
    ]


def _skip_when_built(input_key: str) -> list[str]:
    return [
        f'INPUT_KEY="{input_key}"',
        'STAMP="$INPUT_KEY $TRT_VERSION ${SM:-$WANT_SM}"',
        'if [ -z "${FORCE:-}" ] && [ -f engine.plan ] && [ -f .build_stamp ] && [ "$(cat .build_stamp)" = "$STAMP" ]; then',
        '  echo "engine.plan is up to date (TensorRT $TRT_VERSION, sm_${SM:-$WANT_SM}); FORCE=1 rebuilds"; exit 0',
        "fi",
        'TIMING_CACHE="${TIMING_CACHE:-${EDGETOK_CACHE_DIR:-$HOME/.cache/edgetok}/timing/sm_${SM:-$WANT_SM}-trt$TRT_VERSION.cache}"',
        'mkdir -p "$(dirname "$TIMING_CACHE")"',
        "",
    ]


def _plugin_library(plugin_cmds, built_lib, have_sources: bool) -> list[str]:
    lines = ["# -- the edgetok plugin library (the ONNX has edgetok nodes TensorRT runs as plugins) --",
             'PLUGIN_LIB="${EDGETOK_PLUGIN_LIBRARY:-}"',
             'if [ -z "$PLUGIN_LIB" ]; then']
    if have_sources:
        lines += ["  " + c for c in plugin_cmds] + [f'  PLUGIN_LIB="{built_lib}"']
    else:
        lines += ['  die "this bundle has no plugin sources; build libedgetok_plugins.so on the device and set EDGETOK_PLUGIN_LIBRARY"']
    return lines + ["fi", '[ -f "$PLUGIN_LIB" ] || die "plugin library $PLUGIN_LIB not found"', ""]


def _engine(variants) -> list[str]:
    lines = ["# -- the engine --", 'TRT_MAJOR="${TRT_VERSION%%.*}"']
    weak, strong = variants.get("weak"), variants.get("strong")
    if weak and strong:
        return lines + ['if [ "$TRT_MAJOR" -ge 11 ]; then',
                        "  # TensorRT 11 is strongly typed: the cast model carries the precision",
                        "  " + _q(strong[1]), "else", "  " + _q(weak[1]), "fi"]
    return lines + [_q((weak or strong)[1])]


def _engine_manifest() -> list[str]:
    return [
        "",
        "# engine.json: what the engine was built for (edgetok checks it before loading)",
        "cp build.json engine.json.tmp",
        "if python3 - \"$TRT_VERSION\" \"${SM:-$WANT_SM}\" <<'PY'",
        "import json, subprocess, sys",
        "m = json.load(open('engine.json.tmp'))",
        "try:",
        "    name = subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'], capture_output=True, text=True).stdout.strip().splitlines()[0]",
        "except Exception:",
        "    name = open('/proc/device-tree/model').read().strip('\\0') if __import__('os').path.exists('/proc/device-tree/model') else 'unknown'",
        "m.update(schema='edgetok.engine/1', tensorrt=sys.argv[1], gpu={'name': name, 'sm': int(sys.argv[2])},",
        "         inputs=[dict(i, profile=m['profile'][i['name']]) for i in m['inputs']])",
        "json.dump(m, open('engine.json.tmp', 'w'), indent=2)",
        "PY",
        "then mv engine.json.tmp engine.json",
        'else rm -f engine.json.tmp; echo "warning: python3 failed; engine.json not written (edgetok cannot check this engine)" >&2',
        "fi",
        'echo "$STAMP" > .build_stamp',
        'echo "built $(pwd)/engine.plan with TensorRT $TRT_VERSION"',
    ]
