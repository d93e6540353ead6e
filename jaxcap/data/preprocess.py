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
  """The central square, its side the shorter side (as the original Show-and-Tell project)."""
  shape = tf.shape(image)
  side = tf.minimum(shape[0], shape[1])
  top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
  return image[top:top + side, left:left + side]


def random_crop_and_flip(image: tf.Tensor, seed: tf.Tensor,
                         min_fraction: float) -> tf.Tensor:
  """A random square of min_fraction to 1 of the shorter side, flipped left-right half the time."""
  shape = tf.shape(image)
  shorter = tf.minimum(shape[0], shape[1])
  fraction = tf.random.stateless_uniform([], seed=seed, minval=min_fraction, maxval=1.0)
  side = tf.maximum(1, tf.cast(tf.cast(shorter, tf.float32) * fraction, tf.int32))
  image = tf.image.stateless_random_crop(image, tf.stack([side, side, 3]), seed=seed + 1)
  return tf.image.stateless_random_flip_left_right(image, seed=seed + 2)


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


def augment_image(image_size: int, seed: int, min_fraction: float):
  """Random square crop and flip per (image, position in the stream), resize, scale."""
  def fn(index, features):
    image_seed = tf.stack([tf.constant(seed, tf.int64), index])
    image = random_crop_and_flip(features['image'], image_seed, min_fraction)
    return index, {**features, 'image': scale_image(resize_image(image, image_size))}
  return fn
