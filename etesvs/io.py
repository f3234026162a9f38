"""File helpers that keep the user's data safe.

- :func:`atomic_path`, :func:`write_json`: a reader never sees a half-written file;
- :func:`read_json`, :func:`read_yaml`, :func:`read_text_lines`: untrusted text (safe YAML, a UTF-8 byte-order
  mark and CRLF line ends accepted), one-line errors;
- :func:`check_plain_name`, :func:`path_inside`: a name read from a split, label or annotation file is a plain
  file name, and a path built from it stays inside its root;
- :func:`claim_output_dir`: a stage writes only into a directory that it created or that holds its own marker, and
  replaces or removes only the files it wrote there (no recursive sweeps);
- :func:`load_weights_file`: ``torch.load`` of plain weights only, with one short line when a file is refused;
- :func:`ffmpeg_file_input`: the arguments that make ffmpeg open exactly the file the user named.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import yaml

from etesvs.errors import EtesvsError, describe_os_error

# Errors of a write that the destination's file system causes: named after the destination, whatever the library
# that hit them (h5py, PIL, torch) put into the exception.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


# ------------------------------------------------------------------------------------------------ atomic writes


def _temporary_name(path: Path) -> tuple[str, str]:
    """``mkstemp`` prefix and suffix of the temporary files beside ``path`` (see :func:`_is_own_temporary`)."""
    return f".{path.name}.", ".tmp"


def _is_own_temporary(name: str, owned: set[str]) -> bool:
    """True for ``.<owned name>.<8 random characters>.tmp``, what :func:`atomic_path` leaves when killed."""
    match = re.fullmatch(r"(.*/)?\.(.+)\.[A-Za-z0-9_]{8}\.tmp", name)
    return bool(match) and f"{match.group(1) or ''}{match.group(2)}" in owned


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in [*reversed(path.parents)] if p.exists() and not p.is_dir()), path.parent)
        raise EtesvsError(f"{blocking}: is a file, so {path} cannot be written under it") from None


@contextlib.contextmanager
def atomic_path(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    On an exception the temporary file is removed, so a reader never sees a half-written output. ``path`` naming
    a directory is a one-line error. With ``directory=True`` the temporary path is a fresh directory, renamed onto
    ``path``, which must not exist yet: an existing output directory is replaced through
    :func:`claim_output_dir`, which removes only the files its owner wrote.
    """
    path = Path(path)
    if directory and path.exists():
        raise EtesvsError(f"{path}: already exists (an output directory is replaced through claim_output_dir)")
    if not directory and path.is_dir():
        raise EtesvsError(f"{path}: is a directory, expected a file name")
    _make_parent(path)
    prefix, suffix = _temporary_name(path)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
        os.close(handle)
        tmp = Path(name)
    try:
        yield tmp
        if not directory:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as error:
        if tmp.is_dir():
            _remove_tree_of_new_files(tmp)
        elif tmp.exists():
            tmp.unlink()
        if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
            raise EtesvsError(describe_os_error(error, path)) from None
        raise


def _remove_tree_of_new_files(directory: Path) -> None:
    """Remove a temporary directory that this process created and filled (never a directory of the user's)."""
    for parent, dirnames, filenames in os.walk(directory, topdown=False):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(parent, d))]:
            os.unlink(os.path.join(parent, name))
        for name in dirnames:
            if not os.path.islink(os.path.join(parent, name)):
                os.rmdir(os.path.join(parent, name))
    os.rmdir(directory)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def check_output_file(path: str | Path, *, inputs: Iterable[str | Path] = (), suffixes: Sequence[str] = (),
                      new_only: bool = False) -> Path:
    """Refuse, before any work, an output file path that is a directory, lies under a file, is an input or lies
    inside an input directory; an existing file is replaced only when its name ends with one of ``suffixes``
    (what the output is: a user's video or label file is never taken for a report), never with ``new_only``."""
    path = Path(path)
    if path.is_dir():
        raise EtesvsError(f"{path}: is a directory, expected a file name")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise EtesvsError(f"{blocking}: is a file, so {path} cannot be written under it")
    for source in map(Path, inputs):
        if source.exists() and path.exists() and os.path.samefile(source, path):
            raise EtesvsError(f"{path}: is an input, it would be overwritten by the output")
        if source.is_dir() and _contains(source.resolve(), path.resolve()):
            raise EtesvsError(f"{path}: lies inside the input directory {source}; write the output elsewhere")
    if path.exists() and (new_only or (suffixes and not path.name.endswith(tuple(suffixes)))):
        wanted = "a new file" if new_only else " or ".join(suffixes)
        raise EtesvsError(f"{path}: exists and is not {wanted}: not replaced (choose another name)")
    return path


# ------------------------------------------------------------------------------------------------ reading text


def read_text(path: str | Path, *, what: str = "file") -> str:
    """The text of a UTF-8 file, without a byte-order mark; a missing, unreadable or binary file is one line."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise EtesvsError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise EtesvsError(f"{path}: is a directory, expected a {what}") from None
    except UnicodeDecodeError:
        raise EtesvsError(f"{path}: not a UTF-8 text file") from None
    except OSError as error:
        raise EtesvsError(describe_os_error(error, path)) from None


def read_text_lines(path: str | Path, *, what: str = "file") -> list[str]:
    """Lines of a UTF-8 text file: byte-order mark dropped, LF, CRLF or CR line ends (Windows editors write both)."""
    return read_text(path, what=what).splitlines()


def read_json(path: str | Path) -> Any:
    """Read JSON from ``path``; a missing or malformed file is a one-line :class:`EtesvsError`."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise EtesvsError(f"{path}: malformed JSON at line {error.lineno}: {error.msg}") from None


def read_yaml(path: str | Path) -> Any:
    """Read YAML with ``yaml.safe_load`` (never the unsafe loader: files from elsewhere are untrusted)."""
    path = Path(path)
    text = read_text(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise EtesvsError(f"{path}: malformed YAML: {' '.join(str(error).split())}") from None


# ------------------------------------------------------------------------------------------------ names and paths


def plain_name_fault(name: str) -> str | None:
    """Why ``name`` is not a plain file name (a path, absolute, ``..``, control characters), or None if it is."""
    if not name:
        return "it is empty"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", name):
        return "it is an absolute path"
    parts = re.split(r"[\\/]", name)
    if ".." in parts:
        return "it leads out of its directory with '..'"
    if len(parts) > 1:
        return "it contains a path separator"
    if name == ".":
        return "'.' names a directory"
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        return "it contains a control character"
    return None


def check_plain_name(name: str, *, source: str | Path, what: str = "video name") -> str:
    """Return ``name`` if it is a plain file name; else a one-line error naming ``source`` (``file:line``)."""
    fault = plain_name_fault(name)
    if fault is not None:
        raise EtesvsError(f"{source}: {what} {name!r} is not a plain name: {fault}")
    return name


def path_inside(root: str | Path, relative: str | Path, *, source: str | Path = "") -> Path:
    """``root / relative``, refused unless it stays inside ``root`` once ``.`` and ``..`` are resolved.

    The check is on the path as written, not through symbolic links: a dataset whose ``Videos/`` (or whose
    videos) are links to another disk is the user's own doing and must keep working.
    """
    root = Path(root)
    relative = str(relative)
    base = os.path.abspath(root)
    joined = os.path.normpath(os.path.join(base, relative))
    if os.path.isabs(relative) or joined == base or not joined.startswith(base.rstrip(os.sep) + os.sep):
        where = f"{source}: " if source else ""
        raise EtesvsError(f"{where}{relative!r} leads outside {root}")
    return root / os.path.relpath(joined, base)


# ------------------------------------------------------------------------------------------------ output directories

MARKER_NAME = ".etesvs-output.json"


@dataclass
class OutputDir:
    """An output directory claimed by one owner (a stage); created by :func:`claim_output_dir`.

    The marker file ``.etesvs-output.json`` names the owner and lists the files it wrote (relative POSIX
    paths); only those are ever replaced or removed. DVC tracks the marker with the directory's other files.
    A directory that DVC shows as plots (every file in it is drawn) keeps its marker beside it instead,
    ``<parent>/.<name>.etesvs-output.json``.
    """

    path: Path
    owner: str
    exclusive: bool
    files: set[str] = field(default_factory=set)
    inputs: tuple[Path, ...] = ()
    marker_inside: bool = True

    @property
    def marker(self) -> Path:
        return marker_path(self.path, inside=self.marker_inside)

    def file(self, name: str) -> Path:
        """Path of the owned file ``name`` (a plain name or a relative path of plain names) inside the directory.

        In a shared directory (``exclusive=False``), an existing file that the owner did not write is refused.
        """
        for part in name.split("/"):
            check_plain_name(part, source=self.path, what="output name")
        if name == MARKER_NAME:
            raise EtesvsError(f"{self.path}: output name {name!r} is reserved for the directory's marker")
        path = path_inside(self.path, name)
        if name not in self.files and (path.exists() or path.is_symlink()):
            raise EtesvsError(f"{path}: exists and was not written by {self.owner}; it is left alone, move it away")
        for source in self.inputs:
            if os.path.normpath(path) == os.path.normpath(source):
                raise EtesvsError(f"{path}: is an input of {self.owner}, it would be overwritten by the output")
        return path

    def expect(self, names: Iterable[str]) -> list[Path]:
        """Record ``names`` as the owner's before writing them, so files of an interrupted run are known as its own."""
        names = list(names)
        paths = [self.file(name) for name in names]
        if not set(names) <= self.files:
            self.files |= set(names)
            self._save()
        return paths

    def record(self, names: Iterable[str]) -> None:
        """Record files the owner has just created through a library that names them itself (TensorBoard's event
        files), so that they count as the owner's from now on."""
        names = [name for name in names if name not in self.files and name != MARKER_NAME]
        for name in names:
            for part in name.split("/"):
                check_plain_name(part, source=self.path, what="output name")
            if not path_inside(self.path, name).is_file():
                raise EtesvsError(f"{self.path / name}: recorded as an output of {self.owner} but not found")
        if names:
            self.files |= set(names)
            self._save()

    def retain(self, names: Iterable[str]) -> list[str]:
        """Remove the owner's files that are not in ``names`` (and directories they leave empty); returns them."""
        keep = set(names)
        removed = []
        for name in sorted(self.files - keep):
            path = self.path / name
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(name)
                self._prune_empty_parents(path)
        self.files = {name for name in self.files & keep}
        self._save()
        return removed

    @contextlib.contextmanager
    def replace(self, names: Sequence[str]) -> Iterator[dict[str, Path]]:
        """Write a new set of outputs: yields a temporary path beside each of ``names``, for the block to fill.

        When the block succeeds, each temporary file is renamed onto its name and the owner's files not in
        ``names`` are removed; when it fails, the temporary files are removed and the previous outputs stay (a
        directory created for this block is removed again).
        """
        created_dirs: list[Path] = [] if self.path.exists() else [self.path]
        self.expect(names)
        temporary: dict[str, Path] = {}
        try:
            for name in names:
                target = self.path / name
                for parent in reversed(target.relative_to(self.path).parents):
                    directory = self.path / parent
                    if not directory.exists():
                        directory.mkdir()
                        created_dirs.append(directory)
                prefix, suffix = _temporary_name(target)
                handle, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
                os.close(handle)
                temporary[name] = Path(tmp)
            yield dict(temporary)
            for name, tmp in temporary.items():
                os.chmod(tmp, 0o644)
                os.replace(tmp, self.path / name)
            temporary.clear()
        except BaseException as error:
            for tmp in temporary.values():
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            if created_dirs and created_dirs[0] == self.path and self.marker_inside:
                self.marker.unlink(missing_ok=True)  # the directory held nothing before this block
            for directory in reversed(created_dirs):
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only if empty
            if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
                raise EtesvsError(describe_os_error(error, self.path)) from None
            raise
        self.retain(names)

    def _prune_empty_parents(self, path: Path) -> None:
        parent = path.parent
        while parent != self.path and self.path in parent.parents:
            try:
                parent.rmdir()  # only if empty: never a recursive removal
            except OSError:
                return
            parent = parent.parent

    def _save(self) -> None:
        with atomic_path(self.marker) as tmp:
            tmp.write_text(json.dumps({"owner": self.owner, "files": sorted(self.files)}, indent=1) + "\n")


def _entries(directory: Path) -> list[str]:
    """Every file (and symbolic link) below ``directory`` as a relative POSIX path; directories only by content."""
    found = []
    for parent, dirnames, filenames in os.walk(directory):
        relative = Path(parent).relative_to(directory)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(parent, d))]:
            found.append((relative / name).as_posix())
    return sorted(found)


def marker_path(directory: Path, *, inside: bool = True) -> Path:
    """Where the marker of output directory ``directory`` lives (see :class:`OutputDir`)."""
    return directory / MARKER_NAME if inside else directory.parent / f".{directory.name}{MARKER_NAME}"


def _read_marker(marker: Path) -> dict | None:
    if not marker.exists():
        return None
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
        if isinstance(content.get("owner"), str) and isinstance(content.get("files"), list):
            return content
    except (ValueError, AttributeError, OSError):
        pass
    raise EtesvsError(f"{marker}: unreadable output marker; nothing in its directory is replaced or removed")


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def _protected(resolved: Path, *, exclusive: bool) -> str | None:
    """Why ``resolved`` is a place no stage writes into, or None."""
    if resolved == Path(resolved.anchor):
        return "it is the root of the file system"
    cwd = Path.cwd().resolve()
    if exclusive and _contains(resolved, cwd):
        return "it is the current directory" if resolved == cwd else "it contains the current directory"
    home = Path.home().resolve()
    if _contains(resolved, home):
        return "it is your home directory" if resolved == home else "it contains your home directory"
    for name in (".git", ".dvc", "dvc.yaml"):
        if (resolved / name).exists():
            return f"it is a project root (it holds {name})"
    return None


def claim_output_dir(
    path: str | Path,
    *,
    owner: str,
    inputs: Sequence[str | Path] = (),
    exclusive: bool = True,
    adopt: Callable[[Path], bool] | None = None,
    marker_inside: bool = True,
) -> OutputDir:
    """Make ``path`` the output directory of ``owner``, or refuse in one line before anything is written.

    ``path`` is taken if missing or empty (and created with its marker when the first file is written), and kept if
    it holds ``owner``'s marker. Refused: a file; the file-system root, your home directory, the current directory
    or anything containing them; a project root (``.git``, ``.dvc``, ``dvc.yaml``); a directory that is, contains
    or lies inside one of ``inputs``; a dataset root (``Videos/`` or ``groundTruth/``) not written by ``owner``;
    another owner's directory; and, with ``exclusive`` (the default), a directory holding any file the owner did
    not write.

    Args:
        path: the output directory.
        owner: who writes it, for the marker and the messages (the stage's name).
        inputs: files and directories the owner reads.
        exclusive: False for a directory shared with the user's files (a dataset root that a converter
            writes ``groundTruth/`` into): foreign files are then allowed, and never replaced or removed.
        adopt: for directories written before markers existed: a directory without marker whose every file
            satisfies ``adopt(file)`` is taken as ``owner``'s.
        marker_inside: False for a directory of DVC plots, whose marker is kept beside it (see :class:`OutputDir`).
    """
    path = Path(path)

    def refuse(reason: str) -> EtesvsError:  # one line naming the place, the stage and why
        return EtesvsError(f"{path}: {owner} will not write here: {reason}")
    reason = _unfit_place(path, inputs=inputs, exclusive=exclusive)
    if reason:
        raise refuse(reason)
    marker = _read_marker(marker_path(path, inside=marker_inside)) if path.is_dir() else None
    if marker is not None and marker["owner"] != owner:
        raise refuse(f"it holds the output of {marker['owner']}")
    files: set[str] = set(marker["files"]) if marker is not None else set()
    entries = _entries(path) if path.is_dir() else []
    own = files | ({MARKER_NAME} if marker_inside else set())
    if exclusive and marker is None and entries:
        if adopt is not None and all(adopt(path / entry) for entry in entries):
            files = set(entries)
        elif (path / "Videos").is_dir() or (path / "groundTruth").is_dir():
            raise refuse("it is a dataset root (it holds Videos/ or groundTruth/)")
        else:
            raise refuse(f"it holds files that {owner} did not write ({_examples(entries)})")
    if exclusive:
        foreign = [e for e in entries if e not in own and e not in files and not _is_own_temporary(e, own)]
        if foreign:
            raise refuse(f"it holds files that {owner} did not write ({_examples(foreign)})")
    resolved_inputs = tuple(Path(os.path.normpath(os.path.abspath(source))) for source in inputs)
    output = OutputDir(path, owner, exclusive, files, resolved_inputs, marker_inside)
    for entry in entries:
        if _is_own_temporary(entry, own):  # left by a run that was killed while writing
            (path / entry).unlink()
    if marker is None and files:  # adopted: from now on the marker says so
        output._save()
    return output


def _unfit_place(path: Path, *, inputs: Sequence[str | Path], exclusive: bool) -> str | None:
    """Why no output may go to ``path`` whatever it holds (a file, a protected place, an input), or None."""
    if path.exists() and not path.is_dir():
        return "it is a file, not a directory"
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        return f"{blocking} is a file"
    resolved = path.resolve()
    reason = _protected(resolved, exclusive=exclusive)
    if reason:
        return reason
    for source in inputs:
        source_resolved = Path(source).resolve()
        if source_resolved == resolved:
            return f"it is the input {source}"
        if exclusive and _contains(resolved, source_resolved):
            return f"it contains the input {source}"
        if exclusive and _contains(source_resolved, resolved):
            return f"it lies inside the input directory {source}"
    return None


def _examples(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ------------------------------------------------------------------------------------------------ weights


def load_weights_file(path: str | Path, *, what: str = "weights file", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers of them, never code.

    Every failure is one short :class:`EtesvsError` naming the file: not found, a directory, unreadable, empty,
    truncated or not a PyTorch file, or ``not loaded: the file holds code or objects that are not plain
    weights`` (a pickled module or a malicious payload; torch's own message suggests ``weights_only=False``,
    which would run that code, so it is not repeated).
    """
    import pickle

    import torch

    path = Path(path)
    if path.is_dir():
        raise EtesvsError(f"{path}: is a directory, expected a {what}")
    if not path.is_file():
        raise EtesvsError(f"{path}: {what} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols on stderr, on more lines
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # A file that names a Python object (a class, a function such as os.system) is refused by torch's safe
        # unpickler with "GLOBAL", or earlier on an opcode it does not know (a raw pickle of a newer protocol):
        # then the file's opcodes, read without running them, tell a pickle of objects from bytes of no pickle.
        if "GLOBAL" in str(error) or _pickle_names_objects(path):
            raise EtesvsError(
                f"{path}: not loaded: the file holds code or objects that are not plain weights"
            ) from None
        raise EtesvsError(f"{path}: truncated or not a PyTorch {what}") from None
    except OSError as error:
        raise EtesvsError(describe_os_error(error, path)) from None
    except EOFError:
        raise EtesvsError(f"{path}: empty or truncated {what}") from None
    except Exception:  # torch raises RuntimeError, KeyError, ValueError... for foreign or damaged files
        raise EtesvsError(f"{path}: truncated or not a PyTorch {what}") from None


def _pickle_names_objects(path: Path, *, limit: int = 1 << 24) -> bool:
    """True if ``path`` parses as a pickle that imports or builds Python objects (opcodes read, never run)."""
    import pickletools

    object_opcodes = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}
    try:
        with open(path, "rb") as handle:
            return any(op.name in object_opcodes for op, _, _ in pickletools.genops(handle.read(limit)))
    except Exception:  # not a pickle (or cut short): bytes of something else
        return False


# ------------------------------------------------------------------------------------------------ ffmpeg

# Demuxers of video files. Others open further files (concat lists, playlists, image sequences) or decode things
# that are not videos; a name such as "concat:a.mp4|b.mp4" is read as a file name, never as an ffmpeg URL.
FFMPEG_VIDEO_FORMATS = (
    "mov", "matroska", "avi", "mpeg", "mpegts", "mpegvideo", "flv", "live_flv", "asf", "ogg", "h264", "hevc",
    "vvc", "m4v", "mjpeg", "nut", "mxf", "dv", "rm", "ivf", "obu", "av1", "vc1", "yuv4mpegpipe", "gif", "apng",
    "wtv", "h261", "h263", "nuv", "smjpeg", "cavsvideo", "dirac", "avs2", "avs3", "evc", "bink", "smk", "flic",
)  # fmt: skip


def ffmpeg_file_input(path: str | Path) -> list[str]:
    """ffmpeg input arguments that open exactly the file ``path``: ``-protocol_whitelist file``, the video
    demuxers only (:data:`FFMPEG_VIDEO_FORMATS`), and ``-i file:<absolute path>``.

    Without them ffmpeg reads ``concat:a|b``, ``subfile:``, ``http:``, ``pipe:`` ... in a name as protocols,
    and a file's content can pick a demuxer that opens other files (an ffconcat list named ``x.mp4``).
    """
    absolute = os.path.abspath(path)
    return [
        "-protocol_whitelist", "file", "-format_whitelist", ",".join(FFMPEG_VIDEO_FORMATS),
        "-i", f"file:{absolute}",
    ]  # fmt: skip


def ffmpeg_file_output(path: str | Path) -> str:
    """The ffmpeg output argument that writes exactly the file ``path`` (``file:<absolute path>``)."""
    return f"file:{os.path.abspath(path)}"
