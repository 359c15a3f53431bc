"""Fault injection for file writes: a disk that fills up (or a process killed) after N bytes."""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import signal


class _BudgetFile:
    """A writable file whose writes draw on a shared byte budget; past it ``on_exhausted`` runs."""

    def __init__(self, raw, injector: "WriteFault"):
        self._raw = raw
        self._injector = injector

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B")) if not isinstance(data, str) else len(data.encode())
        left = self._injector.budget - self._injector.written
        if n > left:
            if left > 0:  # a partial write lands first, as on a real full disk
                self._raw.write(memoryview(data.encode() if isinstance(data, str) else data).cast("B")[:left]
                                if not isinstance(data, str) else data.encode()[:left].decode(errors="ignore"))
                self._injector.written += left
            self._injector.on_exhausted()
        self._injector.written += n
        return self._raw.write(data)

    def __getattr__(self, name):
        return getattr(self._raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()
        return False

    def __iter__(self):
        return iter(self._raw)


class WriteFault:
    """Context manager: files opened for writing draw on ``budget`` bytes in total; then ``on_exhausted``
    (default: ``OSError(ENOSPC)``, a full disk) fires. Patches ``open``/``io.open`` and makes shutil copy
    through Python writes (not sendfile) so tokenizer copies are covered too."""

    def __init__(self, budget: int, on_exhausted=None):
        self.budget = budget
        self.written = 0
        self.on_exhausted = on_exhausted or self._disk_full

    @staticmethod
    def _disk_full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def _open(self, file, mode="r", *args, **kwargs):
        f = self._real_open(file, mode, *args, **kwargs)
        return _BudgetFile(f, self) if any(c in mode for c in "wax+") else f

    def __enter__(self):
        self._real_open = builtins.open
        self._sendfile = shutil._USE_CP_SENDFILE
        builtins.open = io.open = self._open
        shutil._USE_CP_SENDFILE = False
        return self

    def __exit__(self, *exc):
        builtins.open = io.open = self._real_open
        shutil._USE_CP_SENDFILE = self._sendfile
        return False


def kill_self() -> None:
    """``on_exhausted`` for a process killed mid-write (SIGKILL: no cleanup handler runs)."""
    os.kill(os.getpid(), signal.SIGKILL)


class Interrupt:
    def __call__(self):
        raise KeyboardInterrupt
