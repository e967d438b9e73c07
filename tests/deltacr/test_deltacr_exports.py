"""Pin the public API the sandbox and the CLI rely on, so it cannot drift by accident."""

from __future__ import annotations

import inspect

import deltacr


def test_public_names() -> None:
    assert sorted(deltacr.__all__) == sorted([
        "AlreadyTraced", "CheckReport", "CheckpointInfo", "CheckpointResult", "Client", "DaemonError",
        "DeltaCRError", "DeltaFormatError", "DeltaInfo", "Gate", "InjectionFailed", "MultiThreaded",
        "NoSuchCheckpoint", "NoSuchProcess", "NotAttached", "NotPermitted", "ProcessCheckpointer",
        "ProcessGone", "ProcessIsZombie", "RestoreFailed", "RollbackResult", "attach",
        "available_backends", "check", "critical", "read_delta",
    ])
    for name in deltacr.__all__:
        assert hasattr(deltacr, name), name


def test_one_exception_hierarchy() -> None:
    for name in deltacr.__all__:
        obj = getattr(deltacr, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert issubclass(obj, deltacr.DeltaCRError), name


def test_in_process_api_and_client_offer_the_same_verbs() -> None:
    verbs = {"stop", "capture", "resume", "checkpoint", "rollback", "list", "status", "detach",
             "wait_background", "evict"}
    for cls in (deltacr.ProcessCheckpointer, deltacr.Client):
        missing = {v for v in verbs if not callable(getattr(cls, v, None))}
        assert not missing, f"{cls.__name__} lacks {missing}"
    sig = inspect.signature(deltacr.ProcessCheckpointer)
    assert list(sig.parameters)[:3] == ["pid", "store_dir", "max_templates"]
