"""Imbalance bands: each layer, and the run, labelled low or high imbalance.

DODOCO finds that architectures cluster into two stable routing-imbalance bands but the
text we build on gives no numbers, so the thresholds below are OUR choice (round numbers,
see docs/analysis.md) and can be overridden (`--band-thresholds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_moe_probe.errors import UsageError
from megatron_moe_probe.values import nan_median

LOW, HIGH, MIXED = "low", "high", "mixed"


@dataclass(frozen=True)
class BandThresholds:
    """A layer is in the high band at or above both thresholds, low below both, mixed otherwise."""

    # Ours: the busiest expert doing twice the average work (at EP = E, half of the
    # GPUs' expert time is spent waiting for the busiest one).
    max_over_mean: float = 2.0
    # Ours: a quarter of the way from equal loads (0) towards one expert taking all (~1).
    gini: float = 0.25

    @classmethod
    def parse(cls, text: str) -> "BandThresholds":
        """'MAX_OVER_MEAN,GINI', e.g. '2.0,0.25'."""
        try:
            mom, gini = (float(x) for x in text.split(","))
        except ValueError:
            raise UsageError(f"--band-thresholds wants MAX_OVER_MEAN,GINI (e.g. 2.0,0.25), got {text!r}") from None
        if not mom > 1 or not 0 < gini < 1:
            raise UsageError(f"band thresholds need max/mean > 1 and 0 < Gini < 1, got {mom}, {gini}")
        return cls(mom, gini)


def classify(max_over_mean: float, gini: float, thresholds: BandThresholds = BandThresholds()) -> str:
    if math.isnan(max_over_mean) or math.isnan(gini):
        return "n/a"
    high = (max_over_mean >= thresholds.max_over_mean, gini >= thresholds.gini)
    return HIGH if all(high) else LOW if not any(high) else MIXED


def band_table(max_over_mean: list[float], gini: list[float],
               thresholds: BandThresholds = BandThresholds()) -> dict:
    """Band of each layer, and of the run from the median layer of each statistic."""
    run_mom, run_gini = nan_median(max_over_mean), nan_median(gini)
    return {
        "thresholds": {"max_over_mean": thresholds.max_over_mean, "gini": thresholds.gini},
        "layers": [{"max_over_mean": m, "gini": g, "band": classify(m, g, thresholds)}
                   for m, g in zip(max_over_mean, gini)],
        "run": {"max_over_mean": run_mom, "gini": run_gini, "band": classify(run_mom, run_gini, thresholds)},
    }
