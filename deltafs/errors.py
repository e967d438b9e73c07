"""The exceptions of DeltaFS: one hierarchy, each message says what to do."""

from __future__ import annotations


class DeltaFSError(Exception):
    """Base of every error DeltaFS raises on purpose."""


class NotAMountError(DeltaFSError):
    """The path given is not the mount point of a live DeltaFS."""


class AlreadyMountedError(DeltaFSError):
    """The mount point already has a DeltaFS mounted on it."""


class MountBusyError(DeltaFSError):
    """An unmount was refused: a process still uses the mount."""


class UnknownCheckpointError(DeltaFSError):
    """A checkpoint id that the store does not know (or that was dropped)."""


class StoreLockedError(DeltaFSError):
    """Another DeltaFS daemon is using this store."""


class StoreCorruptError(DeltaFSError):
    """The store cannot be read: wrong format, missing index, bad records."""


class BaseMissingError(DeltaFSError):
    """The base directory does not exist or is not a directory."""


class StorePlacementError(DeltaFSError):
    """The store lies inside the mount point or the base directory."""


class DaemonError(DeltaFSError):
    """The daemon failed to start, died, or answered with an error."""


class FSError(OSError):
    """A filesystem operation failed with an errno; turned into a FUSE reply
    in exactly one place (deltafs.fuseops)."""

    def __init__(self, err: int, msg: str = "") -> None:
        import os

        super().__init__(err, msg or os.strerror(err))
