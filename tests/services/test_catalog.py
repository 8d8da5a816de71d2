"""ModelCatalog's state read from many handler threads while the event loop changes it."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from services.catalog import ModelCatalog, VersionState
from services.errors import ModelNotFoundError, ModelNotReadyError

HAMMER_SECONDS = 3.0
READERS = 4


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every microsecond: a reader is then interrupted mid-iteration thousands of
    times a second, so an unprotected dict shows the race within milliseconds, not by luck."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.timeout(60)
def test_readers_never_see_a_dict_change_size(fast_switching: None) -> None:
    catalog = ModelCatalog()
    # Enough entries that one pass over them spans many thread switches.
    for version in range(1, 200):
        catalog.set_status("failed", version, VersionState.UNAVAILABLE, "bad file")
    catalog.set_model_error("config-broken", "config.yaml: bad")
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0] * READERS

    def reader(slot: int) -> None:
        lookups: list[Callable[[], object]] = [
            lambda: catalog.resolve("nope", None),
            lambda: catalog.resolve("failed", None),
            lambda: catalog.resolve("config-broken", None),
            lambda: catalog.resolve("churn", 3),
            catalog.index,
            catalog.model_names,
        ]
        while not stop.is_set():
            for lookup in lookups:
                try:
                    lookup()
                except (ModelNotFoundError, ModelNotReadyError):
                    pass  # the answers a client should get
                except BaseException as exc:  # anything else is the bug
                    errors.append(exc)
                    stop.set()
                    return
            reads[slot] += 1

    def writer() -> None:
        version = 0
        while not stop.is_set():
            version += 1
            catalog.set_status("churn", version, VersionState.LOADING)
            catalog.set_model_error(f"churn-{version % 50}", "bad config")
            if version > 100:
                catalog.forget("churn", version - 100)
                catalog.set_model_error(f"churn-{(version + 25) % 50}", None)

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(READERS)]
    threads.append(threading.Thread(target=writer, daemon=True))
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + HAMMER_SECONDS
    while time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert not errors, f"{type(errors[0]).__name__}: {errors[0]}"
    assert min(reads) > 0


def test_unknown_and_failed_models_get_their_own_answers() -> None:
    catalog = ModelCatalog()
    catalog.set_status("failed", 1, VersionState.UNAVAILABLE, "bad file")
    catalog.set_model_error("config-broken", "config.yaml: bad")
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'"):
        catalog.resolve("nope", None)
    with pytest.raises(ModelNotReadyError, match=r"version 1: UNAVAILABLE \(bad file\)"):
        catalog.resolve("failed", None)
    with pytest.raises(ModelNotReadyError, match=r"config\.yaml: bad"):
        catalog.resolve("config-broken", None)
    assert [(s.model, s.version) for s in catalog.index()] == [("config-broken", 0), ("failed", 1)]
    catalog.forget("failed", 1)
    catalog.set_model_error("config-broken", None)
    assert catalog.index() == [] and catalog.model_names() == []
