"""Test-only program: a dataset prepared on first use by several processes.

  python -m gunn_jax.launch --num_processes=2 -- \
      tests/multihost_download.py ARCHIVE DATA_DIR [OWN_DIR]

Every process asks for CIFAR-10 in DATA_DIR (shared by all), then in
OWN_DIR/<process index> (a disk of its own), with TFDS's download answered
by ARCHIVE (`helpers.write_cifar10_archive`); process 0's download takes
3 s, so that the others find the data missing and wait. Each process prints
`process P: downloads N, train T, eval E` after each, N counting its own
downloads.
"""

import os
import sys
import time

import helpers
import jax

from configs import tiny
from gunn_jax import datasets, distributed


def main(archive: str, data_dirs: list[str]) -> None:
  distributed.initialize()
  me, calls = jax.process_index(), []

  def on_download(url):
    calls.append(url)
    if me == 0:
      time.sleep(3)

  for data_dir in data_dirs:
    config = tiny.get_config()
    config.dataset, config.data_dir = 'cifar10', data_dir
    with helpers.fake_cifar10_download(archive, on_download):
      info = datasets.get_dataset_info(config)
    print(
      f'process {me}: downloads {len(calls)}, train '
      f'{info.num_train_examples}, eval {info.num_eval_examples}',
      flush=True,
    )
  distributed.mark_finished()


if __name__ == '__main__':
  archive, shared, *own = sys.argv[1:]
  own_dirs = [os.path.join(d, str(os.environ['JAX_PROCESS_ID'])) for d in own]
  main(archive, [shared, *own_dirs])
