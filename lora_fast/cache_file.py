"""The file where lora_fast keeps what it measured on a GPU between processes: the dispatcher's path
choices (lora_fast.dispatch) and the kernels' tuned configs (kernels/tuning.py).

LORA_FAST_DISPATCH_CACHE names it (default ~/.cache/lora_fast/dispatch.json, under XDG_CACHE_HOME
when set; an empty value keeps everything in the process). It holds one section per device name and
torch / triton / lora_fast version — a new driver stack or release measures again — and each
section maps an entry's key string to a JSON object. Writes replace the file atomically: a
concurrent reader sees the old file or the new one, never half of one (see `write`).
"""
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch


def path():
    """The cache file's path, or None when choices stay in the process."""
    value = os.environ.get("LORA_FAST_DISPATCH_CACHE")
    if value is None:
        root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(root) / "lora_fast" / "dispatch.json"
    return Path(value) if value else None


def section_name(device):
    import triton

    from lora_fast import __version__
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name} | torch {torch.__version__} | triton {triton.__version__} | lora_fast {__version__}"


def read(file):
    """The file's contents ({} if it does not exist); a file that is not a cache is warned about and
    treated as empty (the next write replaces it)."""
    try:
        data = json.loads(file.read_text())
    except (FileNotFoundError, NotADirectoryError):   # nothing there (yet): `write` says if it cannot be
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"LORA_FAST_DISPATCH_CACHE: {file} is not a readable dispatch cache ({e}); "
                      "measuring again and rewriting it", RuntimeWarning, stacklevel=3)
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        warnings.warn(f"LORA_FAST_DISPATCH_CACHE: {file} is not a dispatch cache (expected an object "
                      "of sections); measuring again and rewriting it", RuntimeWarning, stacklevel=3)
        return {}
    return data


_sections = {}   # (file, section name) -> the section: read once per process, kept up to date by `write`


def read_section(device):
    """This device's section of the file ({} without a file), read on the first call and then kept
    in the process (what this process writes included; another process's later writes are not)."""
    file = path()
    if file is None:
        return {}
    name = section_name(device)
    if (file, name) not in _sections:
        _sections[file, name] = read(file).get(name, {})
    return _sections[file, name]


def clear():
    """Forget the sections read (the next read_section reads the file again)."""
    _sections.clear()


_unwritable = set()   # files a write failed on, warned about once


def write(device, entries):
    """Merge `entries` ({key string: object}) into this device's section. Writers take a lock file
    around the read-modify-write (DDP ranks on one node share the file) and write a temporary file
    of their own (threads of one process too) that replaces the file. A file that cannot be
    written (read-only home, full disk) is warned about once; the measurements then stay in the
    process, and the call that measured them goes on."""
    file = path()
    if file is None:
        return
    name = section_name(device)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(file.with_name(file.name + ".lock"), "a") as lock:
            _lock(lock)
            data = read(file)
            data.setdefault(name, {}).update(entries)
            _sections[file, name] = data[name]     # other writers' entries too, as the file now has them
            fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name + ".", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(data, indent=1, sort_keys=True))
                os.replace(tmp, file)
            except BaseException:
                os.unlink(tmp)
                raise
    except OSError as e:
        _sections.setdefault((file, name), {}).update(entries)
        if file not in _unwritable:
            _unwritable.add(file)
            warnings.warn(f"LORA_FAST_DISPATCH_CACHE: cannot write {file} ({e}); keeping measurements "
                          "in this process only", RuntimeWarning, stacklevel=3)


def _lock(f):
    try:
        import fcntl
    except ImportError:      # not POSIX: the unique temporary file still keeps the file whole
        return
    fcntl.flock(f, fcntl.LOCK_EX)   # released when the file is closed
