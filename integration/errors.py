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



class RollbackFailed(DeltaBoxError):
    """A rollback could not complete; the message says which consistent state
    the sandbox was left in."""
