"""The export's output directory: everything is written to a temporary directory beside
it and renamed into place when the export succeeded, so a failed or interrupted export
leaves nothing behind."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ..errors import EdgetokError


class OutputError(EdgetokError, OSError):
    """The output directory cannot be written as asked."""


def _prepare_dir(output_dir: Path) -> tuple[Path, Optional[Path]]:
    """A fresh temporary directory beside ``output_dir`` (same filesystem, so the final
    rename is atomic), and the topmost parent directory it had to create (removed
    again on failure); fails early when the destination cannot be written."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"output {str(output_dir)!r} exists and is not a directory; choose another --output")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / "manifest.json").is_file():
        raise OutputError(f"output directory {str(output_dir)!r} is not empty and holds no edgetok export; "
                          "choose an empty or new directory")
    parent = output_dir.resolve().parent
    created = next((p for p in reversed([parent, *parent.parents]) if not p.exists()), None)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=parent))
    except OSError as e:
        raise OutputError(f"cannot write to {str(parent)!r} ({e.strerror}); choose another --output") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary directory
    return tmp, created


def _commit_dir(tmp: Path, output_dir: Path) -> None:
    old = None
    if output_dir.exists():  # a previous export: swap it out, then remove it
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        os.rename(output_dir, old)
    os.rename(tmp, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged(output_dir: Path):
    """A temporary directory beside ``output_dir``, renamed into place when the block
    succeeds and removed (with any parents it created) when it fails."""
    tmp, created = _prepare_dir(output_dir)
    try:
        yield tmp
        _commit_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(created or tmp, ignore_errors=True)
        raise
