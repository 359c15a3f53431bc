"""Run the sharding tests on 8 simulated CPU devices.

XLA reads ``--xla_force_host_platform_device_count`` once, when the CPU backend starts,
and the main pytest process has usually started it with one device already (other test
modules, or ``tests/conftest.py``). So, when fewer than 8 devices are visible, each test
module of this folder is run once in a child pytest process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and every test here reports the
child's outcome for it. With 8 devices already visible (the child itself, or
``XLA_FLAGS=... pytest tests/sharding``) the tests run in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

N_DEVICES = 8
_CHILD_ENV = "JAXINTERP_SHARDING_CHILD"
_ROOT = Path(__file__).resolve().parents[2]


def _devices_ok() -> bool:
    """Whether this process has (or will start with) 8 devices, without starting JAX's backend
    during collection (other test modules may still want to configure it)."""
    import re

    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return jax.device_count() >= N_DEVICES
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    requested = max(int(match.group(1)) if match else 1, jax.config.jax_num_cpu_devices)
    return requested >= N_DEVICES


class _ChildOutcome(pytest.Item):
    """Stands in for a test that ran in the 8-device child process."""

    def __init__(self, *, original: pytest.Item, runner: "_ModuleRunner", **kw):
        super().__init__(**kw)
        self.original = original
        self.runner = runner
        self.own_markers = list(original.own_markers)
        self.keywords.update(original.keywords)

    def runtest(self):
        status, text = self.runner.outcome(self.original)
        if status == "passed":
            return
        if status == "skipped":
            pytest.skip(text)
        raise AssertionError(f"[8-device child process]\n{text}")

    def repr_failure(self, excinfo):
        return str(excinfo.value)

    def reportinfo(self):
        return self.original.reportinfo()


class _ModuleRunner:
    """Runs the selected tests of one module in a child pytest with 8 CPU devices (once)."""

    def __init__(self, path: Path):
        self.path = path
        self.nodeids: list[str] = []
        self.results: dict[str, tuple[str, str]] | None = None

    def outcome(self, item: pytest.Item) -> tuple[str, str]:
        if self.results is None:
            self.results = self._run()
        return self.results.get(item.name, ("failed", f"no result for {item.name} from the child process:\n"
                                            f"{self.results.get('__log__', ('', ''))[1][-4000:]}"))

    def _run(self) -> dict[str, tuple[str, str]]:
        env = dict(os.environ)
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={N_DEVICES}".strip()
        env["JAX_PLATFORMS"] = "cpu"
        env[_CHILD_ENV] = "1"
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.xml"
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                   "-o", "junit_family=xunit1", *self.nodeids]
            proc = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True)
            results = {"__log__": ("log", proc.stdout + proc.stderr)}
            if report.exists():
                for case in ET.parse(report).getroot().iter("testcase"):
                    results[case.get("name")] = _case_outcome(case)
        return results


def _case_outcome(case) -> tuple[str, str]:
    for tag in ("failure", "error"):
        node = case.find(tag)
        if node is not None:
            return "failed", (node.text or node.get("message") or tag)
    node = case.find("skipped")
    if node is not None:
        return "skipped", node.get("message") or "skipped"
    return "passed", ""


@pytest.hookimpl(trylast=True)  # after -m / -k deselection, so the child runs only what was selected
def pytest_collection_modifyitems(session, config, items):
    here = Path(__file__).resolve().parent
    mine = [i for i in items if Path(str(i.fspath)).resolve().parent == here]
    if not mine or os.environ.get(_CHILD_ENV) or _devices_ok():
        return
    runners: dict[Path, _ModuleRunner] = {}
    for i, item in enumerate(items):
        if item not in mine:
            continue
        path = Path(str(item.fspath)).resolve()
        runner = runners.setdefault(path, _ModuleRunner(path))
        runner.nodeids.append(f"{path.relative_to(_ROOT)}::{item.name}")
        items[i] = _ChildOutcome.from_parent(item.parent, name=item.name, original=item, runner=runner)


@pytest.fixture(scope="session", autouse=True)
def _require_devices():
    if os.environ.get(_CHILD_ENV) and not _devices_ok():
        pytest.fail(f"the sharding tests need {N_DEVICES} CPU devices; the child process could not create them")
