"""Model FLOPs of a network and its model FLOPs utilisation (MFU).

`forward_flops_per_image` counts the multiply-adds of every convolution and
matrix product of a model's evaluation-mode forward pass, 2 FLOPs each, by
walking the traced program (jaxpr): whatever the layers are, their
`conv_general_dilated` and `dot_general` operations are what is counted. A
`lax.scan` body counts once per iteration, so each of a GUNN layer's P units
(section 3.2) counts once, unlike XLA's cost analysis, which counts a loop
body once. Not counted: BatchNorm, activations, pooling, additions and other
elementwise or reduction work (a few FLOPs per activation against tens to
thousands per activation for the convolutions).

Convolutions count the multiply-adds where the kernel overlaps the image,
as XLA's own cost analysis does: taps on the zero padding are not counted.
For a 3x3 'same' convolution on 8x8 that is (22/24)^2 = 84% of the
kernel-times-positions count some other tools report.

Model FLOPs of a training step are 3 x forward x global batch (the forward
pass, and twice its work for the gradients of inputs and weights). Algorithm
1's recomputation of each unit in the backward pass (section 3.4) is extra
work the hardware does, not model FLOPs, so it lowers the MFU.

`python -m gunn_jax.flops` prints the count of every registered network.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp

from gunn_jax import models

# Dense peak TFLOP/s per chip: (device_kind substring, {dtype: peak}), the
# first match wins. float32 is what XLA runs for float32 matmuls and
# convolutions at JAX's default precision: TF32 tensor cores on A100, H100
# and H200 (with `jax_default_matmul_precision='highest'` the true float32
# peaks are 19.5 and 67), one bfloat16 pass on TPUs.
PEAK_TFLOPS = (
  ('H200 NVL', {'bfloat16': 835.0, 'float32': 418.0}),
  ('H200', {'bfloat16': 989.0, 'float32': 495.0}),
  ('H100 NVL', {'bfloat16': 835.0, 'float32': 418.0}),
  ('H100 PCIe', {'bfloat16': 756.0, 'float32': 378.0}),
  ('H100', {'bfloat16': 989.0, 'float32': 495.0}),
  ('A100', {'bfloat16': 312.0, 'float32': 156.0}),
  ('TPU v4', {'bfloat16': 275.0, 'float32': 275.0}),
  ('TPU v5 lite', {'bfloat16': 197.0, 'float32': 197.0}),
  ('TPU v5e', {'bfloat16': 197.0, 'float32': 197.0}),
  ('TPU v5', {'bfloat16': 459.0, 'float32': 459.0}),
  ('TPU v6 lite', {'bfloat16': 918.0, 'float32': 918.0}),
  ('TPU v6e', {'bfloat16': 918.0, 'float32': 918.0}),
)


def _valid_taps(size: int, kernel: int, out: int, stride, pad_low, dilations):
  """(output position, kernel tap) pairs of one axis that read the input."""
  lhs_dilation, rhs_dilation = dilations
  count = 0
  for position in range(out):
    for tap in range(kernel):
      index = position * stride - pad_low + tap * rhs_dilation
      if index % lhs_dilation == 0 and 0 <= index // lhs_dilation < size:
        count += 1
  return count


def _conv_flops(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  out = eqn.outvars[0].aval.shape
  params = eqn.params
  numbers = params['dimension_numbers']
  lhs_spec, rhs_spec, out_spec = (
    numbers.lhs_spec,
    numbers.rhs_spec,
    numbers.out_spec,
  )
  taps = 1
  for axis in range(len(lhs_spec) - 2):
    taps *= _valid_taps(
      lhs[lhs_spec[axis + 2]],
      rhs[rhs_spec[axis + 2]],
      out[out_spec[axis + 2]],
      params['window_strides'][axis],
      params['padding'][axis][0],
      (params['lhs_dilation'][axis], params['rhs_dilation'][axis]),
    )
  # Each output feature reads the kernel's input features (C_in / groups).
  return 2 * out[out_spec[0]] * out[out_spec[1]] * rhs[rhs_spec[1]] * taps


def _dot_flops(eqn) -> int:
  lhs = eqn.invars[0].aval.shape
  (contracting, _), _ = eqn.params['dimension_numbers']
  out = eqn.outvars[0].aval.shape
  return 2 * math.prod(out) * math.prod(lhs[d] for d in contracting)


def _subjaxprs(params):
  """The jaxprs among an equation's parameters (scan bodies, calls, ...)."""
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, 'eqns'):
        yield item
      elif hasattr(getattr(item, 'jaxpr', None), 'eqns'):
        yield item.jaxpr


def jaxpr_flops(jaxpr) -> int:
  """FLOPs of the convolutions and matrix products of a (closed) jaxpr.

  Scan bodies count `length` times, of conditionals the costliest branch.

  Raises:
    ValueError: for a while loop, whose trip count is not in the program.
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'while':
      raise ValueError('Cannot count FLOPs in a while loop.')
    else:
      inner = [jaxpr_flops(sub) for sub in _subjaxprs(eqn.params)]
      if name == 'cond':
        total += max(inner, default=0)
      else:
        total += sum(inner) * eqn.params.get('length', 1)
  return total


def forward_flops_per_image(model, image_shape: tuple[int, ...]) -> int:
  """Model FLOPs of one image's evaluation-mode forward pass.

  Traced only (`jax.eval_shape`, `jax.make_jaxpr`): nothing is compiled or
  computed, so it costs a second even for the ImageNet networks.

  Args:
    model: a flax module called as `model.apply(variables, images,
      train=False)`, e.g. from `models.create_model`.
    image_shape: [H, W, C] of one image.

  Returns:
    The count for a batch of one image.
  """
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False), images
  )
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
    variables, images
  )
  return jaxpr_flops(jaxpr)


def peak_flops_per_s(device_kind: str, dtype: str) -> float | None:
  """Dense peak FLOP/s of one chip for 'float32' or 'bfloat16' work.

  None for CPUs and for chips not in `PEAK_TFLOPS`.
  """
  for pattern, peaks in PEAK_TFLOPS:
    if pattern.lower() in device_kind.lower():
      return peaks[dtype] * 1e12
  return None


def efficiency(
  forward_per_image: int,
  global_batch: int,
  step_s: float,
  device_kind: str,
  dtype: str,
  num_devices: int,
) -> dict[str, Any]:
  """The FLOP fields of a benchmark record.

  Args:
    forward_per_image: `forward_flops_per_image` of the model.
    global_batch: images per training step over all devices.
    step_s: seconds per training step.
    device_kind: `jax.devices()[0].device_kind`.
    dtype: 'float32' or 'bfloat16' (the model's activations).
    num_devices: devices the step runs on.

  Returns:
    `forward_flops_per_image`, `model_flops_per_step` (3 x forward x
    batch), `achieved_tflops` (model FLOPs per second / 1e12) and `mfu`
    (achieved / the devices' dense peak; None without a known peak).
  """
  model_flops = 3 * forward_per_image * global_batch
  achieved = model_flops / step_s
  peak = peak_flops_per_s(device_kind, dtype)
  return {
    'forward_flops_per_image': forward_per_image,
    'model_flops_per_step': model_flops,
    'achieved_tflops': achieved / 1e12,
    'mfu': None if peak is None else achieved / (peak * num_devices),
  }


def registry_table(names=tuple(models.MODELS)) -> str:
  """A markdown table: forward GFLOPs per image of registered networks.

  At the paper's input sizes: 224 for the ImageNet networks, 16 for the
  digits networks (`gunn_mini`, ...), 8 for the test ones, 32 otherwise.
  """
  lines = [
    '| network | input | classes | parameters | forward GFLOPs per image |',
    '|---|---|---|---|---|',
  ]
  for name in names:
    imagenet = models.MODELS[name].get('imagenet_stem', False)
    size = (
      224
      if imagenet
      else {'mini': 16, 'tiny': 8}.get(
        name.split('_')[1] if '_' in name else '', 32
      )
    )
    num_classes = 1000 if imagenet else 10
    model = models.create_model(name, num_classes)
    shape = (size, size, 3)
    params = jax.eval_shape(
      lambda x, model=model: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1, *shape), jnp.float32),
    )['params']
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    lines.append(
      f'| {name} | {size}x{size} | {num_classes} | {count:,} '
      f'| {forward_flops_per_image(model, shape) / 1e9:.4g} |'
    )
  return '\n'.join(lines)


if __name__ == '__main__':
  print(registry_table())
