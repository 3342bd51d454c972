"""Storage faults in the output folder: a full disk (ENOSPC), a folder that became unwritable,
a quota, a vanished mount -- met while writing a checkpoint or main.log.

Checkpoints are written atomically (atomic.py): a failed save leaves no partial file under a
checkpoint's name, and the newest complete checkpoint stays where it was, so -y 1 still resumes
from it. What the run does next is the user's call, with --storage-errors:
  stop      (default) a one-line error naming the file and the reason, exit status 2;
  continue  the same line as a warning, and training goes on: the next checkpoint is tried at its
            usual step, and a log that cannot be written is turned off.
"""

import errno
import os

POLICIES = ("stop", "continue")


class StorageError(Exception):
    """A write under -o failed; the message names the file, the reason and what is left."""


def reason(error):
    """The OS's words for an OSError, without the file name it may carry ("No space left on device")."""
    if error.errno is not None:
        return f"{os.strerror(error.errno)} ({errno.errorcode.get(error.errno, error.errno)})"
    return str(error) or type(error).__name__


def checkpoint_write_error(path, error, complete_checkpoints):
    """StorageError for a failed save of checkpoint `path`; complete_checkpoints: the folder's
    [(step, path)] (checkpoint.list_checkpoints), none of which a failed atomic save touches."""
    if complete_checkpoints:
        left = f"the newest complete checkpoint, {complete_checkpoints[-1][1]}, is intact (-y 1 resumes from it)"
    else:
        left = "there is no earlier checkpoint to resume from"
    return StorageError(f"{path}: cannot write the checkpoint: {reason(error)}; {left}")


def log_write_error(path, error):
    return StorageError(f"{path}: cannot write the log: {reason(error)}")
