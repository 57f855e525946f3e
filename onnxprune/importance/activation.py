"""``activation``: each head's squared activation at the output-projection input, summed over the
calibration tokens (padding left out). The default with ``--calib`` and ``--compensate``."""

from __future__ import annotations

import numpy as np

from .source import Source


def _score(ctx):
    cal = ctx.calibration
    sums = {s.block.index: np.zeros(s.block.num_heads) for s in cal.sites}
    with cal.bar(len(cal.data), "calibrating") as bar:
        for feeds, out in zip(cal.data, cal.run_each(contexts=True)):
            for s in cal.sites:
                rows = cal.rows(feeds, out[s.context], s)
                for h in range(s.block.num_heads):
                    cols = cal.head_columns(s.block, s.context, [h])
                    sums[s.block.index][h] += float(np.sum(rows[:, cols] ** 2))
            bar.update()
    return sums


SOURCE = Source("activation", "calibration: each head's activation at the output projection (the default "
                "with --calib and --compensate)", _score, calibrated=True, outputs=False, order=10)
