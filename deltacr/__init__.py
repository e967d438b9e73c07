"""deltacr: checkpoint and roll back a running process without kernel patches.

A checkpoint stops the process with ptrace, injects ``fork()`` into it and keeps
the stopped child as a *template*: a frozen copy-on-write image of the whole
process, taken in about the time of a fork. Registers (general and
x87/SSE/AVX), file offsets, cwd and signal mask are recorded; the process
resumes. Afterwards, off the critical
path, a background thread reads the pages written since the parent checkpoint
(found by PAGEMAP_SCAN + userfaultfd write-protect, soft-dirty, or content
comparison, or -- backend ``pfn`` -- by comparing the page frames of two
frozen templates) from the template and writes them, with the mapping layout,
as a versioned, checksummed *memory delta* (:mod:`deltacr.delta`).

A rollback forks a fresh process out of the checkpoint's template, gives it the
saved registers (fixing up interrupted syscalls so they restart), restores fd
offsets with injected ``lseek`` and replaces the old live process: the *fast
path*. Templates are bounded (:mod:`deltacr.templates`); when a checkpoint's
template was evicted, the *slow path* forks the nearest ancestor that still has
one and replays mapping changes and page deltas into it (:mod:`deltacr.replay`),
bit-identical to the fast path. Checkpoints form a tree: roll back to any node.
The fork is most of a fast-path rollback, so while the tracer is idle each
template gets a *spare*: a child forked ahead of time, dirty tracking armed in
it; a rollback that finds one only sets registers and offsets and resumes it
(the first rollback to a checkpoint resumes the template itself and keeps
the spare as the template: one fork fewer behind the restored process).
An experimental third way, ``rollback(id, in_place=True)``, restores the live
process itself (same pid), copying back only the pages that differ.
Because the fork is most of a checkpoint's critical path too, a *huge-page
keeper* (:mod:`deltacr.hugepages`) collapses the memory the live process wrote
since its last fork into transparent huge pages, from outside and while it
runs: the kernel then copies the page tables of each huge page's 512 entries
as one batch (a SymPy REPL's template fork 3.4 -> 2.3 ms p50).

Several processes (and a filesystem) checkpoint or roll back as one with
``checkpoint_gated`` / ``rollback_gated``: each process stops and is forked by
its own tracer thread at once, then waits for a :class:`Gate` that the caller
opens when every part is ready (or opens with ``ok=False`` to abandon: a gated
rollback then resumes the old process untouched). ``with critical():`` pauses
every background writer of the host process meanwhile.

Layout: ``_sys`` (all raw syscalls and constants), ``procfs`` (reading /proc),
``inject`` (syscall injection), ``dirty`` (tracking backends), ``delta`` (file
format), ``writer`` (background delta writing), ``replay`` (slow path),
``restore`` (fds, cwd, signal mask), ``hugepages`` (the keeper),
``templates`` (pool and eviction), ``session`` (the tree and its store),
``tracer`` (:class:`ProcessCheckpointer`, the in-process API), ``daemon`` and
``client`` (the background daemon used by the CLI), ``cli``, ``check``.

Limits: single-threaded processes only (fork copies one thread); MAP_SHARED
memory is shared by all templates and not checkpointed (the slow path maps
shared files again and never writes into them); sockets and pipes are
kept as they are (a harness talking over pipes keeps working).
"""

from .check import CheckReport, available_backends, check
from .client import Client, attach
from .delta import DeltaInfo, read_delta
from .errors import (AlreadyTraced, DaemonError, DeltaCRError, DeltaFormatError, InjectionFailed,
                     MultiThreaded, NoSuchCheckpoint, NoSuchProcess, NotAttached, NotPermitted,
                     ProcessGone, ProcessIsZombie, RestoreFailed)
from .session import CheckpointInfo
from .tracer import CheckpointResult, Gate, ProcessCheckpointer, RollbackResult, critical

__all__ = [
    "AlreadyTraced", "CheckReport", "CheckpointInfo", "CheckpointResult", "Client", "DaemonError",
    "DeltaCRError", "DeltaFormatError", "DeltaInfo", "Gate", "InjectionFailed", "MultiThreaded",
    "NoSuchCheckpoint", "NoSuchProcess", "NotAttached", "NotPermitted", "ProcessCheckpointer",
    "ProcessGone", "ProcessIsZombie", "RestoreFailed", "RollbackResult", "attach",
    "available_backends", "check", "critical", "read_delta",
]
