"""wandb writer: per-layer scalar series every report; the [layer, expert] heatmap image
and per-layer histograms of tokens per expert every `heatmap_every` reports.

If a wandb run is already active (Megatron initializes one when `--wandb-project` is
set, on the last rank) it is used as is and never finished by us. Otherwise we start
one in `out_dir` with mode "offline" unless told otherwise ($WANDB_MODE or `mode=`);
`wandb sync <out_dir>/wandb/offline-run-*` uploads it later.

Keys are the TensorBoard tags (IntervalReport.scalars(), `moe_hist/...`,
`moe_heatmap/...`), logged with step=report.step, the training iteration, which is
also what Megatron uses as the wandb step.
"""

from __future__ import annotations

import os
from typing import Any

from megatron_moe_probe.record import IntervalReport
from megatron_moe_probe.writers.heatmap import heatmap_rgb
from megatron_moe_probe.writers.tensorboard import HEATMAP_TAG, HIST_TAG

DEFAULT_PROJECT = "megatron-moe-probe"
SUMMARY_TABLE = "moe_summary/layers"


class WandbWriter:
    name = "wandb"

    def __init__(
        self,
        out_dir: str | os.PathLike[str] | None = None,
        *,
        heatmap_every: int = 10,
        project: str | None = None,
        mode: str | None = None,
        run_name: str | None = None,
        existing: Any = None,
    ) -> None:
        """existing: Megatron's `get_wandb_writer()` (the wandb module itself) or a run object;
        when None, an active `wandb.run` is used if there is one."""
        import wandb  # ImportError -> the factory warns and skips this writer

        if heatmap_every < 1:
            raise ValueError(f"heatmap_every must be >= 1, got {heatmap_every}")
        self._wandb = wandb
        self.heatmap_every = heatmap_every
        self._count = 0
        self._layer_rows: list[IntervalReport] = []  # per-layer statistics only, for the summary table
        self._last_step: int | None = None
        if existing is not None:
            self._run = existing if existing is not wandb else wandb.run
            self._owned = False
        elif wandb.run is not None:
            self._run = wandb.run
            self._owned = False
        else:
            if out_dir is None:
                raise ValueError("WandbWriter needs out_dir to start a run of its own")
            os.makedirs(out_dir, exist_ok=True)
            from megatron_moe_probe.grouping import GROUP_ENV

            self._run = wandb.init(
                project=project or DEFAULT_PROJECT,
                name=run_name,
                group=os.environ.get(GROUP_ENV) or None,  # `moe-probe matrix --wandb` sets it per grid
                dir=os.fspath(out_dir),
                mode=mode or os.environ.get("WANDB_MODE") or "offline",
            )
            self._owned = True
        if self._run is None:
            raise RuntimeError("no wandb run to log into (wandb.run is None)")

    @property
    def run(self) -> Any:
        return self._run

    def write_meta(self, meta: dict[str, Any]) -> None:
        from megatron_moe_probe.record import to_json_safe

        # Under one key, so it cannot collide with Megatron's own config (its args).
        self._run.config.update({"moe_probe": to_json_safe(meta)}, allow_val_change=True)

    def write(self, report: IntervalReport) -> None:
        data: dict[str, Any] = dict(report.scalars())
        if self._count % self.heatmap_every == 0 and report.tokens_per_expert:
            wandb = self._wandb
            data[HEATMAP_TAG] = wandb.Image(heatmap_rgb(report), caption=f"step {report.step}")
            for name, counts in zip(report.layer_names(), report.tokens_per_expert):
                if counts:
                    data[HIST_TAG.format(layer=name)] = wandb.Histogram(counts)
        self._count += 1
        self._run.log(data, step=int(report.step))
        self._alert_integrity(report)
        self._last_step = int(report.step)
        self._layer_rows.append(IntervalReport(report.step, report.steps, report.time, report.layers,
                                               report.num_experts, report.ep_size, report.per_layer, [], []))

    def _alert_integrity(self, report: IntervalReport) -> None:
        """A dispatch-integrity violation is also a wandb alert (e-mail / Slack where the user set
        them up); a clean interval sends nothing."""
        from megatron_moe_probe.integrity_report import ALERT_TITLE, INTEGRITY, extras_of, violation_line

        line = violation_line(extras_of(report.meta).get(INTEGRITY), report.step, report.steps)
        alert = getattr(self._run, "alert", None)
        if line and alert is not None:
            level = getattr(getattr(self._wandb, "AlertLevel", None), "ERROR", "ERROR")
            alert(title=ALERT_TITLE, text=line, level=level)

    def _log_summary(self) -> None:
        """The run's per-layer summary (medians over its reports) as one wandb.Table."""
        from megatron_moe_probe.grouping import SUMMARY_STATS, summary_rows

        rows = summary_rows(self._layer_rows)
        if not rows:
            return
        columns = ["layer", *SUMMARY_STATS]
        table = self._wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
        # Our own run: at the last report's step. A run we share (Megatron's, Bridge's) may have
        # logged later steps already, and wandb drops data logged at an earlier step.
        self._run.log({SUMMARY_TABLE: table}, **({"step": self._last_step} if self._owned else {}))

    def close(self) -> None:
        if self._run is None:
            return
        try:
            self._log_summary()
        finally:  # a failing table must not leave our own run unfinished
            if self._owned:
                self._run.finish()
            self._run = None
