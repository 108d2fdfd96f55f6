"""What several test modules share: the command line in-process, mock TFDS
data with split sizes, and a generated image folder."""

import contextlib
import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

import main
from gunn_jax import checkpointing

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO_ROOT / 'configs' / 'tiny.py')
COLOURS = ('blue', 'green', 'red')
# Seconds a subprocess (or a notebook cell) may take before its test fails,
# naming the command. Generous: a test's verdict must not depend on how busy
# the machine is; a hang still ends long before CI's own limit.
TIMEOUT_S = 1800


def drop_config_override_flags() -> None:
  """Forgets the `config.KEY` flags of earlier `main.main` runs.

  `main.main` defines one absl flag per `--config.KEY` override it sees,
  and absl refuses to define a flag twice.
  """
  for name in list(flags.FLAGS):
    if name.startswith('config.'):
      delattr(flags.FLAGS, name)


def run_main(*argv) -> int:
  """Runs `main.py ARGV...` in this process; returns its exit status."""
  argv = ['main.py', *map(str, argv)]
  saved_argv, sys.argv = sys.argv, argv  # config_flags reads overrides here.
  drop_config_override_flags()
  try:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    main.main(['main.py'])
  except SystemExit as e:
    return e.code
  finally:
    sys.argv = saved_argv
  return 0


def xla_flags_with_devices(count: int) -> str:
  """This process's `XLA_FLAGS` (the test compiler options of
  `conftest.py`) with `count` host CPU devices, for a subprocess."""
  return ' '.join(
    [
      os.environ.get('XLA_FLAGS', ''),
      f'--xla_force_host_platform_device_count={count}',
    ]
  ).strip()


def run_python(args, **env) -> tuple[int, str]:
  """Runs Python with `args` in the repository (on CPU, `env` added);
  returns (exit status, stdout and stderr)."""
  result = subprocess.run(
    [sys.executable, *map(str, args)],
    cwd=REPO_ROOT,
    env={
      **os.environ,
      'JAX_PLATFORMS': 'cpu',
      'PYTHONPATH': str(REPO_ROOT),
      **env,
    },
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=TIMEOUT_S,
  )
  return result.returncode, result.stdout


@contextlib.contextmanager
def mock_tfds(data_dir, name: str, sizes: dict[str, int]):
  """TFDS's mock data for dataset `name`, with the given split sizes.

  The metadata (split sizes) is written to `data_dir`, which configs must
  use as `data_dir`; TFDS generates random examples of the features.
  """
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.info.set_splits(
    tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(name=split, shard_lengths=[size], num_bytes=0)
        for split, size in sizes.items()
      ]
    )
  )
  pathlib.Path(builder.data_dir).mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  with tfds.testing.mock_data(
    num_examples=max(sizes.values()),
    policy=tfds.testing.MockPolicy.USE_FILES,
    data_dir=str(data_dir),
  ):
    yield


def write_colour_folder(root, num_train: int = 8, num_val: int = 3) -> None:
  """ROOT/{train,val}/<colour>/*.png: noisy 12x10 images, one colour each.

  The class's channel (red, green or blue) dominates every image, so a
  tiny model can learn the classes in a few steps.
  """
  rng = np.random.default_rng(0)
  for split, count in (('train', num_train), ('val', num_val)):
    for label, name in enumerate(COLOURS):
      os.makedirs(os.path.join(root, split, name))
      for i in range(count):
        image = rng.integers(0, 90, (12, 10, 3))
        image[..., 2 - label] += 160
        Image.fromarray(image.astype(np.uint8)).save(
          os.path.join(root, split, name, f'{i}.png')
        )


def half_write(workdir, step):
  """What a host killed mid-save on an object store leaves: a step directory
  with some files and no commit marker."""
  path = checkpointing.checkpoint_dir(str(workdir)) / str(step) / 'default'
  path.mkdir(parents=True)
  (path / 'manifest.ocdbt').write_text('torn')


def write_cifar10_archive(directory, per_file: int = 4) -> str:
  """What TFDS extracts from CIFAR-10's download, with `per_file` random
  images in each of the 5 training files and the test file; returns the
  directory to hand to TFDS as the extracted archive."""
  rng = np.random.default_rng(0)
  batches = pathlib.Path(directory) / 'cifar-10-batches-bin'
  batches.mkdir(parents=True)
  names = 'airplane automobile bird cat deer dog frog horse ship truck'
  (batches / 'batches.meta.txt').write_text('\n'.join(names.split()) + '\n')
  for name in [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']:
    labels = rng.integers(0, 10, (per_file, 1), np.uint8)
    pixels = rng.integers(0, 256, (per_file, 3 * 32 * 32), np.uint8)
    (batches / name).write_bytes(np.concatenate([labels, pixels], 1).tobytes())
  return str(directory)


@contextlib.contextmanager
def fake_cifar10_download(archive: str, on_download=None):
  """TFDS's CIFAR-10 download answered with `archive` (from
  `write_cifar10_archive`), the download server taken as reachable;
  `on_download(url)` is called at each download."""
  from gunn_jax import downloads

  def download_and_extract(manager, url):
    if on_download is not None:
      on_download(url)
    return archive

  manager = tfds.download.DownloadManager
  saved = manager.download_and_extract, downloads._unreachable
  manager.download_and_extract = download_and_extract
  downloads._unreachable = lambda builder: None
  try:
    yield
  finally:
    manager.download_and_extract, downloads._unreachable = saved


def load_params(path) -> dict[str, np.ndarray]:
  """The arrays of an `.npz` file (a test program's parameter dump)."""
  with np.load(path) as f:
    return dict(f)


def assert_leaves_close(ours, theirs, keys, tolerance) -> None:
  """Per leaf, |difference| <= tolerance x max(|leaf|, 1% of the largest)."""
  largest = max(np.abs(theirs[key]).max() for key in keys)
  for key in keys:
    scale = max(np.abs(theirs[key]).max(), 1e-2 * largest)
    assert np.abs(ours[key] - theirs[key]).max() <= tolerance * scale, key


def init_variables(model, image_shape):
  """`model`'s variables for [1, *image_shape] inputs (key 0), initialised
  jitted: eagerly every primitive compiles on its own (twice as long for
  gunn_tiny)."""
  return jax.jit(functools.partial(model.init, train=False))(
    jax.random.key(0), jnp.zeros((1, *image_shape))
  )


def copy_to_bucket(source, target: str) -> None:
  """Copies the files under the local folder `source` to `target` (a
  `gs://` folder) through `tf.io.gfile`, as `gsutil cp -r` would: one
  object per file, no objects for folders."""
  import tensorflow as tf

  for path in sorted(pathlib.Path(source).rglob('*')):
    if path.is_file():
      name = path.relative_to(source).as_posix()
      tf.io.gfile.copy(str(path), f'{target}/{name}', overwrite=True)
