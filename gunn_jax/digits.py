"""scikit-learn's handwritten digits and their fixed train/test split.

1,797 8x8 grey digits, shipped with scikit-learn, so that the quickstart,
the notebook and the tests run offline. The k-th digit of each class (in
scikit-learn's order) is a test digit iff k % 5 == 4: 1,442 training and
355 test digits. Imports no TensorFlow (`benchmarks/accelerator.py` uses it
on hosts without it).
"""

import numpy as np

TEST_EVERY = 5  # One digit in five of each class is a test digit.


def load_raw() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns (images uint8 [1797, 8, 8, 1] on 0..255, labels int32 [1797],
  a boolean test mask [1797])."""
  from sklearn import datasets  # Imported lazily: only digits need it.

  digits = datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  rank = np.zeros_like(labels)
  for label in np.unique(labels):
    where = np.flatnonzero(labels == label)
    rank[where] = np.arange(len(where))
  return images, labels, rank % TEST_EVERY == TEST_EVERY - 1
