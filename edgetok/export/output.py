"""The export's output directory: everything is written to a temporary directory beside
it first. A new directory is renamed into place when the export succeeded; into an
existing export directory only the files the export wrote are moved, one atomic rename
each, and every other file there (the user's notes, a build bundle, engines) stays. A
failed, interrupted (Ctrl-C, SIGTERM) or refused export leaves nothing behind."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ..errors import EdgetokError

MANIFEST = "manifest.json"


class OutputError(EdgetokError, OSError):
    """The output directory cannot be written as asked."""


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(output_dir, force: bool = False) -> None:
    """Refuse, before any work, a destination that cannot or must not be written."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"output {str(output_dir)!r} exists and is not a directory; choose another --output")
    if (output_dir.is_dir() and not force and any(output_dir.iterdir())
            and not (output_dir / MANIFEST).is_file()):
        raise OutputError(f"output directory {str(output_dir)!r} is not empty and holds no edgetok export; choose "
                          "an empty or new directory, or pass --force to write model.onnx and manifest.json into it")


def _prepare_dir(output_dir: Path, force: bool) -> tuple[Path, Optional[Path]]:
    """A fresh temporary directory beside ``output_dir`` (same filesystem, so the renames are
    atomic), and the topmost parent directory it had to create (removed again on failure)."""
    check_output(output_dir, force)
    parent = output_dir.resolve().parent
    created = next((p for p in reversed([parent, *parent.parents]) if not p.exists()), None)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=parent))
    except OSError as e:
        raise OutputError(f"cannot write to {str(parent)!r} ({e.strerror}); choose another --output") from None
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; the export is an ordinary directory
    return tmp, created


def _commit_dir(tmp: Path, output_dir: Path) -> None:
    if not output_dir.exists():
        os.rename(tmp, output_dir)
        return
    # an existing directory: replace the export's own files, the manifest last (it names the model's sha256)
    names = sorted((p.name for p in tmp.iterdir()), key=lambda n: n == MANIFEST)
    for name in names:
        dest = output_dir / name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(tmp / name, dest)
    tmp.rmdir()


@contextlib.contextmanager
def staged(output_dir: Path, force: bool = False):
    """A temporary directory for an export into ``output_dir``: committed when the block
    succeeds (see the module docstring), removed (with any parents it created) when it fails."""
    output_dir = Path(output_dir)
    tmp, created = _prepare_dir(output_dir, force)
    try:
        yield tmp
        _commit_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(created or tmp, ignore_errors=True)
        raise
