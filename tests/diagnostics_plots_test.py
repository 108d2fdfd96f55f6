"""Tests of the figure that compares runs' diagnostics."""

import os
import subprocess
import sys

import numpy as np

from gunn_jax.diagnostics import plots, statistics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def layer_results(seed):
  """`diagnose`-like results of a transition and a GUNN layer."""
  rng = np.random.default_rng(seed)
  results = []
  for name, kind in (
    ('stage1_transition', 'transition'),
    ('stage1_gunn', 'gunn'),
  ):
    covariance = np.cov(rng.normal(size=(200, 8)), rowvar=False)
    results.append(
      {
        'layer': name,
        'kind': kind,
        'overlap': statistics.overlap(covariance, segment_size=4),
        'dimensionality': statistics.dimensionality(covariance),
      }
    )
  return results


def test_plot_writes_a_png_of_several_runs(tmp_path):
  figure = tmp_path / 'compare.png'
  plots.plot({'gunn': layer_results(0), 'sunn': layer_results(1)}, figure)
  assert figure.read_bytes().startswith(b'\x89PNG')


def test_only_plotting_imports_matplotlib():
  imported = subprocess.run(
    [
      sys.executable,
      '-c',
      'import sys; from gunn_jax import diagnostics; '
      "print('matplotlib' in sys.modules, callable(diagnostics.plot))",
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    check=True,
  )
  assert imported.stdout.split() == ['False', 'True']
