"""GUNN, SUNN and GUNN-NoRes on CIFAR-10 (paper Table 3, docs/paper.md).

Recipe (paper section 6.2): SGD with Nesterov momentum 0.9, learning rate
0.1, coupled weight decay 1e-4, batch 64, 300 epochs, learning rate x0.1 from
epoch 150 and x0.01 from epoch 225; augmentation: flip, pad-4 crop and the
authors' cyclic roll. BatchNorm statistics come from groups of 16 examples
(`bn_group_size=16`), as in the authors' runs, which split each batch of 64
over 4 GPUs; with 8 or more devices the per-device batch (8 or less) holds
no whole group: set `--config.bn_group_size` to a divisor of it, or 0.

The argument is `MODEL[,OPTION...]`: MODEL is a name in `gunn_jax.models`
(gunn15, gunn15_nores, sunn15, gunn24, sunn24, ...); options are `snapshot`
(the snapshot-ensemble cyclic cosine schedule, 6 cycles) and `smoke` (a few
small steps to check that everything runs).

    python main.py --config=configs/cifar10.py:gunn15 --workdir=runs/c10_gunn15

| experiment | suffix | paper error % | ours |
|---|---|---|---|
| GUNN-15 | `:gunn15` | 4.15 | not yet trained |
| GUNN-15-NoRes | `:gunn15_nores` | 4.45 | not yet trained |
| SUNN-15 | `:sunn15` | 5.64 | not yet trained |
| GUNN-24 | `:gunn24` | 3.21 | not yet trained |
| SUNN-24 | `:sunn24` | 3.88 | not yet trained |
| GUNN-24, 6 snapshots | `:gunn24,snapshot` | 3.02 | not yet trained |

Hardware and wall time: not yet measured (one CPU step of GUNN-15 at batch 64
takes seconds (docs/benchmarks.md), so these runs need an accelerator).
"""

import ml_collections

from configs import base

_OPTIONS = ('snapshot', 'smoke')


def cifar_config(dataset: str, arg: str) -> ml_collections.ConfigDict:
  """Returns the paper's CIFAR recipe for `dataset` and `MODEL[,OPTION...]`."""
  model, options = base.parse_argument(arg, _OPTIONS)
  config = base.get_config()
  config.model = model
  config.dataset = dataset
  config.batch_size = 64
  config.bn_group_size = 16  # 64 examples over the authors' 4 GPUs.
  config.num_epochs = 300.0
  config.lr_boundaries_epochs = (150.0, 225.0)
  config.lr_scales = (0.1, 0.01)
  config.checkpoint_every_steps = 5000
  config.log_every_steps = 100
  if 'snapshot' in options:
    # Huang et al. (2017): M = 6 cycles over the same 300 epochs.
    config.lr_schedule = 'snapshot'
    config.snapshot_cycles = 6
  if 'smoke' in options:
    apply_smoke(config)
  return config


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks `config` in place to a few small steps (any experiment)."""
  config.batch_size = 8
  config.bn_group_size = 0  # Groups of 16 do not fit a batch of 8.
  config.eval_batch_size = 8
  config.num_train_steps = 2
  config.max_eval_examples = 16
  config.shuffle_buffer_size = 64
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.profile_steps = 0


def get_config(arg: str = 'gunn15') -> ml_collections.ConfigDict:
  return cifar_config('cifar10', arg)
