"""Training input throughput (images/s) of `create_train_iterator`.

  python -m benchmarks.input_pipeline --dataset digits --batch_size 64

prints the images/s of tf.data (`input_pipeline.py`) and, for in-memory
datasets, of the batches made on the default JAX device from the training
set kept there (`device_input.py`: host draws, transfer, gather and
augmentation, until the last batch is ready).

CIFAR-shaped throughput without CIFAR on disk: `--dataset digits
--image_size 32` runs the same in-memory path as CIFAR (gather, batched
normalise/flip/pad-crop/roll on 32x32x3 images); only the source differs.
Any config dataset works, e.g. `--dataset cifar10 --data_dir DIR` or
`--dataset folder:/path/to/root`.

ImageNet read by index (ArrayRecord) against streamed (TFRecord), on the
same generated JPEGs (`benchmarks/fake_imagenet.py`):

  python -m benchmarks.input_pipeline --imagenet_compare 4096
  python -m benchmarks.input_pipeline --imagenet_compare 65536 \
      --imagenet_shape 48x64

prints, per format, decoded and augmented 224x224 images/s (and per core),
and the seconds to the first batch of a run started at step 0 and of one
resumed late (90%) in the first epoch. The streamed path fills its shuffle
buffer (`config.shuffle_buffer_size`, 16,384) before its first batch, so
only an epoch longer than that shows what a resume costs it: the second
command, with small images.
"""

import argparse
import itertools
import os
import tempfile
import time

import jax

from benchmarks import fake_imagenet
from configs import base
from gunn_jax import (
  augmentation,
  datasets,
  device_input,
  input_pipeline,
  sharding,
)


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


def measure_device_throughput(config, num_batches=200, warmup=20) -> float:
  """Returns training images per second made on the devices.

  The training set sits on the devices (`device_input.put_on_devices`);
  each batch is the host's draws, their transfer and the jitted gather and
  augmentation (`device_input.make_batch`), timed until the last is ready.
  """
  info = datasets.get_dataset_info(config)
  split = datasets.load_split(info, config, train=True)
  mesh = sharding.create_mesh()
  data = device_input.put_on_devices(split.data, split.labels, mesh)
  pad = augmentation.crop_padding(info.image_size)
  make = jax.jit(
    lambda batch: device_input.make_batch(
      data, batch['draws'], mean=info.mean, std=info.std, pad=pad
    )
  )
  batches = sharding.global_batches(
    device_input.host_batches(info, config, 0, 0, 1),
    mesh,
    config.prefetch_batches,
  )
  for batch in itertools.islice(batches, warmup):
    jax.block_until_ready(make(batch))
  start = time.perf_counter()
  for batch in itertools.islice(batches, num_batches):
    out = make(batch)
  jax.block_until_ready(out)
  elapsed = time.perf_counter() - start
  return num_batches * config.batch_size / elapsed


def seconds_to_first_batch(config, start_step: int) -> float:
  """Seconds from creating the training iterator at `start_step` to its
  first batch."""
  start = time.perf_counter()
  next(input_pipeline.create_train_iterator(config, start_step=start_step))
  return time.perf_counter() - start


def compare_imagenet_formats(
  num_images: int, batch_size: int, shape=(300, 400), num_batches: int = 24
) -> list[dict]:
  """Random access against streaming on the same `num_images` JPEGs of
  `shape`; one row per format."""
  rows = []
  with tempfile.TemporaryDirectory() as root:
    for file_format in ('array_record', 'tfrecord'):
      data_dir = os.path.join(root, file_format)
      sizes = {'train': num_images, 'validation': batch_size}
      fake_imagenet.write(data_dir, sizes, file_format, shape)
      config = base.get_config()
      config.update(
        dataset='imagenet2012',
        data_dir=data_dir,
        download_data=False,
        batch_size=batch_size,
        image_size=224,
      )
      rate = measure_train_throughput(config, num_batches, warmup=4)
      late_step = int(0.9 * num_images) // batch_size
      rows.append(
        {
          'format': file_format,
          'images/s': rate,
          'images/s per core': rate / os.cpu_count(),
          'first batch at step 0 (s)': seconds_to_first_batch(config, 0),
          f'first batch at step {late_step} (s)': seconds_to_first_batch(
            config, late_step
          ),
        }
      )
  return rows


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
  parser.add_argument(
    '--imagenet_compare',
    type=int,
    default=0,
    help='Compare ImageNet in ArrayRecord and TFRecord on this many images.',
  )
  parser.add_argument(
    '--imagenet_shape',
    default='300x400',
    help='HxW of the generated images of --imagenet_compare.',
  )
  args = parser.parse_args()
  if args.imagenet_compare:
    shape = tuple(int(side) for side in args.imagenet_shape.split('x'))
    rows = compare_imagenet_formats(
      args.imagenet_compare, args.batch_size, shape
    )
    for row in rows:
      values = [
        f'{key} {value:.3g}' for key, value in row.items() if key != 'format'
      ]
      print(row['format'] + ': ' + ', '.join(values))
    return
  config = base.get_config()
  config.dataset = args.dataset
  config.batch_size = args.batch_size
  config.image_size = args.image_size
  config.data_dir = args.data_dir
  config.folder_preprocessing = args.folder_preprocessing
  rate = measure_train_throughput(config, args.num_batches, args.warmup)
  print(f'{args.dataset} batch {args.batch_size}: tf.data {rate:.0f} images/s')
  if device_input.eligible(datasets.get_dataset_info(config), config):
    rate = measure_device_throughput(config, args.num_batches, args.warmup)
    print(
      f'{args.dataset} batch {args.batch_size}: on {jax.default_backend()} '
      f'devices {rate:.0f} images/s'
    )


if __name__ == '__main__':
  main()
