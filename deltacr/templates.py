"""The template pool: which checkpoints still have a frozen process.

Eviction policy (documented for ``--max-templates N``):

* at most N templates are kept (N >= 1);
* the root checkpoint's template is pinned: every slow-path restore starts from
  some ancestor's template, and the root is everyone's ancestor;
* a template whose delta is not yet safely on disk is never evicted (the delta
  is read from it), nor one that a pending delta compares against (the pfn
  backend); the pool may exceed N until that write finishes;
* otherwise the least recently used template goes first (use = created, or
  rolled back to).

The pool only decides; the tracer thread kills the evicted processes, and
with each its spare (the pre-forked child a rollback would use, see
:class:`deltacr.tracer.ProcessCheckpointer`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class TemplatePool:
    max_templates: int

    def __post_init__(self) -> None:
        if self.max_templates < 1:
            raise ValueError("max_templates must be >= 1 (the root checkpoint keeps one)")
        self._lru: OrderedDict[int, int] = OrderedDict()  # checkpoint id -> template pid
        self.root: int | None = None
        self._durable: set[int] = set()
        self._held: dict[int, int] = {}

    def hold(self, cid: int) -> None:
        self._held[cid] = self._held.get(cid, 0) + 1

    def release(self, cid: int) -> None:
        n = self._held.get(cid, 0) - 1
        if n <= 0:
            self._held.pop(cid, None)
        else:
            self._held[cid] = n

    def add(self, cid: int, pid: int, *, root: bool = False) -> None:
        self._lru[cid] = pid
        if root:
            self.root = cid

    def touch(self, cid: int) -> None:
        if cid in self._lru:
            self._lru.move_to_end(cid)

    def mark_durable(self, cid: int) -> None:
        self._durable.add(cid)

    def pid(self, cid: int) -> int | None:
        return self._lru.get(cid)

    def replace(self, cid: int, pid: int) -> bool:
        """Another frozen process now holds checkpoint cid's image (its spare,
        when the template itself was resumed by a rollback). False if cid
        has no template (the caller then owns pid)."""
        if cid not in self._lru:
            return False
        self._lru[cid] = pid
        return True

    def idle(self, cid: int) -> bool:
        """Nothing pending reads cid's template: its delta is on disk and no
        pending delta compares against it."""
        return cid in self._durable and cid not in self._held

    def remove(self, cid: int) -> int | None:
        return self._lru.pop(cid, None)

    def items(self) -> list[tuple[int, int]]:
        return list(self._lru.items())

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, cid: object) -> bool:
        return cid in self._lru

    def to_evict(self) -> list[tuple[int, int]]:
        """(checkpoint id, pid) to kill now to get back under the limit."""
        out = []
        excess = len(self._lru) - self.max_templates
        for cid, pid in list(self._lru.items()):
            if excess <= 0:
                break
            if cid == self.root or cid not in self._durable or cid in self._held:
                continue
            out.append((cid, pid))
            excess -= 1
        for cid, _ in out:
            del self._lru[cid]
        return out
