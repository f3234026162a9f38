"""Small file helpers: atomic writes, JSON and safe YAML."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from etesvs.errors import EtesvsError


@contextlib.contextmanager
def atomic_path(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    With ``directory=True`` the temporary path is a fresh directory and an existing ``path``
    directory is replaced. On an exception the temporary file or directory is removed, so a
    reader never sees a half-written output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        tmp = Path(name)
    try:
        yield tmp
        if directory:
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        else:
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    """Read JSON from ``path``; a missing or malformed file is a one-line :class:`EtesvsError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EtesvsError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise EtesvsError(f"{path}: malformed JSON at line {error.lineno}: {error.msg}") from None


def read_yaml(path: str | Path) -> Any:
    """Read YAML with ``yaml.safe_load`` (never the unsafe loader: files from elsewhere are untrusted)."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EtesvsError(f"{path}: file not found") from None
    except yaml.YAMLError as error:
        raise EtesvsError(f"{path}: malformed YAML: {' '.join(str(error).split())}") from None
