"""A prepared `imagenet2012` of generated JPEGs, for tests and benchmarks.

`write(data_dir, sizes, file_format)` writes what `tfds build imagenet2012`
would leave in `data_dir` (metadata and one shard per split) for
`file_format` 'array_record' (read by index) or 'tfrecord' (streamed), with
`sizes[split]` images each. The i-th image of a split has label i % 1000
(an example id below 1000) and smooth random content that compresses like a
photograph.
"""

import pathlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def _image(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
  """uint8 [h, w, 3]: a random colour gradient with mild noise."""
  h, w = shape
  ys, xs = np.mgrid[0:h, 0:w] / max(h, w)
  base = rng.uniform(0, 255, (3, 3))
  image = base[:, 0] + ys[..., None] * base[:, 1] + xs[..., None] * base[:, 2]
  image += rng.normal(0, 8, image.shape)
  return np.clip(image / 2, 0, 255).astype(np.uint8)


def write(
  data_dir,
  sizes: dict[str, int],
  file_format: str = 'array_record',
  shape: tuple[int, int] = (30, 40),
) -> None:
  """Writes the prepared dataset (see the module docstring)."""
  builder = tfds.builder(
    'imagenet2012', data_dir=str(data_dir), file_format=file_format
  )
  features = builder.info.features
  pathlib.Path(builder.data_dir).mkdir(parents=True)
  rng = np.random.default_rng(0)
  splits = []
  for split, size in sizes.items():
    path = f'{builder.data_dir}/imagenet2012-{split}.{file_format}'
    path += '-00000-of-00001'
    records = (
      features.serialize_example(
        {'image': _image(rng, shape), 'label': i % 1000, 'file_name': f'{i}'}
      )
      for i in range(size)
    )
    if file_format == 'array_record':
      from array_record.python.array_record_module import ArrayRecordWriter

      writer = ArrayRecordWriter(path, 'group_size:1')
    else:
      writer = tf.io.TFRecordWriter(path)
    for record in records:
      writer.write(record)
    writer.close()
    splits.append(
      tfds.core.SplitInfo(name=split, shard_lengths=[size], num_bytes=0)
    )
  builder.info.set_splits(tfds.core.SplitDict(splits))
  builder.info.write_to_directory(builder.data_dir)
