"""Small shared helpers: device resolution, seeding, atomic checkpoint I/O, strict JSON output, one-line
CLI errors, the repository root."""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import re
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch


class ArgParser(argparse.ArgumentParser):
    """argparse whose errors are one line (exit 2): the reason and a pointer to --help, no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class BadArguments(SystemExit):
    """Exit status 2 for bad command-line arguments, with a one-line message: printed to stderr by
    ``bad_arguments`` and kept as the exception's text (``str(e)``) for callers of ``main()``."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def bad_arguments(prog: str, err: Exception) -> BadArguments:
    """Print ``prog: error: <first line of err>`` to stderr; return the BadArguments to raise."""
    msg = f"{prog}: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    print(msg, file=sys.stderr)
    return BadArguments(msg)


def check_writable(folder, flag: str = "--out") -> None:
    """Create ``folder`` if needed and write a probe file there; ValueError with one line if not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {folder}: cannot write there ({type(e).__name__}: {e.strerror or e})") from None


def check_checkpoint_file(path, flag: str) -> None:
    """An existing file that is a torch zip archive (what ``torch.save`` writes), else ValueError
    with one line naming the flag; the full read (``load_checkpoint``) comes later."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{flag} not found: {path}")
    if not p.is_file():
        raise ValueError(f"{flag} {path}: a folder, not a checkpoint file")
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{flag} {path}: not a checkpoint ({p.stat().st_size} bytes, no torch zip archive)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the one-line message names the file and what is wrong."""


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda if available, else cpu; anything else is passed to torch.device and must be
    usable on this machine (ValueError with one line otherwise: a typo, or CUDA / MPS missing)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a torch device ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: unsupported (use auto, cpu, cuda[:i] or mps)")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash mid-write
    leaves the previous file intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = _os_error(e)
        if cause is not None:   # a full disk surfaces as torch's "enforce fail at inline_container": say what it is
            raise WriteError(cause.errno, f"{path}: cannot write ({cause.strerror or cause}); "
                                          f"the previous {path.name}, if any, is intact") from None
        raise
    return path


class WriteError(OSError):
    """A file that could not be written (a full disk, a quota): one line naming the path and the
    reason, e.g. "No space left on device"."""

    def __str__(self):
        return str(self.strerror)


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (itself, or its cause / context: torch wraps write errors in a
    RuntimeError), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def load_checkpoint(path: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """Read a checkpoint written by ``atomic_save`` with ``weights_only=True`` (no pickled code).

    Anything else raises ``CheckpointError`` (or FileNotFoundError) with one line naming the file
    and what is wrong: a folder, an empty or truncated file, a file that is not a torch zip
    archive, or one holding objects beyond tensors and plain types. The message never suggests
    ``weights_only=False``: an nbcore checkpoint never needs it, and a file that does could run
    code when loaded. ``mmap``: map the storages instead of reading them (a cheap look at the
    plain entries).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint file (a {'folder' if path.is_dir() else 'special file'})")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since 1.6; a cut one loses its central directory.
        raise CheckpointError(f"{path}: not a readable checkpoint ({size} bytes, no complete torch zip "
                              "archive: truncated, corrupt, or another kind of file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch's pickle-protocol warning adds nothing here
            ck = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f", e.g. {found.group(1)}" if found else ""
        raise CheckpointError(f"{path}: holds objects beyond tensors and plain types{what}; refused "
                              "(not an nbcore checkpoint)") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                              f"{_first_line(str(e)) or 'no detail'})") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path}: holds a {type(ck).__name__}, not a checkpoint dict")
    return ck


def _first_line(msg: str, limit: int = 160) -> str:
    """The first sentence-ish of ``msg`` on one line, without torch's advice to load unsafely."""
    line = msg.strip().splitlines()[0] if msg.strip() else ""
    if "weights_only" in line:
        line = line.split("weights_only")[0].rstrip(" (`,.")
    return line[:limit]


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write strict JSON atomically (temporary file + rename).

    Non-finite floats (NaN, +-Inf; JSON has no token for them) are written as ``null`` and, when
    ``obj`` is a dict, listed with their reason under ``"nonfinite"``: {"a.b.c": "nan" | "inf" |
    "-inf"} (dotted path of the key). Tensors and numpy values become plain numbers / lists first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reasons: dict = {}
    clean = _strict(obj, "", reasons)
    if reasons and isinstance(clean, dict):
        clean = {**clean, "nonfinite": {**clean.get("nonfinite", {}), **reasons}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def _strict(x, where: str, reasons: dict):
    """``x`` as plain JSON types, non-finite floats -> None (reason recorded at ``where``)."""
    if isinstance(x, (np.ndarray, torch.Tensor, np.generic, Path)):
        x = _jsonable(x)
    if isinstance(x, float):
        if math.isfinite(x):
            return x
        reasons[where or "value"] = "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
        return None
    if isinstance(x, dict):
        return {k: _strict(v, f"{where}.{k}" if where else str(k), reasons) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v, f"{where}[{i}]", reasons) for i, v in enumerate(x)]
    if x is None or isinstance(x, (str, int, bool)):
        return x
    raise TypeError(f"not JSON serialisable: {type(x).__name__} at {where or 'top level'}")


def _jsonable(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The folder holding pyproject.toml above ``start`` (default: the cwd), else the cwd. Lets a
    notebook opened in JupyterLab (cwd = notebooks/) find outputs/ without absolute paths."""
    here = Path(start or os.getcwd()).resolve()
    for p in [here, *here.parents]:
        if (p / "pyproject.toml").exists() and (p / "nbcore").is_dir():
            return p
    return here


class HookUnavailable(RuntimeError):
    """Raised by a training hook that cannot run in this setting (e.g. no data to validate on): the
    trainer prints the reason once and turns that hook off for the rest of the run."""
