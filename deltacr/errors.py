"""The one exception hierarchy of deltacr.

Every error names the pid it is about and says what the caller can do.
"""

from __future__ import annotations


class DeltaCRError(Exception):
    """Base class: something deltacr refused or could not do."""


class NoSuchProcess(DeltaCRError):
    """The pid does not exist (or exited while we worked on it)."""


class ProcessIsZombie(DeltaCRError):
    """The pid exited and waits for its parent to reap it: nothing to capture."""


class AlreadyTraced(DeltaCRError):
    """Another tracer (a debugger, strace, another deltacr) holds the process."""


class NotPermitted(DeltaCRError):
    """The kernel does not let us trace the process (other user, kernel thread)."""


class MultiThreaded(DeltaCRError):
    """fork() copies only the calling thread: a template cannot capture threads."""


class NoSuchCheckpoint(DeltaCRError):
    """The checkpoint id is not in this session's tree."""


class NotAttached(DeltaCRError):
    """No session exists for the pid (attach first), or it was detached/closed."""


class InjectionFailed(DeltaCRError):
    """A syscall injected into the tracee failed or the tracee stopped unexpectedly."""


class ProcessGone(DeltaCRError):
    """The traced process exited; roll back to a checkpoint to bring it back."""


class DeltaFormatError(DeltaCRError):
    """A delta file is missing or unreadable, truncated, corrupt, or of an unknown format version."""


class RestoreFailed(DeltaCRError):
    """A rollback could not rebuild the checkpoint's state."""


class DaemonError(DeltaCRError):
    """The background daemon could not be started or reached."""
