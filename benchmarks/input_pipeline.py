"""Training input throughput (images/s) of `create_train_iterator`.

  python -m benchmarks.input_pipeline --dataset digits --batch_size 64

CIFAR-shaped throughput without CIFAR on disk: `--dataset digits
--image_size 32` runs the same in-memory path as CIFAR (gather, batched
normalise/flip/pad-crop/roll on 32x32x3 images); only the source differs.
Any config dataset works, e.g. `--dataset cifar10 --data_dir DIR` or
`--dataset folder:/path/to/root`.
"""

import argparse
import itertools
import time

from configs import base
from gunn_jax import input_pipeline


def measure_train_throughput(config, num_batches=200, warmup=20) -> float:
  """Returns training images per second delivered to this process.

  Args:
    config: the experiment config (dataset, batch size, image size, ...).
    num_batches: batches timed after the warm-up.
    warmup: batches consumed first (loading, tracing, filling buffers).

  Returns:
    Host-local images per second over the timed batches.
  """
  iterator = input_pipeline.create_train_iterator(config)
  for _ in itertools.islice(iterator, warmup):
    pass
  start = time.perf_counter()
  images = sum(
    len(batch['labels']) for batch in itertools.islice(iterator, num_batches)
  )
  return images / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--dataset', default='digits', help='A config.dataset value.'
  )
  parser.add_argument(
    '--batch_size', type=int, default=64, help='Global batch size.'
  )
  parser.add_argument(
    '--image_size', type=int, default=0, help='0: the dataset default.'
  )
  parser.add_argument('--data_dir', default=None, help='TFDS data dir.')
  parser.add_argument(
    '--folder_preprocessing',
    default='auto',
    help='Image folders: auto (from the image sizes), imagenet or cifar.',
  )
  parser.add_argument(
    '--num_batches', type=int, default=200, help='Batches timed.'
  )
  parser.add_argument(
    '--warmup', type=int, default=20, help='Batches before timing.'
  )
  args = parser.parse_args()
  config = base.get_config()
  config.dataset = args.dataset
  config.batch_size = args.batch_size
  config.image_size = args.image_size
  config.data_dir = args.data_dir
  config.folder_preprocessing = args.folder_preprocessing
  rate = measure_train_throughput(config, args.num_batches, args.warmup)
  print(f'{args.dataset} batch {args.batch_size}: {rate:.0f} images/s')


if __name__ == '__main__':
  main()
