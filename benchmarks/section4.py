"""Does the order break the symmetry? GUNN vs SUNN vs GUNN-NoRes on digits.

  python -m benchmarks.section4 --workdir=runs/section4 --seeds=0,1,2 \
      --figures=docs/figures --json=runs/section4/results.json

Trains `gunn_mini`, `sunn_mini` and `gunn_mini_nores` with the quickstart
recipe (`configs/quickstart.py`: 15 epochs on scikit-learn's digits), once
per seed, with the overlap and effective dimensionality of every layer
logged during training (`config.diagnostics_every_steps`). Then it
diagnoses each final checkpoint on all 355 test digits
(`inference.diagnose_run`, `gunn_jax.diagnostics`) and prints two
Markdown tables: the final test error per model (mean and range over the
seeds) and, per GUNN layer, the overlap within and across segments, the
effective dimensionality PR / N and the eliminated channels (mean and
range over the seeds). It writes two figures: `section4_layers.png` (the
per-layer diagnostics of the first seed's runs, `diagnostics.plot`) and
`section4_training.png` (paper Figure 3's training loss and test error
against steps, and PR / N of the GUNN layers during training, each the mean
over the seeds). A run already finished in `--workdir` is reused.
"""

import argparse
import json
import os

import numpy as np

from configs import quickstart
from gunn_jax import diagnostics, inference, metric_io, train

MODELS = ('gunn_mini', 'sunn_mini', 'gunn_mini_nores')
GUNN_LAYERS = ('stage1_gunn', 'stage2_gunn', 'stage3_gunn')


def train_run(model: str, seed: int, workdir: str, diagnostics_every: int):
  config = quickstart.get_config()
  config.model = model
  config.seed = seed
  config.diagnostics_every_steps = diagnostics_every
  config.diagnostics_num_images = 355
  train.train_and_evaluate(config, workdir)


def summary(layer: dict) -> dict:
  """The per-layer numbers of the table."""
  within, across = layer['overlap']['within'], layer['overlap']['across']
  return {
    'within_mean_abs_r': within['mean_abs_r'],
    'across_mean_abs_r': across['mean_abs_r'],
    'within_above_0.9': within['fraction_abs_r_above_0.9'],
    'across_above_0.9': across['fraction_abs_r_above_0.9'],
    'pr_fraction': layer['dimensionality']['participation_ratio_fraction'],
    'eliminated': layer['elimination']['num_eliminated_channels'],
  }


def spread(values) -> str:
  values = np.asarray(values, np.float64)
  if len(values) == 1:
    return f'{values[0]:.3f}'
  return f'{values.mean():.3f} ({values.min():.3f}-{values.max():.3f})'


def print_tables(results: list[dict]) -> None:
  print('| model | test error % (mean, range) |')
  print('|---|---|')
  for model in MODELS:
    errors = [r['test_error'] for r in results if r['model'] == model]
    print(f'| {model} | {spread(errors)} |')
  print()
  keys = list(summary(results[0]['layers'][1]))
  print('| layer | model | ' + ' | '.join(keys) + ' |')
  print('|---' * (len(keys) + 2) + '|')
  for name in GUNN_LAYERS:
    for model in MODELS:
      rows = [
        summary(next(x for x in r['layers'] if x['layer'] == name))
        for r in results
        if r['model'] == model
      ]
      cells = [spread([row[k] for row in rows]) for k in keys]
      print(f'| {name} | {model} | ' + ' | '.join(cells) + ' |')


def mean_curve(workdirs: list[str], split: str, key: str):
  """Steps and the mean over runs of `key` in their metrics of `split`."""
  curves = [
    [(r['step'], r[key]) for r in metric_io.read_metrics(w, split) if key in r]
    for w in workdirs
  ]
  steps = [step for step, _ in curves[0]]
  return steps, np.mean([[v for _, v in c] for c in curves], axis=0)


def plot_training(workdirs: dict[str, list[str]], path: str) -> None:
  from matplotlib.figure import Figure  # Only the figure needs it.

  figure = Figure(figsize=(14, 3.6))
  axes = figure.subplots(1, 3)
  for index, (model, dirs) in enumerate(workdirs.items()):
    color = f'C{index}'
    axes[0].plot(*mean_curve(dirs, 'train', 'loss'), color=color, label=model)
    axes[1].plot(
      *mean_curve(dirs, 'eval', 'top1_error'), color=color, label=model
    )
    for name, style in zip(GUNN_LAYERS, ('-', '--', ':')):
      axes[2].plot(
        *mean_curve(
          dirs, 'diagnostics', f'{name}/participation_ratio_fraction'
        ),
        style,
        color=color,
        label=f'{model} {name}',
      )
  axes[0].set(title='training loss', xlabel='step', yscale='log')
  axes[1].set(title='test error (%)', xlabel='step', yscale='log')
  axes[2].set(title='PR / N (stage 1 -, 2 --, 3 :)', xlabel='step')
  axes[0].legend()
  axes[2].legend(fontsize=6)
  figure.tight_layout()
  figure.savefig(path, dpi=80)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--workdir', required=True, help='Directory of the runs (one per model).'
  )
  parser.add_argument(
    '--seeds', default='0,1,2', help='Comma-separated seeds, one run each.'
  )
  parser.add_argument(
    '--diagnostics_every_steps',
    type=int,
    default=23,
    help='Steps between diagnostics during training (23 = one epoch).',
  )
  parser.add_argument(
    '--figures', default='.', help='Directory for the two PNG figures.'
  )
  parser.add_argument('--json', help='Write every result to this JSON file.')
  args = parser.parse_args()

  results, workdirs = [], {model: [] for model in MODELS}
  for seed in [int(s) for s in args.seeds.split(',')]:
    for model in MODELS:
      workdir = os.path.join(args.workdir, f'{model}_seed{seed}')
      train_run(model, seed, workdir, args.diagnostics_every_steps)
      workdirs[model].append(workdir)
      diagnosed = inference.diagnose_run(workdir, num_images=355)
      (last,) = metric_io.read_metrics(workdir, 'eval')[-1:]
      results.append(
        {
          'model': model,
          'seed': seed,
          'step': diagnosed['step'],
          'test_error': last['top1_error'],
          'layers': diagnosed['layers'],
        }
      )
  print_tables(results)
  os.makedirs(args.figures, exist_ok=True)
  first_seed = {r['model']: r['layers'] for r in results[: len(MODELS)]}
  diagnostics.plot(
    first_seed, os.path.join(args.figures, 'section4_layers.png')
  )
  plot_training(workdirs, os.path.join(args.figures, 'section4_training.png'))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f)


if __name__ == '__main__':
  main()
