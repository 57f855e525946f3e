"""``residual`` (ours): what a refit of the output projection cannot restore.

From the covariance of each block's context over the calibration tokens (one pass, like ``activation``),
heads are removed one at a time, each time the head whose removal leaves the least output error after the
kept heads are refitted to replace it (least squares with an intercept: the Schur complement of the kept
heads' covariance, seen through the output projection). A head's score is the block's error, as a fraction
of its output variance, once that head is gone, so later heads score higher; the scores rank each block's
heads in the order of that greedy elimination.
"""

from __future__ import annotations

import numpy as np

from .source import Source

RIDGE = 1e-2      # relative to the mean eigenvalue of the kept heads' covariance, as the refit uses


def residual_scores(cal, ridge: float = RIDGE) -> dict[int, np.ndarray]:
    covs = cal.context_covariances()
    scores = {}
    for s in cal.sites:
        b = s.block
        cov = covs[b.index]
        w = np.moveaxis(cal.weights[s.weight].astype(np.float64), s.head_axis, 0)   # [width, out]
        cols = [cal.head_columns(b, s.context, [h]) for h in range(b.num_heads)]
        rows = [cal.head_columns(b, s.weight, [h]) for h in range(b.num_heads)]
        lam = ridge * np.trace(cov) / max(len(cov), 1)

        def loss(dropped):
            d_c = np.concatenate([cols[h] for h in dropped])
            d_r = np.concatenate([rows[h] for h in dropped])
            k_c = np.concatenate([cols[h] for h in range(b.num_heads) if h not in dropped] or
                                 [np.zeros(0, dtype=int)])
            schur = cov[np.ix_(d_c, d_c)]
            if len(k_c):
                cross = cov[np.ix_(k_c, d_c)]
                schur = schur - cross.T @ np.linalg.solve(cov[np.ix_(k_c, k_c)] + lam * np.eye(len(k_c)), cross)
            wd = w[d_r]
            return float(np.trace(wd.T @ schur @ wd))

        total = max(loss(list(range(b.num_heads))), 1e-30)
        dropped: list[int] = []
        score = np.zeros(b.num_heads)
        while len(dropped) < b.num_heads - 1:
            trial = [(loss(dropped + [h]), h) for h in range(b.num_heads) if h not in dropped]
            value, h = min(trial)
            dropped.append(h)
            score[h] = value / total
        last = next(h for h in range(b.num_heads) if h not in dropped)
        score[last] = 1.0
        scores[b.index] = np.maximum.accumulate(score[dropped + [last]])[np.argsort(dropped + [last])]
    return scores


SOURCE = Source("residual", "calibration: what a refit of the output projection cannot restore, heads "
                "removed one by one from the context covariance (one pass over the data)",
                lambda ctx: residual_scores(ctx.calibration), calibrated=True, order=40)
