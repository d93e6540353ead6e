"""One clu metric writer for a run's scalars: the log, TensorBoard and WORKDIR/metrics.jsonl.

metrics.jsonl holds one JSON object per step and split: keys `split/name` (evaluations) go to
that split's line as `name`, the others (training) to the line of split "train".
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
from typing import Any

from clu import metric_writers

from jaxcap import workdir as workdir_lib


class JsonlWriter(metric_writers.MetricWriter):
  """Scalars as JSON lines, merged per (step, split): a line is written when a later step
  arrives or on flush, so the metrics a step gets from several writers share one line."""

  def __init__(self, path: str):
    self._path = path
    self._step: int | None = None
    self._records: dict[str, dict[str, Any]] = {}

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if step != self._step:
      self.flush()
      self._step = step
    for key, value in scalars.items():
      split, _, name = key.rpartition('/')
      value = value.item() if hasattr(value, 'item') else value  # numpy -> int or float
      self._records.setdefault(split or 'train', {})[name] = value

  def flush(self) -> None:
    if self._records:
      with open(self._path, 'a') as f:
        for split, record in self._records.items():
          f.write(json.dumps({'step': self._step, 'split': split, **record}) + '\n')
      self._records = {}

  def close(self) -> None:
    self.flush()

  # Only scalars go to metrics.jsonl.
  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_hparams(self, hparams): pass


class RatesWriter(metric_writers.MultiWriter):
  """Adds rates derived from steps/s (examples/s = steps/s x batch size, ...) beside it."""

  def __init__(self, writers, per_step: Mapping[str, float]):
    super().__init__(writers)
    self._per_step = dict(per_step)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if 'steps_per_sec' in scalars:
      scalars = {**scalars, **{name: scalars['steps_per_sec'] * count
                               for name, count in self._per_step.items()}}
    super().write_scalars(step, scalars)


def create(workdir: str, *, is_chief: bool,
           per_step: Mapping[str, float] | None = None) -> metric_writers.MetricWriter:
  """Logs on every process; process 0 also writes TensorBoard events and metrics.jsonl.
  `per_step` names rates to derive from steps/s: {'examples_per_sec': batch_size}."""
  writers = [metric_writers.LoggingWriter()]
  if is_chief:
    writers += [metric_writers.SummaryWriter(workdir),
                JsonlWriter(os.path.join(workdir, workdir_lib.METRICS))]
  return RatesWriter(writers, per_step or {})
