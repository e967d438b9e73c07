"""Probe what this kernel allows, by doing the real operations (like ``criu check``).

Every probe runs the actual mechanism on a throwaway target (our own memory or a
forked child) and classifies the errno; nothing is inferred from version strings.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import time
from dataclasses import dataclass, field

from . import _sys, inject


@dataclass
class Probe:
    name: str
    ok: bool
    detail: str


@dataclass
class CheckReport:
    probes: list[Probe] = field(default_factory=list)
    backend: str = "compare"

    @property
    def pfn_visible(self) -> bool:
        return any(p.name == "pagemap frame numbers" and p.ok for p in self.probes)

    @property
    def can_collapse(self) -> bool:
        return any(p.name == "huge-page collapse" and p.ok for p in self.probes)

    @property
    def can_checkpoint(self) -> bool:
        need = {"ptrace", "fork injection"}
        return all(p.ok for p in self.probes if p.name in need)

    def format(self) -> str:
        lines = [f"{'ok' if p.ok else 'NO':>3}  {p.name:<28} {p.detail}" for p in self.probes]
        lines.append(f"dirty-tracking backend: {self.backend}")
        lines.append("checkpointing: " + ("possible" if self.can_checkpoint else "NOT possible"))
        return "\n".join(lines)


def _why(e: OSError) -> str:
    return f"{os.strerror(e.errno)} (errno {e.errno})" if e.errno else str(e)


def probe_ptrace_and_fork() -> list[Probe]:
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        os.close(r)
        os.write(w, b"x")
        while True:
            signal.pause()
    os.close(w)
    os.read(r, 1)
    os.close(r)
    probes = []
    template = 0
    try:
        try:
            inject.seize(child, _sys.PTRACE_O_EXITKILL)
            inject.interrupt(child)
            probes.append(Probe("ptrace", True, "PTRACE_SEIZE + PTRACE_INTERRUPT work"))
        except OSError as e:
            probes.append(Probe("ptrace", False, f"PTRACE_SEIZE failed: {_why(e)}"))
            probes.append(Probe("fork injection", False, "needs ptrace"))
            return probes
        try:
            regs = _sys.ptrace_getregs(child)
            t = time.perf_counter()
            template = inject.fork(child, regs, inject.find_syscall_insn(child))
            ms = (time.perf_counter() - t) * 1e3
            probes.append(Probe("fork injection", True, f"injected fork() gave a stopped child in {ms:.2f} ms"))
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            probes.append(Probe("fork injection", False, str(e)))
    finally:
        if template:
            inject.kill_and_reap(template)
        inject.kill_and_reap(child)
    return probes


def probe_pidfd_getfd() -> Probe:
    try:
        pidfd = _sys.pidfd_open(os.getpid())
        try:
            fd = _sys.pidfd_getfd(pidfd, 0)
            os.close(fd)
        finally:
            os.close(pidfd)
        return Probe("pidfd_getfd", True, "pidfd_open + pidfd_getfd work")
    except OSError as e:
        return Probe("pidfd_getfd", False, _why(e))


def probe_uffd_wp() -> Probe:
    region = mmap.mmap(-1, 4 * _sys.PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    uffd = pm = -1
    try:
        try:
            uffd = _sys.userfaultfd(_sys.O_CLOEXEC | _sys.O_NONBLOCK)
        except OSError as e:
            return Probe("PAGEMAP_SCAN + uffd-wp", False, f"userfaultfd(): {_why(e)}")
        try:
            _sys.uffdio_api(uffd, _sys.UFFD_FEATURE_WP_ASYNC | _sys.UFFD_FEATURE_WP_UNPOPULATED)
        except OSError as e:
            return Probe("PAGEMAP_SCAN + uffd-wp", False, f"UFFDIO_API WP_ASYNC|WP_UNPOPULATED: {_why(e)}")
        _sys.uffdio_register_wp(uffd, addr, len(region))
        pm = os.open("/proc/self/pagemap", os.O_RDONLY)
        flags = _sys.PM_SCAN_WP_MATCHING | _sys.PM_SCAN_CHECK_WPASYNC
        try:
            _sys.pagemap_scan(pm, addr, addr + len(region), flags=flags,
                              category_mask=_sys.PAGE_IS_WRITTEN, return_mask=_sys.PAGE_IS_WRITTEN)
        except OSError as e:
            return Probe("PAGEMAP_SCAN + uffd-wp", False, f"PAGEMAP_SCAN: {_why(e)}")
        region[2 * _sys.PAGE_SIZE] = 1
        got = _sys.pagemap_scan(pm, addr, addr + len(region), flags=flags,
                                category_mask=_sys.PAGE_IS_WRITTEN, return_mask=_sys.PAGE_IS_WRITTEN)
        want = [(addr + 2 * _sys.PAGE_SIZE, addr + 3 * _sys.PAGE_SIZE)]
        if [(s, e) for s, e, _ in got] != want:
            return Probe("PAGEMAP_SCAN + uffd-wp", False, f"scan reported {got}, expected one written page")
        return Probe("PAGEMAP_SCAN + uffd-wp", True, "one write reported exactly, re-protected atomically")
    finally:
        for fd in (uffd, pm):
            if fd >= 0:
                os.close(fd)
        region.close()


def _own_pagemap_entry(addr: int) -> int:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // _sys.PAGE_SIZE * 8)
        return int.from_bytes(f.read(8), "little")


def probe_soft_dirty() -> Probe:
    region = mmap.mmap(-1, _sys.PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    try:
        region[0] = 1
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("4")
        except OSError as e:
            return Probe("soft-dirty", False, f"clear_refs: {_why(e)}")
        region[0] = 2
        entry = _own_pagemap_entry(addr)
        if entry >> 55 & 1:
            return Probe("soft-dirty", True, "pagemap bit 55 set after a write")
        return Probe("soft-dirty", False,
                     "clear_refs accepted but pagemap bit 55 never set (kernel without CONFIG_MEM_SOFT_DIRTY)")
    finally:
        region.close()


def probe_pfn() -> Probe:
    """Are page frame numbers visible in /proc/PID/pagemap (CAP_SYS_ADMIN)?"""
    region = mmap.mmap(-1, _sys.PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    try:
        region[0] = 1
        entry = _own_pagemap_entry(addr)
        if entry >> 63 and entry & ((1 << 55) - 1):
            return Probe("pagemap frame numbers", True, "visible: the pfn backend can compare templates")
        return Probe("pagemap frame numbers", False, "hidden (needs CAP_SYS_ADMIN): no pfn backend")
    finally:
        region.close()


def _thp_setting() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            words = f.read().split()
    except OSError:
        return "missing"
    return next((w.strip("[]") for w in words if w.startswith("[")), "unknown")


def probe_hugepage_collapse() -> Probe:
    """Can we collapse another process's memory into a huge page from outside
    (``process_madvise(MADV_COLLAPSE)``, Linux >= 6.1; another process's needs
    CAP_SYS_NICE)? Tried on a forked child. MADV_COLLAPSE ignores the sysfs
    setting, so an administrator's ``never`` is honoured here."""
    from .hugepages import HUGE
    name = "huge-page collapse"
    setting = _thp_setting()
    if setting in ("never", "missing"):
        return Probe(name, False, f"transparent huge pages are {'off' if setting == 'never' else 'absent'} "
                                  "(/sys/kernel/mm/transparent_hugepage/enabled): templates fork 4 KiB pages")
    region = mmap.mmap(-1, 2 * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(region)
    start = -(-ctypes.addressof(view) // HUGE) * HUGE
    region.write(b"\x01" * len(region))
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        os.close(r)
        region[len(region) // 2] = 2  # a page of its own, as a running process would have
        os.write(w, b"x")
        while True:
            signal.pause()
    os.close(w)
    pidfd = -1
    try:
        os.read(r, 1)
        pidfd = _sys.pidfd_open(child)
        _sys.process_madvise(pidfd, start, HUGE, _sys.MADV_COLLAPSE)
        return Probe(name, True, "process_madvise(MADV_COLLAPSE) works on another process: templates fork faster")
    except OSError as e:
        return Probe(name, False, f"process_madvise(MADV_COLLAPSE) on another process: {_why(e)}; "
                                  "templates fork 4 KiB pages")
    finally:
        if pidfd >= 0:
            os.close(pidfd)
        os.close(r)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        del view
        region.close()


def probe_criu() -> Probe:
    import shutil
    import subprocess
    exe = shutil.which("criu")
    if exe is None:
        return Probe("criu (baseline only)", False, "criu is not installed")
    try:
        res = subprocess.run([exe, "check"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Probe("criu (baseline only)", False, str(e))
    text = (res.stdout + res.stderr).strip().splitlines()
    return Probe("criu (baseline only)", res.returncode == 0, text[-1] if text else f"exit {res.returncode}")


_cache: CheckReport | None = None


def check(use_cache: bool = True) -> CheckReport:
    """Run every probe; the verdict names the backend deltacr will use."""
    global _cache
    if use_cache and _cache is not None:
        return _cache
    report = CheckReport()
    report.probes += probe_ptrace_and_fork()
    report.probes.append(probe_pidfd_getfd())
    uffd = probe_uffd_wp()
    report.probes.append(uffd)
    soft = probe_soft_dirty()
    report.probes.append(soft)
    report.probes.append(probe_pfn())
    report.probes.append(probe_hugepage_collapse())
    pidfd_ok = any(p.name == "pidfd_getfd" and p.ok for p in report.probes)
    if uffd.ok and pidfd_ok:
        report.backend = "uffd-wp"
    elif soft.ok:
        report.backend = "soft-dirty"
    else:
        report.backend = "compare"
    _cache = report
    return report


def available_backends() -> list[str]:
    """The backends this machine supports, best first (compare always works)."""
    r = check()
    out = []
    if any(p.name == "PAGEMAP_SCAN + uffd-wp" and p.ok for p in r.probes):
        out.append("uffd-wp")
    if any(p.name == "pagemap frame numbers" and p.ok for p in r.probes):
        out.append("pfn")
    if any(p.name == "soft-dirty" and p.ok for p in r.probes):
        out.append("soft-dirty")
    out.append("compare")
    return out
