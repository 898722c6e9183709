"""A progress bar: tqdm when installed, else a small stderr bar (numpy-only installs)."""

from __future__ import annotations

import sys
import time


class _Bar:
    def __init__(self, total: int, desc: str = "", unit: str = "it", disable: bool = False):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.t0 = time.perf_counter()
        self.disable = disable or not sys.stderr.isatty()
        self._last = 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.disable or (now - self._last < 0.1 and self.n < self.total):
            return
        self._last = now
        frac = self.n / max(self.total, 1)
        rate = self.n / max(now - self.t0, 1e-9)
        bar = "#" * int(30 * frac)
        sys.stderr.write(
            f"\r{self.desc}: [{bar:<30}] {self.n}/{self.total} {self.unit} ({rate:,.0f} {self.unit}/s)"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if not self.disable:
            sys.stderr.write("\n")

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def progress(total: int, desc: str = "", unit: str = "it", disable: bool = False):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=disable, unit_scale=True)
    except ImportError:
        return _Bar(total, desc, unit, disable)
