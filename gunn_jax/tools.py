"""Command line for trained models: classify, features, ensemble.

    python -m gunn_jax.tools classify --workdir=W [--checkpoint=best] IMAGE...
    python -m gunn_jax.tools features --workdir=W --output=F.npy IMAGE...
    python -m gunn_jax.tools ensemble --workdir=W [--num_snapshots=M]

`classify` prints each image's path, then its top-5 classes as lines
`  PROBABILITY  CLASS`, most probable first. `features` saves the
global-pooled features [N, D] as a `.npy` file, in the order of the images.
`ensemble` prints JSON lines: one per snapshot, then the ensemble's.
Evaluation (single-crop or ten-crop) is `main.py --mode=eval`. A
`UserError` prints one `error:` line and exits with status 2.
"""

import argparse
import json
import sys

import numpy as np
from PIL import Image

from gunn_jax import inference
from gunn_jax.errors import UserError


def _checkpoint(value: str) -> str | int:
  return int(value) if value.isdigit() else value


def _read_images(paths: list[str]) -> list[np.ndarray]:
  """Decodes image files to uint8 RGB [h, w, 3] arrays."""
  images = []
  for path in paths:
    try:
      with Image.open(path) as image:
        images.append(np.asarray(image.convert('RGB')))
    except OSError as e:
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
  np.save(args.output, features)
  print(f'Saved features {list(features.shape)} to {args.output}.')


def _ensemble(args) -> None:
  results = inference.evaluate_ensemble(args.workdir, args.num_snapshots)
  for snapshot in results['snapshots']:
    print(json.dumps(snapshot))
  print(
    json.dumps({**results['ensemble'], 'num_examples': results['num_examples']})
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
