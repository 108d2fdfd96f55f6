"""GUNN-18, SUNN-18 and Wide-GUNN-18 on ImageNet (paper Table 4).

Recipe (paper section 6.2, docs/paper.md): SGD with Nesterov momentum 0.9,
learning rate 0.1, coupled weight decay 1e-4, batch 256, the authors' 120
epochs with learning rates 0.1 / 0.01 / 0.001 / 1e-5 over epochs 1-30 /
31-60 / 61-90 / 91-120; Inception-style crops, colour jitter and PCA
lighting; evaluation on the centre 224 crop of the 256-resized image.
BatchNorm statistics come from groups of 32 examples (`bn_group_size=32`):
the paper's results were trained on 8 GPUs (section 6.2), each normalising
32 of the 256 (the README's example command uses 4 GPUs, i.e. 64).

The argument is `MODEL[,OPTION...]`; options are `densenet90` (the 90-epoch
DenseNet schedule the paper cites, /10 at epochs 30 and 60) and `smoke`.
ImageNet must be prepared for TFDS by hand (`--config.data_dir=DIR`).

    python main.py --config=configs/imagenet.py:gunn18 --workdir=runs/in_gunn18

| experiment | command suffix | paper top-1 / top-5 error % | ours |
|---|---|---|---|
| GUNN-18 | `:gunn18` | 21.65 / 5.87 | not yet trained |
| SUNN-18 | `:sunn18` | 26.16 / 8.48 | not yet trained |
| Wide-GUNN-18 | `:wide_gunn18` | 20.59 / 5.52 | not yet trained |

Hardware and wall time: not yet measured (the authors used 8 GPUs).
"""

import ml_collections

from configs import base, cifar10

_OPTIONS = ('densenet90', 'smoke')


def get_config(arg: str = 'gunn18') -> ml_collections.ConfigDict:
  model, options = base.parse_argument(arg, _OPTIONS)
  config = base.get_config()
  config.model = model
  config.dataset = 'imagenet2012'
  config.batch_size = 256
  config.bn_group_size = 32  # 256 examples over the paper's 8 GPUs.
  config.eval_batch_size = 256
  config.num_epochs = 120.0
  config.lr_boundaries_epochs = (30.0, 60.0, 90.0)
  config.lr_scales = (0.1, 0.01, 1e-4)
  config.cache = False
  config.checkpoint_every_steps = 2000
  config.log_every_steps = 100
  if 'densenet90' in options:
    config.num_epochs = 90.0
    config.lr_boundaries_epochs = (30.0, 60.0)
    config.lr_scales = (0.1, 0.01)
  if 'smoke' in options:
    cifar10.apply_smoke(config)
  return config
