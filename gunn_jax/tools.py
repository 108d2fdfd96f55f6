"""Command line for trained models: classify, features, ensemble, diagnostics.

    python -m gunn_jax.tools classify --workdir=W [--checkpoint=best] IMAGE...
    python -m gunn_jax.tools features --workdir=W --output=F.npy IMAGE...
    python -m gunn_jax.tools ensemble --workdir=W [--num_snapshots=M]
    python -m gunn_jax.tools singularities --workdir=W [--checkpoint=best]
        [--num_images=512] [--hessian] [--compare W2 W3 ...] [--figure=F.png]

`classify` prints each image's path, then its top-5 classes as lines
`  PROBABILITY  CLASS`, most probable first. `features` saves the
global-pooled features [N, D] as a `.npy` file, in the order of the images.
`ensemble` prints JSON lines: one per snapshot, then the ensemble's.
`singularities` prints one JSON line per layer of each run (the numbers of
`gunn_jax.diagnostics`, with 'workdir', 'model' and 'step'), with `--hessian`
one more line per run, and writes a figure (default: `singularities.png` in
the run's workdir; with `--compare`, in the current directory) comparing the
runs.
Evaluation (single-crop or ten-crop) is `main.py --mode=eval`. A
`UserError` prints one `error:` line and exits with status 2.
"""

import argparse
import json
import sys

import numpy as np
from etils import epath

from gunn_jax import diagnostics, folders, inference, storage
from gunn_jax.errors import UserError, first_line


def _checkpoint(value: str) -> str | int:
  return int(value) if value.isdigit() else value


def _read_images(paths: list[str]) -> list[np.ndarray]:
  """Decodes image files to uint8 RGB [h, w, 3] arrays, as training does."""
  images = []
  for path in paths:
    try:
      images.append(folders.read_rgb(path))
    except Exception as e:  # noqa: BLE001 - PIL raises many types.
      raise UserError(f'Cannot read image {path}: {e}') from e
  return images


def _classify(args) -> None:
  model = inference.load(args.workdir, args.checkpoint)
  top = model.classify(_read_images(args.images), k=args.top)
  for path, classes in zip(args.images, top):
    print(path)
    for name, probability in classes:
      print(f'  {probability:.4f}  {name}')


def _features(args) -> None:
  model = inference.load(args.workdir, args.checkpoint)
  features = model.features(model.preprocess(_read_images(args.images)))
  with epath.Path(args.output).open('wb') as f:  # Also on gs://.
    np.save(f, features)
  print(f'Saved features {list(features.shape)} to {args.output}.')


def _ensemble(args) -> None:
  results = inference.evaluate_ensemble(args.workdir, args.num_snapshots)
  for snapshot in results['snapshots']:
    print(json.dumps(snapshot))
  print(
    json.dumps({**results['ensemble'], 'num_examples': results['num_examples']})
  )


def _singularities(args) -> None:
  workdirs = ([args.workdir] if args.workdir else []) + (args.compare or [])
  if not workdirs:
    raise UserError('Give --workdir=RUN, or --compare RUN_A RUN_B ...')
  figure = args.figure or (
    storage.join(workdirs[0], 'singularities.png')
    if len(workdirs) == 1
    else 'singularities_compare.png'
  )
  runs = {}
  for workdir in workdirs:
    result = inference.diagnose_run(
      workdir, args.checkpoint, args.num_images, args.hessian
    )
    run = {key: result[key] for key in ('workdir', 'model', 'step')}
    for layer in result['layers']:
      print(json.dumps({**run, **layer}))
    if args.hessian:
      print(json.dumps({**run, 'hessian': result['hessian']}))
    label = f'{result["model"]} ({epath.Path(workdir).name})'
    if label in runs:  # Runs of one model in folders of the same name.
      label = f'{result["model"]} ({workdir})'
    runs[label] = result['layers']
  try:
    diagnostics.plot(runs, figure)
  except Exception as e:  # noqa: BLE001 - OSError, or the object store's.
    raise UserError(f'Cannot write the figure {figure}: {first_line(e)}') from e
  print(f'Wrote {figure}.', file=sys.stderr)


def _add_singularities(commands) -> None:
  command = commands.add_parser(
    'singularities',
    help='Overlap, elimination and linear dependence of the channels.',
  )
  command.set_defaults(fn=_singularities)
  command.add_argument('--workdir', help='The training run directory.')
  command.add_argument(
    '--compare',
    nargs='+',
    metavar='RUN',
    help='More run directories (e.g. GUNN, SUNN, NoRes) on one figure.',
  )
  command.add_argument(
    '--checkpoint',
    type=_checkpoint,
    default='latest',
    help="'latest', 'best' or a step (of every run).",
  )
  command.add_argument(
    '--num_images',
    type=int,
    default=512,
    help='Evaluation images whose activations are used.',
  )
  command.add_argument(
    '--hessian',
    action='store_true',
    help="Also estimate the training loss Hessian's spectrum (minutes).",
  )
  command.add_argument(
    '--figure', help='The PNG file (default: see the module docstring).'
  )


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog='python -m gunn_jax.tools', description=__doc__.split('\n')[0]
  )
  commands = parser.add_subparsers(dest='command', required=True)
  for name, fn, help_text in [
    ('classify', _classify, 'Print the top classes of image files.'),
    ('features', _features, 'Save the features of image files as .npy.'),
    ('ensemble', _ensemble, 'Evaluate the snapshot ensemble of a run.'),
  ]:
    command = commands.add_parser(name, help=help_text)
    command.set_defaults(fn=fn)
    command.add_argument(
      '--workdir', required=True, help='The training run directory.'
    )
    if name == 'ensemble':
      command.add_argument(
        '--num_snapshots', type=int, help='Last snapshots averaged (all).'
      )
      continue
    command.add_argument(
      '--checkpoint',
      type=_checkpoint,
      default='latest',
      help="'latest', 'best' or a step.",
    )
    command.add_argument(
      'images', nargs='+', metavar='IMAGE', help='Image files (any size).'
    )
    if name == 'classify':
      command.add_argument('--top', type=int, default=5, help='Classes.')
    else:
      command.add_argument('--output', required=True, help='The .npy file.')
  _add_singularities(commands)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs a command; returns the exit status (2 for a `UserError`)."""
  args = _parser().parse_args(argv)
  try:
    args.fn(args)
  except UserError as e:
    print('error: ' + ' '.join(str(e).split()), file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
