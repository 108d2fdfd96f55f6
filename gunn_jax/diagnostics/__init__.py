"""Singularity diagnostics: do a layer's channels collapse? (paper section 4)

The paper argues (section 4, after Orhan & Pitkow, "Skip connections
eliminate singularities", ICLR 2018) that ordering the channels of a layer
breaks the symmetry between them, so that they cannot collapse into each
other, and that residual updates (eq. 5) keep the channels of one segment
apart. Orhan & Pitkow name three singularities of a network's loss
landscape; this package measures each on a trained model. For one layer, let
a_c(n) be channel c of the layer's output at sample n (an image and a
position, so n runs over images x height x width), C the channel covariance
and r_cd = C_cd / sqrt(C_cc C_dd) the Pearson correlation of channels c, d.

- **Overlap** of nodes (two channels compute the same function): |r_cd| over
  the pairs of channels of nonzero variance. `mean_abs_r`, and the fractions
  of pairs with |r| > 0.9 and |r| > 0.99, are reported separately for pairs
  within one segment (the channels one unit writes) and pairs across
  segments. Transitions, which have no segments, use the segments of the
  GUNN layer they feed (a comparison of the layer's input and output);
  the final transition has none (every pair is across).
- **Elimination** of nodes (a channel that is always off): a channel is
  eliminated when it is zero (|a| <= 1e-6) on at least 99% of the samples or
  its variance is at most 1e-8 times the layer's mean variance. A unit is
  switched off when its output's BatchNorm scales are near zero: with
  BatchNorm after the last convolution, the size of a channel's update is set
  by |gamma| alone (the kernel's norm is divided out), so a channel's update
  scale is sqrt(sum of gamma^2 over the BatchNorms that end in it: the
  bottlenecks' last and the shortcut's), and it counts as off below 1e-2
  times the layer's largest.
- **Linear dependence** of nodes: the eigenvalues l_1 >= ... >= l_N of C.
  The participation ratio PR = (sum l)^2 / sum l^2 is the effective
  dimensionality (N for equal eigenvalues, 1 for one direction);
  `participation_ratio_fraction` is PR / N and `small_eigenvalue_fraction`
  the fraction of eigenvalues below 1e-3 l_1.

A fourth view is the degeneracy of the loss landscape itself, which each of
these singularities causes: `hessian_spectrum` estimates the density of the
Hessian's eigenvalues with stochastic Lanczos quadrature (Ghorbani, Krishnan
and Xiao, ICML 2019) from Hessian-vector products.

Activations are those of the network in evaluation mode (running BatchNorm
statistics), on evaluation images. What the paper shows of this, and what
it leaves unmeasured: `docs/paper.md`, "Breaking the symmetry".

Its top level diagnoses a whole network (`diagnose`) and decides how many
images that needs (`minimum_images`, `require_enough_images`). The work is
done by `moments` (layers and their activation moments, on device),
`statistics` (the three measurements of one layer, NumPy), `hessian` (the
Hessian's spectrum) and `plots` (the figure; the only user of matplotlib).
"""

import functools
from typing import Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gunn_jax.diagnostics.hessian import hessian_spectrum
from gunn_jax.diagnostics.moments import activation_moments, layers_of
from gunn_jax.diagnostics.plots import plot
from gunn_jax.diagnostics.statistics import diagnose_layer, training_scalars
from gunn_jax.errors import UserError

__all__ = [
  'diagnose',
  'hessian_spectrum',
  'minimum_images',
  'plot',
  'require_enough_images',
  'training_scalars',
]

MIN_SAMPLES_PER_CHANNEL = 4


def _images_needed(layer_sizes: Iterable[tuple[int, int]]) -> int:
  """Images for `MIN_SAMPLES_PER_CHANNEL` samples per channel in every layer.

  A layer of N channels and h x w positions gives h * w samples per image;
  its N x N covariance needs several times N samples to be estimated.

  Args:
    layer_sizes: (channels N, positions h * w) of each layer.
  """
  return max(
    [1]
    + [
      -(-MIN_SAMPLES_PER_CHANNEL * channels // positions)
      for channels, positions in layer_sizes
    ]
  )


def _raise_if_too_few(num_images: int, needed: int, hint: str) -> None:
  if num_images < needed:
    raise UserError(
      f"{num_images} images are too few to estimate the layers' channel "
      f'covariances; use at least {needed} ({hint}).'
    )


def minimum_images(
  model: nn.Module, variables: dict, image_shape: Sequence[int]
) -> int:
  """Images needed for `MIN_SAMPLES_PER_CHANNEL` samples per channel.

  Args:
    model: a `models.GUNNNet`.
    variables: its variables (only their shapes are used).
    image_shape: [H, W, C] of one input image.
  """
  _, state = jax.eval_shape(
    functools.partial(model.apply, train=False, mutable=['intermediates']),
    variables,
    jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
  )
  outputs = [
    state['intermediates'][f'{layer.name}_output'][0].shape
    for layer in layers_of(model)
  ]
  return _images_needed(
    (channels, height * width) for _, height, width, channels in outputs
  )


def require_enough_images(
  model: nn.Module,
  variables: dict,
  image_shape: Sequence[int],
  num_images: int,
  hint: str,
) -> None:
  """Refuses fewer images than `minimum_images` before any are read.

  Args:
    model: a `models.GUNNNet`.
    variables: its variables (only their shapes are used).
    image_shape: [H, W, C] of one input image.
    num_images: the images that will be diagnosed.
    hint: the flag or config key that sets them, named in the error, e.g.
      '--num_images' or 'config.diagnostics_num_images'.

  Raises:
    UserError: if `num_images` is below `minimum_images`.
  """
  _raise_if_too_few(
    num_images, minimum_images(model, variables, image_shape), hint
  )


def diagnose(
  model: nn.Module,
  variables: dict,
  batches: Iterable[dict],
  num_images: int,
  mesh: jax.sharding.Mesh | None = None,
) -> list[dict]:
  """Diagnoses every GUNN layer and transition of a network.

  Args:
    model: a `models.GUNNNet`.
    variables: {'params', 'batch_stats'}.
    batches: evaluation batches ({'images', 'mask'}; see
      `moments.activation_moments`).
    num_images: how many images to use.
    mesh: the mesh of global-array batches, if they are.

  Returns:
    One dict per layer (`statistics.diagnose_layer`, and 'images': the
    images used, crops counted as images), in network order.

  Raises:
    UserError: without GUNN layers, or with fewer images than
      `minimum_images` (asked for, or in the batches).
  """
  layers = layers_of(model)
  moments = activation_moments(
    model, variables, batches, num_images, layers, mesh
  )
  num_images = moments['num_images']
  # From the counts: the batches' image shape is not known here, and the
  # batches may run out before `num_images`.
  _raise_if_too_few(
    num_images,
    _images_needed(
      (
        moments[layer.name]['covariance'].shape[0],
        int(moments[layer.name]['count']) // num_images,
      )
      for layer in layers
    ),
    '--num_images',
  )
  return [
    {
      **diagnose_layer(moments[layer.name], layer, variables['params']),
      'images': num_images,
    }
    for layer in layers
  ]
