"""Image preprocessing, as small pure TensorFlow functions: training's streams, caption.py, the
caption server and the SavedModel all prepare an image with these.
"""

from __future__ import annotations

import tensorflow as tf


def scale_image(image: tf.Tensor) -> tf.Tensor:
  """uint8 [0, 255] -> float32 [-1, 1], as keras.applications.inception_v3.preprocess_input."""
  image = tf.cast(image, tf.float32)
  return image / 127.5 - 1.0


def center_crop(image: tf.Tensor) -> tf.Tensor:
  """The central square, its side the shorter side (`center_square`)."""
  return crop(image, center_square(tf.shape(image)))


def random_square(shape: tf.Tensor, seed: tf.Tensor, min_fraction: float) -> tf.Tensor:
  """[top, left, side, side]: a random square of min_fraction to 1 of the shorter side of an
  image of `shape` (height, width, ...), at a random position."""
  shorter = tf.minimum(shape[0], shape[1])
  fraction = tf.random.stateless_uniform([], seed=seed, minval=min_fraction, maxval=1.0)
  side = tf.maximum(1, tf.cast(tf.cast(shorter, tf.float32) * fraction, tf.int32))
  top = tf.random.stateless_uniform([], seed=seed + 1, maxval=shape[0] - side + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], seed=seed + 3, maxval=shape[1] - side + 1,
                                     dtype=tf.int32)
  return tf.stack([top, left, side, side])


def center_square(shape: tf.Tensor) -> tf.Tensor:
  """[top, left, side, side]: the central square of an image of `shape`, its side the shorter
  side (as the original Show-and-Tell project)."""
  side = tf.minimum(shape[0], shape[1])
  return tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])


def decode_window(encoded: tf.Tensor, window_fn) -> tf.Tensor:
  """The window `window_fn(shape)` ([top, left, height, width]) of an encoded image, uint8 RGB.

  A JPEG decodes only that window (`tf.image.decode_and_crop_jpeg`: fewer pixels decoded, as
  the Flax ImageNet example reads), widened by a pixel on each side and cut after: the window's
  edge pixels then have the neighbours their colour is interpolated from, and equal the whole
  image's decoding bit for bit (without the margin they differ by up to ~16 levels). Any other
  format decodes whole and is cut."""
  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = window_fn(shape)
    top, left = tf.maximum(window[0] - 1, 0), tf.maximum(window[1] - 1, 0)
    bottom = tf.minimum(window[0] + window[2] + 1, shape[0])
    right = tf.minimum(window[1] + window[3] + 1, shape[1])
    image = tf.image.decode_and_crop_jpeg(
        encoded, tf.stack([top, left, bottom - top, right - left]), channels=3)
    return crop(image, tf.stack([window[0] - top, window[1] - left, window[2], window[3]]))

  def other():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return crop(image, window_fn(tf.shape(image)))
  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  image.set_shape((None, None, 3))
  return image


def crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  return image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Resized float pixels in [0, 255] -> uint8, rounded: what the training stream ships (a
  quarter of float32's bytes); the model scales it on the device (`Captioner.encode`). The
  bilinear resize's pixels are weighted means of uint8 ones, so in range: no clipping."""
  return tf.cast(image + 0.5, tf.uint8)


def resize_image(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear, antialiased resize to (size, size); images already that size pass unchanged.

  The result's static shape says (size, size): padding batches are shaped from it."""
  shape = tf.shape(image)
  resized = tf.cond(
      tf.logical_and(shape[0] == size, shape[1] == size),
      lambda: tf.cast(image, tf.float32),
      lambda: tf.image.resize(image, (size, size), antialias=True))
  return tf.ensure_shape(resized, (size, size, image.shape[-1]))


def preprocess_image(image_size: int):
  """Centre square crop, resize, scale to [-1, 1]."""
  def fn(features):
    image = resize_image(center_crop(features['image']), image_size)
    return {**features, 'image': scale_image(image)}
  return fn


def decode_and_preprocess(encoded: tf.Tensor | bytes, image_size: int) -> tf.Tensor:
  """Encoded image bytes (JPEG, PNG, ...) -> the model input, decoded by TensorFlow as the
  dataset's images are, then `preprocess_image`. For caption.py, the server and the SavedModel."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape((None, None, 3))
  return preprocess_image(image_size)({'image': image})['image']


def training_square(seed: int | None = None, min_fraction: float = 1.0):
  """`(index, features) -> (index, features)`: the training image's square, uint8: the centre
  square, or with a `seed` a random square of min_fraction to 1 of the shorter side flipped
  half the time (per (seed, position in the stream)). An encoded image decodes only that square
  (`decode_window`); a decoded one (cached) is cut. Then `training_resize`."""
  def fn(index, features):
    image = features['image']
    if seed is None:
      window_fn = center_square
    else:
      image_seed = tf.stack([tf.constant(seed, tf.int64), index])
      window_fn = lambda shape: random_square(shape, image_seed, min_fraction)
    if image.dtype == tf.string:
      image = decode_window(image, window_fn)
    else:
      image = crop(image, window_fn(tf.shape(image)))
    if seed is not None:
      image = tf.image.stateless_random_flip_left_right(image, seed=image_seed + 2)
    return index, {**features, 'image': image}
  return fn


def training_resize(image_size: int):
  """`(index, features) -> (index, features)`: the square resized to uint8 (image_size,
  image_size, 3), what the training stream ships. A map of its own: tf.data then overlaps it
  with the decoding (5-8% more images/s on one core than one map doing both)."""
  def fn(index, features):
    return index, {**features, 'image': to_uint8(resize_image(features['image'], image_size))}
  return fn
