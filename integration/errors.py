"""The exceptions of the sandbox: one hierarchy, each message says what to do."""

from __future__ import annotations


class DeltaBoxError(Exception):
    """Base of every error the sandbox raises on purpose."""


class UnknownState(DeltaBoxError):
    """A state id the sandbox does not know (or that was dropped)."""


class SandboxStopped(DeltaBoxError):
    """The sandbox was stopped (or its daemon died): nothing to operate on."""


class BadName(DeltaBoxError):
    """A sandbox or process name that could escape its directory or is not
    a plain name (see ``deltabox.sandbox.check_name``)."""


class NameInUse(DeltaBoxError):
    """A sandbox or process name that is already taken."""


class OutsideSandbox(DeltaBoxError):
    """A path given for the sandbox (a process's working directory) that
    resolves outside the sandbox's root: give one inside it."""


class ProcessError(DeltaBoxError):
    """One of the sandbox's processes could not be started, traced,
    checkpointed or written to. The message names the process and says what
    to do; the DeltaCR or OS error behind it is the ``__cause__``."""


class NoAnswer(DeltaBoxError, TimeoutError):
    """``Proc.expect``: the process did not print what was expected in time
    (also a TimeoutError, as before)."""


class OutputClosed(DeltaBoxError, EOFError):
    """``Proc.expect``: the process closed its output (it ended) before
    printing what was expected (also an EOFError, as before)."""


class FilesUnavailable(DeltaBoxError):
    """The sandbox's files cannot be reached any more: the DeltaFS daemon
    behind its mount died or hung up. Nothing more can be checkpointed or
    rolled back: stop the sandbox and create a new one. The DeltaFS error
    is the ``__cause__``."""


class NotAnswering(DeltaBoxError):
    """The daemon behind a ``deltabox`` sandbox did not answer in time
    (stopped with SIGSTOP, hung): ``deltabox stop NAME`` ends it anyway."""


class RollbackFailed(DeltaBoxError):
    """A rollback could not complete; the message says which consistent state
    the sandbox was left in."""
