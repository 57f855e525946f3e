"""A one-line progress bar on stderr for long work (a hand-written one: it is 40 lines, and a library such
as tqdm would be a dependency for that alone)."""

from __future__ import annotations


class Progress:
    """A one-line progress bar on stderr, shown only on a terminal and only for long work, with the time
    left at the rate so far. ``total`` counts bytes (shown in GB) or, with ``unit``, steps of that name (an
    estimate may be passed: the bar ends at 100% when the work does). ``Progress.enabled = False`` (the
    command line's ``-q``) hides every bar."""

    enabled = True

    def __init__(self, total: int, label: str, min_total: int = 256 << 20, unit: str | None = None):
        import sys
        import time
        self.total, self.label, self.done_bytes, self.unit = total, label, 0, unit
        self.stream = sys.stderr
        self.on = Progress.enabled and total >= min_total and self.stream.isatty()
        self.last = -1
        self.clock = time.monotonic
        self.start = self.clock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.done()

    def update(self, n: int = 1):
        self.advance(n)

    def advance(self, n: int):
        self.done_bytes += n
        if not self.on:
            return
        pct = min(99, int(100 * self.done_bytes / max(self.total, 1)))     # 100% only when done
        if pct != self.last:
            self.last = pct
            elapsed = self.clock() - self.start
            left = elapsed * (self.total - self.done_bytes) / self.done_bytes if self.done_bytes else None
            self.draw(pct, f"{_duration(left)} left" if left is not None and left > 0 else "")

    def draw(self, pct: int, when: str):
        bar = "#" * (pct // 4)
        done = min(self.done_bytes, self.total) if pct < 100 else self.total
        size = f"{done}/{self.total} {self.unit}" if self.unit else f"of {self.total / 2**30:.2f} GB"
        self.stream.write(f"\r{self.label} [{bar:<25}] {pct:3d}% {size} {when}".rstrip() + "\033[K")
        self.stream.flush()

    def done(self):
        if self.on:
            self.draw(100, f"in {_duration(self.clock() - self.start)}")
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
