"""Write a directory all at once: a reader sees the old one, or the whole new one, never a mix.

``save`` and ``export`` write into a fresh temporary sibling and rename it into place, so an
interrupted write (Ctrl-C, a full disk) leaves the old directory (or nothing) and never old
files next to new ones. What may be replaced is decided before anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def same_directory(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


@contextlib.contextmanager
def replaced_atomically(path, may_replace):
    """Yields an empty temporary directory next to ``path``; on success it becomes ``path``.

    ``path`` may already exist only as an empty directory or where ``may_replace(path)`` returns
    None; otherwise it returns the reason, raised as ``FileExistsError`` before anything is
    written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        reason = may_replace(path)
        if reason is not None:
            raise FileExistsError(reason)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.writing-", dir=path.parent))
    try:
        yield scratch
        os.chmod(scratch, 0o755 & ~_umask())  # mkdtemp made it 0700: give it the usual mode
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)  # path now absent until the next rename
            os.replace(scratch, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(scratch, path)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
