"""Metric writers: TensorBoard (clu) and `workdir/metrics.jsonl`.

Scalars are written with a `train_`, `eval_` or `diagnostics_` prefix
(`train_loss`, `eval_top1_error`). `metrics.jsonl` receives every written
scalar set as one JSON object per line, the prefix moved into a `split`
field:

    {"step": 500, "split": "train", "loss": 0.31, "accuracy": 0.9, ...}
    {"step": 500, "split": "eval", "loss": 0.2, "top1_error": 5.6, ...}
    {"step": 500, "split": "diagnostics", "stage1_gunn/within_mean_abs_r": ...}

Sets without a prefix (steps/s from `ReportProgress`) count as 'train'. Only
process 0 writes files, and only when the writer is flushed (the training
loop does so before each checkpoint and at the end): on an object store
(`gs://`) each write uploads a whole file. The console gets its own short
lines (`console.py`).
"""

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
import tensorflow as tf
from clu import metric_writers
from etils import epath

from gunn_jax import storage

METRICS_FILE = 'metrics.jsonl'
# TensorBoard's queue and flush interval: never of its own accord.
_NEVER = 2**31 - 1
_SPLITS = ('train', 'eval', 'diagnostics')


def _to_json_value(value: Any) -> Any:
  value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; 'nan', 'inf', '-inf'.
  return value


class JsonlWriter(metric_writers.MetricWriter):
  """Keeps each scalar set as a JSON line; `flush` writes them to the file.

  The file is replaced whole at each flush, by its earlier lines and the new
  ones (`storage.write_whole`): object stores cannot append, and a file
  grown and flushed line by line would be uploaded again at every line. The
  training loop flushes before each checkpoint and at the end, so a killed
  run keeps every line up to its last checkpoint, and the file is never
  torn. (A run logs a few thousand lines: rewriting them is cheap.)
  """

  def __init__(self, path: str | os.PathLike):
    self._path = epath.Path(path)
    self._lines = None  # The file's lines, read at the first flush.
    self._pending = []

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    split = 'train'
    record = {}
    for key, value in scalars.items():
      prefix, _, name = key.partition('_')
      if prefix in _SPLITS and name:
        split = prefix
        key = name
      record[key] = _to_json_value(value)
    self._pending.append(
      json.dumps({'step': int(step), 'split': split, **record})
    )

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
    if not self._pending:
      return
    if self._lines is None:
      self._lines = _read_lines(self._path)
    lines = self._lines + self._pending
    storage.write_whole(self._path, ''.join(line + '\n' for line in lines))
    self._lines, self._pending = lines, []

  def close(self) -> None:
    self.flush()


class _SummaryWriter(metric_writers.SummaryWriter):
  """clu's TensorBoard writer, writing its events only at `flush()`.

  TensorFlow's default flushes every 10 events or 2 minutes; each flush of a
  `gs://` file uploads the whole file again.
  """

  def __init__(self, logdir: str):
    self._summary_writer = tf.summary.create_file_writer(
      logdir, max_queue=_NEVER, flush_millis=_NEVER
    )


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """Returns the run's writer: TensorBoard and `metrics.jsonl`.

  Both write on background threads, off the training loop, and reach the
  files at `flush()`, which waits for what was written so far (the training
  loop flushes before each checkpoint and at the end). Processes other than
  0 write nothing.
  """
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncMultiWriter(
    [
      _SummaryWriter(workdir),
      JsonlWriter(_path(workdir)),
    ]
  )


def _read_lines(path: epath.Path) -> list[str]:
  return path.read_text().splitlines() if path.exists() else []


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """Returns the records of `workdir/metrics.jsonl`, optionally one split."""
  records = [json.loads(line) for line in _read_lines(_path(workdir))]
  return [r for r in records if split is None or r['split'] == split]


def truncate_after(workdir: str, step: int) -> None:
  """Drops records after `step` (and a torn last line of older versions)
  before a resume.

  A run killed after its last checkpoint may have written records that the
  resumed run writes again; this keeps one record per step and split.
  """
  path = _path(workdir)
  if jax.process_index() > 0 or not path.exists():
    return
  kept = []
  for line in _read_lines(path):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if record['step'] <= step:
      kept.append(line + '\n')
  storage.write_whole(path, ''.join(kept))


def _path(workdir: str) -> epath.Path:
  return epath.Path(workdir) / METRICS_FILE
