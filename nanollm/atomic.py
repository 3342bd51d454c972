"""Atomic file writes: a crash leaves the old file or the whole new one, never a partial one.

A temporary file in the destination's folder (dot-named, so globs like 'data/*_train_*.bin' and
checkpoint listings never pick it up), fsynced, os.replace'd onto the destination, then the
folder fsynced. Used for token shards, checkpoints and model files. A write killed outright
(SIGKILL, power loss) leaves its temp file behind; the next write of the same path removes the
temp files of writers that are no longer running (the pid is in the name).
"""

import glob
import os


def _temp_path(path):
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temps(path):
    """Delete temp files left for `path` by writers that died mid-write (not by live ones)."""
    folder, base = os.path.split(os.path.abspath(path))
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(base)}.*.tmp")):
        pid = os.path.basename(tmp)[len(base) + 2:].split(".")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_with(path, write):
    """write(tmp_path) fills a temp file in path's folder; then fsync and os.replace onto path,
    so a reader sees the old file or the whole new one, never a partial one."""
    path = os.fspath(path)
    remove_stale_temps(path)
    tmp = _temp_path(path)
    try:
        # create it ourselves (mode 0666 & ~umask, as open() would) so the result is not 0600
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)  # write() may have replaced the file (safetensors' save_file does)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
