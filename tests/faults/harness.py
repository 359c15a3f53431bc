"""Table-driven fault sweep: each case runs under a timeout and must either raise a short,
one-line error naming the problem or return the correct result (checked against a reference).

A case is a ``Case(id, run, expect)``: ``run(tmp: Path)`` builds its inputs under a fresh
directory and calls the code under test; ``expect`` is ``Raises(...)`` or ``Returns(...)``.
``after(tmp)`` (optional) checks an invariant whatever happened (e.g. "the previous export
is intact"); ``setup()`` (optional) does one-time work, such as building a model, before the
timer starts. To add cases, create ``tests/faults/cases_<topic>.py`` with a module-level
``CASES`` list; ``test_sweep.py`` collects every such module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

# An error message (or warning) longer than this is a defect: it must name the problem, not dump data.
MAX_MESSAGE = 500


class CaseTimeout(Exception):
    """A case ran past its time limit (a hang)."""


@dataclasses.dataclass(frozen=True)
class Raises:
    """The case must raise ``exc`` (a type or tuple) with a one-line message matching ``match``."""

    exc: Any
    match: str


@dataclasses.dataclass(frozen=True)
class Returns:
    """The case must return; ``check(result, tmp)`` asserts it is the correct result.

    ``warns``: a regex that some emitted warning must match (None: warnings are not required).
    """

    check: Callable[[Any, Path], None]
    warns: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Path], Any]
    expect: Raises | Returns
    after: Optional[Callable[[Path], None]] = None
    timeout: float = 20.0
    # one-time work (building a model, compiling) run before the timer starts; cache it yourself
    setup: Optional[Callable[[], None]] = None


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``CaseTimeout`` in the main thread after ``seconds`` (SIGALRM interrupts blocking syscalls)."""
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover - pytest runs in main
        yield
        return

    def handler(signum, frame):
        raise CaseTimeout(f"case did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_message(text: str, what: str = "message") -> None:
    assert "\n" not in text.strip(), f"{what} spans several lines: {text[:300]!r}"
    assert len(text) <= MAX_MESSAGE, f"{what} is {len(text)} characters long: {text[:300]!r}..."


def run_case(case: Case, tmp: Path) -> None:
    if case.setup is not None:
        case.setup()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with time_limit(case.timeout):
                result = case.run(tmp)
            error = None
        except CaseTimeout:
            raise AssertionError(f"{case.id}: hung (no result within {case.timeout} s)") from None
        except BaseException as err:  # noqa: BLE001 - KeyboardInterrupt/MemoryError are faults too
            error = err
    try:
        _judge(case, result if error is None else None, error, caught, tmp)
    finally:
        if case.after is not None:
            case.after(tmp)


def _judge(case: Case, result, error, caught, tmp: Path) -> None:
    for w in caught:
        check_message(str(w.message), "warning")
    if isinstance(case.expect, Raises):
        if error is None:
            raise AssertionError(f"{case.id}: expected {case.expect.exc} matching {case.expect.match!r}, "
                                 f"got a result {type(result).__name__}")
        if not isinstance(error, case.expect.exc):
            raise AssertionError(f"{case.id}: expected {case.expect.exc}, got {type(error).__name__}: "
                                 f"{str(error)[:300]}") from error
        message = str(error)
        check_message(message)
        assert re.search(case.expect.match, message), f"{case.id}: {message!r} !~ {case.expect.match!r}"
        return
    if error is not None:
        raise AssertionError(f"{case.id}: expected a result, got {type(error).__name__}: {str(error)[:300]}") \
            from error
    case.expect.check(result, tmp)
    if case.expect.warns is not None:
        texts = [str(w.message) for w in caught]
        assert any(re.search(case.expect.warns, t) for t in texts), \
            f"{case.id}: no warning matching {case.expect.warns!r} among {texts}"


def expect(condition: bool, what: object = "") -> None:
    """``assert`` usable inside a lambda."""
    if not condition:
        raise AssertionError(what)
