"""Metrics as CSV (`<run dir>/csv/metrics.csv`) that survive a resume in the same run folder."""

from __future__ import annotations

import csv
import logging

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers.csv_logs import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

log = logging.getLogger(__name__)


class ResumableExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts, so resuming a run in its own folder
    lost every row written before. This one keeps them: at its first write it drops only the earlier rows of the
    steps it is about to write again (a killed run trained past its last checkpoint; the resumed run repeats those
    steps), then appends."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._merged = False

    def _check_log_dir_exists(self) -> None:
        pass  # the parent's version deletes metrics.csv

    def save(self) -> None:
        if self.metrics and not self._merged:
            self._merged = True
            self._keep_earlier_rows(min(int(m["step"]) for m in self.metrics))
        super().save()

    def _keep_earlier_rows(self, first_step: int) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = list(reader)
        kept = [row for row in rows if row.get("step") and int(float(row["step"])) < first_step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
        # The parent appends with this header (and rewrites the file if the new rows bring new columns).
        self.metrics_keys = sorted(set(header) | set(self.metrics_keys))
        log.info("metrics.csv: kept %d rows of the earlier run%s", len(kept),
                 f", replaced {len(rows) - len(kept)} of steps >= {first_step}" if len(rows) > len(kept) else "")


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger (same arguments) with the writer above."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ResumableExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableExperimentWriter(log_dir=self.log_dir)
        return self._experiment
