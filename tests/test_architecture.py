"""The package's layers hold (import-linter contracts in pyproject.toml: a layer imports
only layers below it, shared modules import nothing else of edgetok), and the "one of
each" rules docs/architecture.md states: one place makes ONNX Runtime sessions, one
calls torch.onnx.export, one times with perf_counter."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken" in proc.stdout


def _files_with(pattern: str, *dirs: str) -> set[str]:
    rx = re.compile(pattern)
    return {str(p.relative_to(ROOT)) for d in dirs for p in (ROOT / d).rglob("*.py") if rx.search(p.read_text())}


def test_one_place_for_sessions_export_and_timing():
    assert _files_with(r"InferenceSession\(", "edgetok", "benchmarks", "samples") == {"edgetok/runtime/backends.py"}
    assert _files_with(r"torch\.onnx\.export\(", "edgetok") == {"edgetok/export/exporter.py"}
    assert _files_with(r"perf_counter", "edgetok", "benchmarks", "samples") == {"edgetok/validate/timing.py"}


def test_no_function_over_60_lines():
    import ast

    long = []
    for p in (ROOT / "edgetok").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                # an op's ONNX body reads best whole (one function per op, docs/ops.md)
                if not (p.name == "onnx.py" and p.parent.name == "ops"):
                    long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long
