"""DeltaBox: one sandbox = one DeltaFS mount + the processes inside it, with
one atomic checkpoint and rollback for both, and a tree of states.

See ``deltabox.sandbox`` for the protocol: processes are stopped, the
filesystem layer is frozen (every write they issued has been answered), each
process's template is forked, they resume; memory deltas are written in the
background. A rollback switches the files first, then restores or ends each
process, and never leaves files of one state with processes of another.
What the processes start is in no state: a rollback ends it, and so does
closing the sandbox; it is found through a cgroup the sandbox makes (see
``deltabox._cgroup``), or where none can be made, the processes' sessions.

The package lives in ``integration/`` and is imported as ``deltabox``.
"""

from .errors import (BadName, DeltaBoxError, FilesUnavailable, NameInUse, NoAnswer, NotAnswering, OutputClosed,
                     OutsideSandbox, ProcessError, RollbackFailed, SandboxStopped, UnknownState)
from .sandbox import CheckpointReport, Proc, RollbackReport, Sandbox, StateInfo

__all__ = [
    "BadName", "CheckpointReport", "DeltaBoxError", "FilesUnavailable", "NameInUse", "NoAnswer", "NotAnswering",
    "OutputClosed", "OutsideSandbox", "Proc", "ProcessError", "RollbackFailed", "RollbackReport", "Sandbox", "SandboxStopped", "StateInfo", "UnknownState",
]
