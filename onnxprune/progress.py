"""A one-line progress bar on stderr for long work (a hand-written one: it is 40 lines, and a library such
as tqdm would be a dependency for that alone)."""

from __future__ import annotations


class Progress:
    """A one-line progress bar on stderr, shown only on a terminal and only for long work. ``total`` counts
    bytes (shown in GB) or, with ``unit``, steps of that name."""

    def __init__(self, total: int, label: str, min_total: int = 256 << 20, unit: str | None = None):
        import sys
        self.total, self.label, self.done_bytes, self.unit = total, label, 0, unit
        self.stream = sys.stderr
        self.on = total >= min_total and self.stream.isatty()
        self.last = -1

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
        pct = int(100 * self.done_bytes / max(self.total, 1))
        if pct != self.last:
            self.last = pct
            bar = "#" * (pct // 4)
            size = f"{self.done_bytes}/{self.total} {self.unit}" if self.unit else f"of {self.total / 2**30:.2f} GB"
            self.stream.write(f"\r{self.label} [{bar:<25}] {pct:3d}% {size}")
            self.stream.flush()

    def done(self):
        if self.on:
            self.stream.write("\n")
            self.stream.flush()
