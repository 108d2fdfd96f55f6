"""GUNN, SUNN and GUNN-NoRes on CIFAR-100 (paper Table 3, docs/paper.md).

The recipe and the argument `MODEL[,OPTION...]` are those of `cifar10.py`.

    python main.py --config=configs/cifar100.py:gunn15 --workdir=runs/c100

| experiment | suffix | paper error % | ours |
|---|---|---|---|
| GUNN-15 | `:gunn15` | 20.45 | not yet trained |
| GUNN-15-NoRes | `:gunn15_nores` | 21.15 | not yet trained |
| SUNN-15 | `:sunn15` | 23.75 | not yet trained |
| GUNN-24 | `:gunn24` | 16.69 | not yet trained |
| SUNN-24 | `:sunn24` | 19.60 | not yet trained |
| GUNN-24, 6 snapshots | `:gunn24,snapshot` | 15.61 | not yet trained |

Hardware and wall time: not yet measured.
"""

import ml_collections

from configs import cifar10


def get_config(arg: str = 'gunn15') -> ml_collections.ConfigDict:
  return cifar10.cifar_config('cifar100', arg)
