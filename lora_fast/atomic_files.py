"""Writing a directory's files all or nothing: each to a temporary beside it, then renamed into
place; on any failure the directory is as before (save_adapter)."""
import contextlib
import os
import shutil
import stat
import uuid


@contextlib.contextmanager
def staged(directory, names):
    """Yield one temporary path in `directory` per final name; when the block returns, move them
    onto their names in the order given, each rename atomic. On any failure (in the block or in a
    move) the names already moved are put back from hard-linked backups (or removed if they did
    not exist), so the directory is as before, and only this call's temporaries are removed."""
    tag = uuid.uuid4().hex[:12]
    temps, backups, moved = [], {}, []
    try:
        for name in names:
            temps.append(_new_file(directory / f".{name}.{tag}.tmp"))
        modes = [stat.S_IMODE(tmp.stat().st_mode) for tmp in temps]   # what the umask gives
        yield temps
        for tmp, mode in zip(temps, modes):
            # safetensors writes a file of its own (mode 0o600) in place of the one it was given
            os.chmod(tmp, mode)
            _fsync(tmp)
        for name in names:
            if (directory / name).exists():
                backups[name] = _backup(directory / name, directory / f".{name}.{tag}.bak")
        for tmp, name in zip(temps, names):
            os.replace(tmp, directory / name)
            moved.append(name)
        _fsync(directory)
    except BaseException:
        for name in reversed(moved):
            if name in backups:
                os.replace(backups.pop(name), directory / name)
            else:
                os.unlink(directory / name)
        raise
    finally:
        for leftover in [*temps, *backups.values()]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _new_file(path):
    # O_EXCL: never another writer's file; mode 0o666 so the umask applies as for any new file
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return path


def _backup(path, backup):
    try:
        os.link(path, backup)   # no copy: the old file lives on under a second name
    except OSError:             # a file system without hard links
        shutil.copy2(path, backup)
    return backup


def _fsync(path):
    # the data on disk before a rename makes it visible (a crash must not leave an empty file)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:   # a directory on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
