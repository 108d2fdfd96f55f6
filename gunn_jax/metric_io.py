"""Metric writers: TensorBoard (clu) and `workdir/metrics.jsonl`.

Scalars are written with a `train_`, `eval_` or `diagnostics_` prefix
(`train_loss`, `eval_top1_error`). `metrics.jsonl` receives every written
scalar set as one JSON object per line, the prefix moved into a `split`
field:

    {"step": 500, "split": "train", "loss": 0.31, "accuracy": 0.9, ...}
    {"step": 500, "split": "eval", "loss": 0.2, "top1_error": 5.6, ...}
    {"step": 500, "split": "diagnostics", "stage1_gunn/within_mean_abs_r": ...}

Sets without a prefix (steps/s from `ReportProgress`) count as 'train'. Only
process 0 writes files. The console gets its own short lines (`console.py`).
"""

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from etils import epath

METRICS_FILE = 'metrics.jsonl'
_SPLITS = ('train', 'eval', 'diagnostics')


def _to_json_value(value: Any) -> Any:
  value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; 'nan', 'inf', '-inf'.
  return value


class JsonlWriter(metric_writers.MetricWriter):
  """Appends each scalar set to a JSON-lines file; ignores other summaries.

  The file is opened at the first write and stays open; each line is
  flushed to the operating system as it is written, so a killed process
  leaves every line it wrote (and at most one torn last line).
  """

  def __init__(self, path: str | os.PathLike):
    self._path = epath.Path(path)
    self._file = None

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    split = 'train'
    record = {}
    for key, value in scalars.items():
      prefix, _, name = key.partition('_')
      if prefix in _SPLITS and name:
        split = prefix
        key = name
      record[key] = _to_json_value(value)
    if self._file is None:
      self._file = self._path.open('a')
    self._file.write(
      json.dumps({'step': int(step), 'split': split, **record}) + '\n'
    )
    self._file.flush()

  def write_summaries(self, step, values, metadata=None) -> None:
    del step, values, metadata

  def write_images(self, step, images) -> None:
    del step, images

  def write_videos(self, step, videos) -> None:
    del step, videos

  def write_audios(self, step, audios, *, sample_rate) -> None:
    del step, audios, sample_rate

  def write_texts(self, step, texts) -> None:
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    del step, arrays, num_buckets

  def write_hparams(self, hparams) -> None:
    del hparams

  def flush(self) -> None:
    pass  # Every line is flushed as it is written.

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """Returns the run's writer: TensorBoard and `metrics.jsonl`.

  Both write on background threads, off the training loop; `flush()` waits
  for what was written so far. Processes other than 0 write nothing.
  """
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncMultiWriter(
    [
      metric_writers.SummaryWriter(workdir),
      JsonlWriter(epath.Path(workdir) / METRICS_FILE),
    ]
  )


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """Returns the records of `workdir/metrics.jsonl`, optionally one split."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  records = [json.loads(line) for line in path.read_text().splitlines()]
  return [r for r in records if split is None or r['split'] == split]


def truncate_after(workdir: str, step: int) -> None:
  """Drops records after `step` (and a torn last line) before a resume.

  A run killed after its last checkpoint has written records that the
  resumed run writes again; this keeps one record per step and split.
  """
  path = epath.Path(workdir) / METRICS_FILE
  if jax.process_index() > 0 or not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if record['step'] <= step:
      kept.append(line + '\n')
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(''.join(kept))
  tmp.replace(path)
