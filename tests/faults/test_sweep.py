"""The fault sweep: every ``CASES`` entry of every ``tests/faults/cases_*.py`` module, each under a timeout."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

from tests.faults.harness import Case, run_case


def _all_cases() -> list[Case]:
    cases: list[Case] = []
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if info.name.startswith("cases_"):
            cases += importlib.import_module(f"tests.faults.{info.name}").CASES
    ids = [c.id for c in cases]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicated, f"duplicate case ids: {duplicated}"
    return cases


CASES = _all_cases()


def test_the_sweep_is_large_enough():
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case: Case, tmp_path):
    run_case(case, tmp_path)
