"""The figure that compares runs' per-layer diagnostics (section 4).

The only module of `gunn_jax.diagnostics` that needs matplotlib.
"""

import io
from typing import Sequence

import numpy as np
from etils import epath

from gunn_jax.diagnostics.statistics import HISTOGRAM_BINS


def plot(runs: dict[str, Sequence[dict]], path: str) -> None:
  """Writes a PNG comparing runs' per-layer diagnostics.

  Panels: mean |r| within (solid) and across (dashed) segments per layer;
  the fraction of pairs with |r| > 0.9 (same styles); the effective
  dimensionality PR / N per layer; and the histogram of |r| over the pairs
  of all GUNN layers (log scale).

  Args:
    runs: label -> the results of `diagnostics.diagnose` (same model layout
      for all).
    path: the PNG file.
  """
  # Only the figure needs matplotlib; a bare Figure leaves pyplot's backend
  # (e.g. a notebook's inline one) alone.
  from matplotlib.figure import Figure

  figure = Figure(figsize=(17, 3.8))
  axes = figure.subplots(1, 4)
  edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
  for index, (label, results) in enumerate(runs.items()):
    color = f'C{index}'
    names = [r['layer'].replace('_transition', '_tr') for r in results]
    x = np.arange(len(results))
    for side, style in (('within', '-'), ('across', '--')):
      stats = [r['overlap'][side] for r in results]
      for ax, key in (
        (axes[0], 'mean_abs_r'),
        (axes[1], 'fraction_abs_r_above_0.9'),
      ):
        values = [s.get(key, np.nan) for s in stats]
        ax.plot(
          x, values, style, marker='o', color=color, label=f'{label} {side}'
        )
    axes[2].plot(
      x,
      [r['dimensionality']['participation_ratio_fraction'] for r in results],
      marker='o',
      color=color,
      label=label,
    )
    counts = np.sum(
      [r['overlap']['abs_r_histogram'] for r in results if r['kind'] == 'gunn'],
      axis=0,
    )
    axes[3].stairs(counts / counts.sum(), edges, color=color, label=label)
  for ax, title in zip(
    axes[:3],
    ('mean |r| (within -, across --)', 'pairs with |r| > 0.9', 'PR / N'),
  ):
    ax.set_xticks(x, names, rotation=60, fontsize=7)
    ax.set_title(title)
  axes[0].legend(fontsize=6)
  axes[2].legend(fontsize=7)
  axes[3].set(title='|r| of GUNN-layer pairs', xlabel='|r|', yscale='log')
  axes[3].legend(fontsize=7)
  figure.tight_layout()
  image = io.BytesIO()
  figure.savefig(image, dpi=80, format='png')
  epath.Path(path).write_bytes(image.getvalue())  # Also on gs://.
