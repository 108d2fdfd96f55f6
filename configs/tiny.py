"""The smallest complete run, for tests and smoke checks (seconds on a CPU).

gunn_tiny on 8x8 digits, a few steps with evaluations and checkpoints:

    python main.py --config=configs/tiny.py --workdir=/tmp/tiny
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model = 'gunn_tiny'
  config.dataset = 'digits'
  config.image_size = 8
  config.batch_size = 16
  config.eval_batch_size = 64
  config.num_train_steps = 6
  config.learning_rate = 0.05
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 2
  config.prefetch_batches = 1
  config.profile_steps = 0
  return config
