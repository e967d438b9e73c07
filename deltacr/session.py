"""The checkpoint tree of one traced process and its store on disk.

Store layout (``store_dir``)::

    session.json        the tree: one record per checkpoint (atomic rewrite)
    deltas/<id>.delta   the memory delta of checkpoint <id> (see deltacr.delta)

Checkpoint ids are small integers, unique within a session, starting at 1.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, field

from ._sys import Regs
from .errors import NoSuchCheckpoint
from .procfs import FdPos

DEFAULT_STORE_ROOT = "/var/lib/deltacr"


def default_store(pid: int, starttime: int) -> str:
    """/var/lib/deltacr/<pid>-<starttime> (starttime makes pid reuse harmless)."""
    return os.path.join(os.environ.get("DELTACR_STORE_ROOT", DEFAULT_STORE_ROOT), f"{pid}-{starttime}")


@dataclass
class Checkpoint:
    """What a checkpoint saved. Memory lives in the template and the delta."""

    id: int
    parent: int | None
    label: str
    created: float
    regs: bytes
    fds: list[FdPos]
    cwd: str = ""
    sigmask: int = 0
    brk: int = 0
    delta_state: str = "pending"  # pending | written | failed
    delta_bytes: int = 0
    delta_pages: int = 0
    delta_error: str = ""
    critical_ms: float = 0.0
    background_ms: float = 0.0
    syscall_addr: int = 0  # a `syscall` instruction in this checkpoint's address space (its vDSO)
    xstate: bytes = b""  # x87/SSE/AVX registers (PTRACE_GETREGSET NT_X86_XSTATE)
    depth: int = 0  # forks between the attached process and this checkpoint's template (its lineage)
    had_children: bool = False  # children of its own when captured (see Tracer._may_resume_template)
    stopped: bool = False  # in a job-control stop (SIGSTOP, ^Z) when captured: restored stopped

    @property
    def registers(self) -> Regs:
        return Regs.from_bytes(self.regs)

    def to_json(self) -> dict:  # type: ignore[type-arg]
        d = asdict(self)
        d["regs"] = self.regs.hex()
        d["xstate"] = zlib.compress(self.xstate).hex() if self.xstate else ""  # mostly zeros: ~5 KiB -> ~0.3
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Checkpoint":  # type: ignore[type-arg]
        d = dict(d)
        d["regs"] = bytes.fromhex(d["regs"])
        x = d.get("xstate", "")
        d["xstate"] = zlib.decompress(bytes.fromhex(x)) if x else b""
        d["fds"] = [FdPos(**x) for x in d["fds"]]
        return cls(**d)


@dataclass
class CheckpointInfo:
    """A row of ``list()``."""

    id: int
    parent: int | None
    label: str
    created: float
    template: bool
    current: bool
    delta_state: str
    delta_bytes: int
    delta_pages: int
    critical_ms: float
    background_ms: float
    depth: int = 0  # forks behind its template: each costs its next fork (docs/deltacr.md, Limits)


@dataclass
class Session:
    pid: int
    store: str
    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)
    next_id: int = 1

    @staticmethod
    def next_free_id(store: str) -> int:
        """1 for a new store; after an earlier session in the same store (the
        daemon died and the process was attached again), the id after its
        last one, so that its delta files stay as they were."""
        try:
            with open(os.path.join(store, "session.json")) as f:
                return max(1, int(json.load(f).get("next_id", 1)))
        except (OSError, ValueError, AttributeError):
            return 1

    def new_id(self) -> int:
        i = self.next_id
        self.next_id += 1
        return i

    def get(self, cid: int) -> Checkpoint:
        try:
            return self.checkpoints[cid]
        except KeyError:
            known = ", ".join(str(i) for i in sorted(self.checkpoints)) or "none yet"
            raise NoSuchCheckpoint(
                f"pid {self.pid} has no checkpoint {cid} (known: {known}); see `deltacr list {self.pid}`"
            ) from None

    def ancestors(self, cid: int) -> list[int]:
        """cid, its parent, ..., the root."""
        out = []
        cur: int | None = cid
        while cur is not None:
            out.append(cur)
            cur = self.checkpoints[cur].parent
        return out

    def delta_path(self, cid: int) -> str:
        return os.path.join(self.store, "deltas", f"{cid}.delta")

    def save(self, current: int | None, live_pid: int | None) -> None:
        self.write(self.snapshot(current, live_pid))

    def snapshot(self, current: int | None, live_pid: int | None) -> dict:  # type: ignore[type-arg]
        """The tree as JSON data (cheap: take it under the session lock)."""
        return {
            "format": 1,
            "pid": self.pid,
            "live_pid": live_pid,
            "current": current,
            "next_id": self.next_id,
            "saved": time.time(),
            "checkpoints": [c.to_json() for c in self.checkpoints.values()],
        }

    def write(self, data: dict) -> None:  # type: ignore[type-arg]
        """Atomically replace session.json (fsync: call it without holding locks)."""
        os.makedirs(self.store, exist_ok=True)
        path = os.path.join(self.store, "session.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
