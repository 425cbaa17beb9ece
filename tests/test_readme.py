"""The README's main command stays true: its edgetok part (after the install)
runs as written, in a scratch directory, with this environment's edgetok."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def main_command() -> list[list[str]]:
    """The commands of the README's first bash block after `pip install`, split on &&."""
    block = re.search(r"```bash\n(.*?)\n```", README.read_text(), re.S).group(1)
    steps = [s.strip() for s in block.split("&&")]
    assert steps[0].startswith("python3 -m venv .venv") and "pip install" in steps[1], steps[:2]
    return [shlex.split(s) for s in steps[2:]]


def test_readme_main_command_runs(tmp_path):
    commands = main_command()
    assert commands and all(c[0] == ".venv/bin/edgetok" for c in commands)
    edgetok = [sys.executable, "-m", "edgetok.cli"]
    for cmd in commands:
        out = subprocess.run(edgetok + cmd[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{shlex.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    assert (tmp_path / "out" / "vit_tiny_tome" / "model.onnx").is_file()
    assert "vs baseline" in out.stdout
