"""Memory sampling: the peak growth of the process's resident set during a calibration run.

Byte counts of what calibration allocates (``accounting``) say what it *should* hold; the
resident set says what the process *did* hold, allocator slack and library buffers
included. Both go into the calibration summary.
"""

from __future__ import annotations

import os
import threading


class RssPeak:
    """Samples the resident set every 2 ms while active; ``delta`` is the peak growth over
    the resident set at entry (0 where /proc is not available)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.delta = self.peak - self.base
