"""Test-only program: processes whose data differ or are missing stop together.

  python -m gunn_jax.launch --num_processes=2 -- \
      tests/multihost_agreement.py ROOT

ROOT/small and ROOT/large hold TFDS CIFAR-10 with 20 and 25 training images
(`helpers.write_cifar10_archive`), ROOT/empty nothing. In each of `CASES`,
in order and in the same processes, process p trains the tiny config on
CIFAR-10 in the data_dir of its case, without downloading, into
ROOT/runs/CASE, and prints `CASE: ` and its error line (or `trained`).
Then both describe the same data: `agreed: N training images`.
"""

import os
import sys

import jax

from configs import tiny
from gunn_jax import distributed, train
from gunn_jax.errors import UserError

# Case -> the data_dir (under ROOT) of process 0 and of process 1.
CASES = {
  'differ': ('small', 'large'),
  'missing_on_1': ('small', 'empty'),
  'missing_on_0': ('empty', 'small'),
  'missing_everywhere': ('empty', 'empty'),
}


def cifar10(root: str, data: str):
  config = tiny.get_config()
  config.dataset, config.data_dir = 'cifar10', os.path.join(root, data)
  config.download_data = False
  return config


def main(root: str) -> None:
  distributed.initialize()
  me = jax.process_index()
  for case, data in CASES.items():
    config = cifar10(root, data[me])
    try:
      train.train_and_evaluate(config, os.path.join(root, 'runs', case))
      outcome = 'trained'
    except UserError as e:
      outcome = str(e)
    print(f'{case}: {outcome}', flush=True)
  info = train.create_experiment(cifar10(root, 'small')).info
  print(f'agreed: {info.num_train_examples} training images', flush=True)
  distributed.mark_finished()


if __name__ == '__main__':
  main(sys.argv[1])
