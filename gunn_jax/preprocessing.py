"""Per-example image preprocessing (paper section 6.1, `docs/paper.md`), in TF.

The augmentation of an example is a pure function of `(seed, step, slot)`,
its slot being its position in the global batch. CIFAR-style augmentation is
vectorised over a batch; its parameters come from
`augmentation.cifar_train_params` (NumPy, shared with the on-device path).
ImageNet-style augmentation runs per example (images differ in size), every
random choice a stateless TF op keyed by `example_rng` (int64 [2]).

CIFAR-style (CIFAR-10/100, digits, small image folders), on the 0..255 scale:
normalise, mirror, zero-pad after normalising and crop, then the authors'
cyclic roll. ImageNet-style (0..1 scale), after fb.resnet.torch: Inception
random-sized crop, colour jitter, PCA lighting, normalise, mirror; evaluation
resizes the shorter side and takes the centre crop (or ten crops).
"""

import tensorflow as tf

from gunn_jax import augmentation

# Per-channel statistics on the 0..255 scale (the authors' dataset files).
CIFAR_STATS = {
  'cifar10': ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
  'cifar100': ((129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
}
# ImageNet statistics on the 0..1 scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PCA lighting noise: eigenvalues and eigenvectors (one per column).
LIGHTING_EIGVAL = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGVEC = (
  (-0.5675, 0.7192, 0.4009),
  (-0.5808, -0.0045, -0.8140),
  (-0.5836, -0.6948, 0.4203),
)
# fb.resnet.torch: evaluation resizes the shorter side to 256 for 224 crops.
_EVAL_RESIZE_RATIO = 256 / 224
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def example_rng(seed: int, step, slot) -> tf.Tensor:
  """Returns the augmentation key of the example at `slot` of global `step`."""
  fold_in = tf.random.experimental.stateless_fold_in
  rng = fold_in(tf.constant([seed, 0], tf.int64), tf.cast(step, tf.int64))
  return fold_in(rng, tf.cast(slot, tf.int64))


def _split(rng, num):
  return tf.unstack(tf.random.experimental.stateless_split(rng, num))


def resize_square_uint8(images, size: int) -> tf.Tensor:
  """Resizes uint8 [..., h, w, 1 or 3] images to RGB [..., size, size, 3].

  Bilinear with antialiasing, rounded back to uint8; grey images are repeated
  over three channels. Used once per example by CIFAR-style datasets whose
  images are not already `size` x `size`.
  """
  images = tf.convert_to_tensor(images)
  if images.shape[-1] == 1:
    images = tf.repeat(images, 3, axis=-1)
  images = tf.image.resize(images, (size, size), 'bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)


def normalize(image, mean, std) -> tf.Tensor:
  """Returns `(image - mean) / std` per channel as float32.

  Computed as `(image - mean) * augmentation.reciprocal(std)`, the bits of
  XLA's version (`augmentation.normalize`).
  """
  image = tf.cast(image, tf.float32)
  mean = tf.constant(mean, tf.float32)
  scale = tf.constant(augmentation.reciprocal(std))
  if image.shape[-3:].is_fully_defined():
    # Broadcasting over whole images is several times faster on CPU than
    # broadcasting a 3-vector over every pixel.
    mean = tf.broadcast_to(mean, image.shape[-3:])
    scale = tf.broadcast_to(scale, image.shape[-3:])
  return (image - mean) * scale


def random_flip(image, rng) -> tf.Tensor:
  """Mirrors [H, W, C] `image` left-right with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, rng)


def flip_crop_roll(images, params, pad: int) -> tf.Tensor:
  """Mirror, zero-pad and crop, then cyclic roll of [b, H, W, C] images.

  One gather per axis, at `augmentation.source_rows`.

  Args:
    images: [b, H, W, C], already normalised (the padding is zeros).
    params: `augmentation.cifar_train_params` for these b examples.
    pad: zero padding on each side before cropping.

  Returns:
    [b, H, W, C] augmented images.
  """
  height, width = images.shape[1], images.shape[2]
  padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
  rows, cols = augmentation.source_rows(params, height, width, pad, tf.range)
  out = tf.gather(padded, rows, axis=1, batch_dims=1)
  return tf.gather(out, cols, axis=2, batch_dims=1)


def cifar_train(images, params, *, mean, std, pad) -> tf.Tensor:
  """CIFAR-style training augmentation of uint8 [b, H, W, C] images.

  In the authors' order: normalise, mirror (p=1/2), zero-pad (after
  normalising) and random crop, then the authors' roll (its shifts are 0 in
  `params` when off). `augmentation.augment` is the same in JAX.

  Args:
    images: uint8 [b, H, W, C] at the model's input size.
    params: `augmentation.cifar_train_params` of these b examples.
    mean: per-channel mean on the 0..255 scale.
    std: per-channel standard deviation on the 0..255 scale.
    pad: zero padding before the random crop.

  Returns:
    float32 [b, H, W, C].
  """
  return flip_crop_roll(normalize(images, mean, std), params, pad)


def _resize(image, height, width):
  # fb.resnet.torch scales with bicubic interpolation and no antialiasing.
  return tf.image.resize(image, tf.stack([height, width]), 'bicubic')


def _resize_shorter(image, shorter: int):
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = shorter / tf.reduce_min(shape)
  new_shape = tf.cast(tf.round(shape * scale), tf.int32)
  return _resize(image, new_shape[0], new_shape[1])


def _centre_crop(image, size: int):
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  top, left = (height - size) // 2, (width - size) // 2
  return tf.image.crop_to_bounding_box(image, top, left, size, size)


def random_sized_crop(image, rng, size: int) -> tf.Tensor:
  """Inception crop: 8%..100% of the area, aspect 3/4..4/3, to size x size.

  Falls back to fb.resnet.torch's scale-and-centre-crop when no box is found
  in 10 attempts (the sampler then returns the whole image).

  Args:
    image: uint8 [h, w, 3].
    rng: int64 [2] stateless key.
    size: output side.

  Returns:
    float32 [size, size, 3] on the 0..1 scale.
  """
  image = tf.cast(image, tf.float32) / 255.0
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.shape(image),
    bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
    seed=rng,
    min_object_covered=0.0,
    aspect_ratio_range=(3 / 4, 4 / 3),
    area_range=(0.08, 1.0),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  whole = tf.reduce_all(crop_size[:2] == tf.shape(image)[:2])
  crop = tf.slice(image, begin, crop_size)
  image = tf.cond(
    whole,
    lambda: _centre_crop(_resize_shorter(image, size), size),
    lambda: _resize(crop, size, size),
  )
  return tf.ensure_shape(image, [size, size, 3])


def _blend(image, other, alpha):
  return image * alpha + other * (1.0 - alpha)


def _grayscale(image):
  return tf.tensordot(image, tf.constant(_GRAY_WEIGHTS), 1)[..., None]


def color_jitter(image, rng, strength: float = 0.4) -> tf.Tensor:
  """Brightness, contrast and saturation jitter in a random order.

  As fb.resnet.torch: each blends the image with black, its mean grey level or
  its greyscale version by a factor drawn from 1 +- `strength`.

  Args:
    image: float32 [H, W, 3] on the 0..1 scale.
    rng: int64 [2] stateless key.
    strength: half-width of the blend factors' range.

  Returns:
    The jittered image (not clipped, as in the reference).
  """
  alpha_rng, order_rng = _split(rng, 2)
  alphas = 1.0 + tf.random.stateless_uniform(
    [3], alpha_rng, -strength, strength
  )
  order = tf.random.experimental.stateless_shuffle(tf.range(3), order_rng)
  for i in range(3):
    image = tf.switch_case(
      order[i],
      [
        lambda img=image: _blend(img, 0.0, alphas[0]),
        lambda img=image: _blend(
          img, tf.reduce_mean(_grayscale(img)), alphas[1]
        ),
        lambda img=image: _blend(img, _grayscale(img), alphas[2]),
      ],
    )
  return image


def lighting(image, rng, std: float = 0.1) -> tf.Tensor:
  """AlexNet PCA lighting noise: adds eigvec @ (alpha * eigval) per channel."""
  alpha = tf.random.stateless_normal([3], rng, stddev=std)
  eigvec = tf.constant(LIGHTING_EIGVEC)
  rgb = tf.linalg.matvec(eigvec, alpha * tf.constant(LIGHTING_EIGVAL))
  return image + rgb


def imagenet_train(image, rng, *, size: int) -> tf.Tensor:
  """ImageNet-style training preprocessing of a uint8 [h, w, 3] image."""
  crop_rng, jitter_rng, light_rng, flip_rng = _split(rng, 4)
  image = random_sized_crop(image, crop_rng, size)
  image = color_jitter(image, jitter_rng)
  image = lighting(image, light_rng)
  image = normalize(image, IMAGENET_MEAN, IMAGENET_STD)
  return random_flip(image, flip_rng)


def imagenet_eval(image, *, size: int, ten_crop: bool) -> tf.Tensor:
  """Resizes the shorter side to size * 256 / 224 and takes size crops.

  Args:
    image: uint8 [h, w, 3].
    size: output side (224 gives the reference's 256 -> 224).
    ten_crop: if true, return the centre, top-left, top-right, bottom-left and
      bottom-right crops followed by their mirror images.

  Returns:
    float32 [size, size, 3], or [10, size, size, 3] with `ten_crop`.
  """
  image = tf.cast(image, tf.float32) / 255.0
  image = _resize_shorter(image, round(size * _EVAL_RESIZE_RATIO))
  image = normalize(image, IMAGENET_MEAN, IMAGENET_STD)
  if not ten_crop:
    return tf.ensure_shape(_centre_crop(image, size), [size, size, 3])
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  corners = [(0, 0), (0, width - size), (height - size, 0)]
  corners.append((height - size, width - size))
  crops = [_centre_crop(image, size)]
  crops += [
    tf.image.crop_to_bounding_box(image, top, left, size, size)
    for top, left in corners
  ]
  crops = tf.stack(crops)
  crops = tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)
  return tf.ensure_shape(crops, [10, size, size, 3])
