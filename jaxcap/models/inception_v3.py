"""InceptionV3 in Flax linen, layer for layer the topology of `keras.applications.InceptionV3`.

Every convolution is Keras' `conv2d_bn`: a bias-free convolution, batch norm without scale
(epsilon 1e-3), ReLU. Padding follows Keras ('valid' stems and reductions, 'same' elsewhere;
'same' average pooling does not count padded cells). Inputs are NHWC images in [-1, 1].
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from typing import Any

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

_BN_EPSILON = 1e-3
# Keras' InceptionV3 has 94 conv2d_bn blocks (a Conv2D and a BatchNormalization each).
NUM_CONV_BN = 94
MANIFEST_FILENAME = 'manifest.json'
_VARIABLES_DIRNAME = 'variables'


class ConvBN(nn.Module):
  """Keras' conv2d_bn: Conv (no bias) -> BatchNorm (no scale) -> ReLU.

  With `average_pooled`, Keras' 3x3 average pool in front of a 1x1 conv2d_bn is applied after
  the convolution instead: both are linear and the convolution has no bias, so the result is
  the same, and the pool runs on the convolution's 4-10x fewer channels.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: str = 'SAME'
  bn_momentum: float = 0.99
  dtype: Any = jnp.float32
  average_pooled: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding=self.padding,
                use_bias=False, dtype=self.dtype, name='conv')(x)
    if self.average_pooled:
      x = average_pool_3x3(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=_BN_EPSILON, use_scale=False, dtype=self.dtype, name='bn')(x)
    return nn.relu(x)


def average_pool_3x3(x: jax.Array) -> jax.Array:
  """Keras' AveragePooling2D(3, strides=1, padding='same'): the mean of the cells of each 3x3
  window that lie inside the image. Written as shifted sums, which XLA fuses into one pass
  (its reduce_window ran 1.3-3.5x slower on CPU)."""
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
  sums = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]

  def cells(n):  # Cells of each window inside the image along an axis of n.
    count = np.full(n, 3.0)
    count[0] -= 1
    count[-1] -= 1
    return count

  counts = np.outer(cells(x.shape[1]), cells(x.shape[2]))[None, :, :, None]
  return sums / jnp.asarray(counts, x.dtype)


def max_pool_3x3_stride_2(x: jax.Array) -> jax.Array:
  """Keras' MaxPooling2D(3, strides=2) (valid padding), as the maximum of strided slices (its
  reduce_window ran 2-4x slower on CPU)."""
  oh, ow = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  rows = functools.reduce(jnp.maximum, [x[:, i:i + 2 * oh - 1:2] for i in range(3)])
  return functools.reduce(jnp.maximum, [rows[:, :, j:j + 2 * ow - 1:2] for j in range(3)])


def _topology(x, conv, max_pool, concat):
  """Keras' InceptionV3 graph, mixed10 output, written once over abstract operations.

  `conv(x, features, kernel, strides, padding, average_pooled=False)` is one conv2d_bn block
  (with `average_pooled`, of the 3x3 average pool of `x`); blocks are created in Keras' order.
  `concat(inputs, block)` joins branches (`block` names the mixed blocks). The Flax module runs
  it on arrays; `keras_layer_order` runs it on graph nodes.
  """
  x = conv(x, 32, (3, 3), (2, 2), 'VALID')
  x = conv(x, 32, (3, 3), (1, 1), 'VALID')
  x = conv(x, 64, (3, 3), (1, 1), 'SAME')
  x = max_pool(x)
  x = conv(x, 80, (1, 1), (1, 1), 'VALID')
  x = conv(x, 192, (3, 3), (1, 1), 'VALID')
  x = max_pool(x)

  def same(x, features, kernel):
    return conv(x, features, kernel, (1, 1), 'SAME')

  def pool_branch(x, features):  # AveragePooling2D(3x3, same) -> conv2d_bn 1x1.
    return conv(x, features, (1, 1), (1, 1), 'SAME', average_pooled=True)

  # mixed0..2: 35 x 35 x 256/288/288.
  for block, pool_features in enumerate((32, 64, 64)):
    branch1x1 = same(x, 64, (1, 1))
    branch5x5 = same(same(x, 48, (1, 1)), 64, (5, 5))
    branch3x3dbl = same(same(same(x, 64, (1, 1)), 96, (3, 3)), 96, (3, 3))
    branch_pool = pool_branch(x, pool_features)
    x = concat([branch1x1, branch5x5, branch3x3dbl, branch_pool], block)

  # mixed3: 17 x 17 x 768.
  branch3x3 = conv(x, 384, (3, 3), (2, 2), 'VALID')
  branch3x3dbl = conv(same(same(x, 64, (1, 1)), 96, (3, 3)), 96, (3, 3), (2, 2), 'VALID')
  x = concat([branch3x3, branch3x3dbl, max_pool(x)], 3)

  # mixed4..7: 17 x 17 x 768, factorised 7x7 convolutions.
  for block, width in zip(range(4, 8), (128, 160, 160, 192)):
    branch1x1 = same(x, 192, (1, 1))
    branch7x7 = same(same(same(x, width, (1, 1)), width, (1, 7)), 192, (7, 1))
    branch7x7dbl = same(x, width, (1, 1))
    for kernel in ((7, 1), (1, 7), (7, 1)):
      branch7x7dbl = same(branch7x7dbl, width, kernel)
    branch7x7dbl = same(branch7x7dbl, 192, (1, 7))
    branch_pool = pool_branch(x, 192)
    x = concat([branch1x1, branch7x7, branch7x7dbl, branch_pool], block)

  # mixed8: 8 x 8 x 1280.
  branch3x3 = conv(same(x, 192, (1, 1)), 320, (3, 3), (2, 2), 'VALID')
  branch7x7x3 = same(same(same(x, 192, (1, 1)), 192, (1, 7)), 192, (7, 1))
  branch7x7x3 = conv(branch7x7x3, 192, (3, 3), (2, 2), 'VALID')
  x = concat([branch3x3, branch7x7x3, max_pool(x)], 8)

  # mixed9, mixed10: 8 x 8 x 2048.
  for block in (9, 10):
    branch1x1 = same(x, 320, (1, 1))
    branch3x3 = same(x, 384, (1, 1))
    branch3x3 = concat([same(branch3x3, 384, (1, 3)), same(branch3x3, 384, (3, 1))], None)
    branch3x3dbl = same(same(x, 448, (1, 1)), 384, (3, 3))
    branch3x3dbl = concat([same(branch3x3dbl, 384, (1, 3)), same(branch3x3dbl, 384, (3, 1))], None)
    branch_pool = pool_branch(x, 192)
    x = concat([branch1x1, branch3x3, branch3x3dbl, branch_pool], block)
  return x


class InceptionV3(nn.Module):
  """Returns the (N, 2048) average-pooled embedding, (N, 1000) logits with `include_top`, or
  with `grid` the last mixed block (N, 8, 8, 2048 at 299 px) the embedding is the mean of.

  The last spatial map (N, H/32-ish, W/32-ish, 2048) and each mixed block's output are sown
  into the 'intermediates' collection as `spatial_map` and `mixed0` ... `mixed10`.
  """
  include_top: bool = False
  num_classes: int = 1000
  bn_momentum: float = 0.99
  grid: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    counter = iter(range(NUM_CONV_BN))

    def conv(x, features, kernel, strides, padding, average_pooled=False):
      return ConvBN(features, kernel, strides, padding, self.bn_momentum, self.dtype,
                    average_pooled, name=f'conv2d_bn_{next(counter)}')(x, train)

    def concat(branches, block):
      x = jnp.concatenate(branches, axis=-1)
      if block is not None:
        self.sow('intermediates', f'mixed{block}', x)
      return x

    x = _topology(images.astype(self.dtype), conv, max_pool_3x3_stride_2, concat)
    self.sow('intermediates', 'spatial_map', x)
    if self.grid:
      return x.astype(jnp.float32)
    embedding = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if not self.include_top:
      return embedding
    return nn.Dense(
        self.num_classes, dtype=self.dtype, name='predictions')(embedding).astype(jnp.float32)


def keras_layer_order() -> tuple[list[int], list[int]]:
  """The conv2d_bn blocks in the order of Keras' `model.layers`, for its Conv2D and its
  BatchNormalization layers.

  Keras orders a functional model's layers by depth (longest path to the output, deepest
  first), ties broken by first visit in a depth-first walk from the output through each layer's
  inputs in order. Weight files follow that order: the legacy HDF5 `layer_names`, and the
  per-class numbering (conv2d, conv2d_1, ...) of Keras 3 `.weights.h5` files. Each conv2d_bn
  block is three Keras layers: Conv2D -> BatchNormalization -> Activation.
  """
  parents: dict[int, list[int]] = {}
  block_of: dict[int, tuple[str, int]] = {}

  def node(inputs, label=None):
    index = len(parents)
    parents[index] = list(inputs)
    if label is not None:
      block_of[index] = label
    return index

  blocks = iter(range(NUM_CONV_BN))

  def conv(x, *_, average_pooled=False):
    if average_pooled:
      x = node([x])  # AveragePooling2D.
    block = next(blocks)
    conv_node = node([x], ('conv', block))
    return node([node([conv_node], ('bn', block))])  # Activation.

  output = _topology(node([]), conv, max_pool=lambda x: node([x]),
                     concat=lambda inputs, _: node(inputs))
  first_visit: dict[int, int] = {}
  post_order: list[int] = []

  def walk(n):
    if n in first_visit:
      return
    first_visit[n] = len(first_visit)
    for parent in parents[n]:
      walk(parent)
    post_order.append(n)

  walk(output)
  depth: dict[int, int] = {}
  for n in reversed(post_order):
    depth.setdefault(n, 0)
    for parent in parents[n]:
      depth[parent] = max(depth.get(parent, 0), depth[n] + 1)
  ordered = sorted(post_order, key=lambda n: (-depth[n], first_visit[n]))
  convs = [block_of[n][1] for n in ordered if block_of.get(n, ('',))[0] == 'conv']
  norms = [block_of[n][1] for n in ordered if block_of.get(n, ('',))[0] == 'bn']
  return convs, norms


# --------------------------------------------------------------------------- Keras weights


class WeightsError(ValueError):
  """A weights file or directory that cannot give InceptionV3 variables."""


def _read_legacy_h5(path: str, root: h5py.Group) -> list[tuple[str, list[np.ndarray]]]:
  """Layers with weights, in the file's recorded order, each with its recorded weight order."""
  group = root['model_weights'] if 'model_weights' in root else root
  layers = []
  for name in group.attrs['layer_names']:
    name = name.decode('utf8') if isinstance(name, bytes) else str(name)
    layer = group[name]
    weight_names = [w.decode('utf8') if isinstance(w, bytes) else str(w)
                    for w in layer.attrs.get('weight_names', [])]
    if weight_names:
      layers.append((name, [np.asarray(layer[w]) for w in weight_names]))
  return layers


def _read_keras3_h5(path: str, root: h5py.Group) -> list[tuple[str, list[np.ndarray]]]:
  """Layers with weights of a Keras 3 `.weights.h5` file (`layers/<name>/vars/<i>`).

  Keras 3 names each layer's group by its class and its rank among the model's layers of that
  class (conv2d, conv2d_1, ...), so sorting by that number recovers `model.layers` order.
  """
  layers = []
  for name, layer in root['layers'].items():
    variables = layer.get('vars', {})
    if len(variables):
      layers.append((name, [np.asarray(variables[str(i)]) for i in range(len(variables))]))
  return sorted(layers, key=lambda layer: _name_number(layer[0]))


def read_keras_h5(path: str) -> list[tuple[str, list[np.ndarray]]]:
  """(layer name, arrays) of every layer with weights in a Keras 2 legacy or Keras 3 file."""
  try:
    with h5py.File(path, 'r') as root:
      if 'layer_names' in root.attrs or 'model_weights' in root:
        return _read_legacy_h5(path, root)
      if 'layers' in root:
        return _read_keras3_h5(path, root)
  except (OSError, KeyError, ValueError) as error:
    raise WeightsError(
        f'{path}: cannot read Keras weights from this HDF5 file ({error})') from error
  raise WeightsError(f'{path}: neither a legacy Keras HDF5 weights file (no layer_names) nor a '
                     'Keras 3 .weights.h5 file (no layers group)')


def _name_number(name: str) -> int:
  """The number Keras appends to a default layer name: conv2d -> 0, conv2d_7 -> 7."""
  match = re.search(r'_(\d+)$', name)
  return int(match.group(1)) if match else 0


def _expected_variables(include_top: bool):
  model = InceptionV3(include_top=include_top)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 299, 299, 3)))


def load_keras_weights(path: str, include_top: bool = False) -> dict[str, Any]:
  """Flax variables {'params', 'batch_stats'} from a Keras InceptionV3 weights file.

  Reads the legacy HDF5 files Keras downloads for ImageNet (written by Keras 2) and Keras 3
  `.weights.h5` files. As Keras does, layers are matched by position, not by name (names change
  with the Keras version that wrote a file): the file's layers come in `model.layers` order,
  which `keras_layer_order` gives for this module's conv2d_bn blocks; within a layer, arrays keep
  the file's recorded order. Every variable is shape-checked, and a missing, extra or
  mis-shaped one stops the conversion naming it.
  """
  layers = read_keras_h5(path)
  convs, norms, dense = [], [], []
  for name, arrays in layers:
    shapes = [a.shape for a in arrays]
    if len(arrays) == 1 and arrays[0].ndim == 4:
      convs.append((name, arrays))
    elif len(arrays) == 3 and all(a.ndim == 1 for a in arrays):
      norms.append((name, arrays))
    elif len(arrays) == 2 and arrays[0].ndim == 2 and arrays[1].ndim == 1:
      dense.append((name, arrays))
    else:
      raise WeightsError(
          f'{path}: layer {name!r} with weights of shapes {shapes} is not part of '
          'InceptionV3 (conv without bias, batch norm without scale, or the top Dense)')
  for kind, found in (('Conv2D', convs), ('BatchNormalization', norms)):
    if len(found) != NUM_CONV_BN:
      raise WeightsError(f'{path}: {len(found)} {kind} layers with InceptionV3 weights, expected '
                         f'{NUM_CONV_BN}: not an InceptionV3 weights file')
  if include_top and not dense:
    raise WeightsError(f'{path}: no top Dense layer (predictions); convert with include_top=False '
                       'or use the file with the top')
  if not include_top and dense:
    raise WeightsError(f'{path}: has a top Dense layer {dense[0][0]!r}; convert with '
                       'include_top=True or use the _notop file')
  if len(dense) > 1:
    raise WeightsError(f'{path}: {len(dense)} Dense layers, expected one (predictions)')

  expected = _expected_variables(include_top)
  params: dict[str, Any] = {}
  batch_stats: dict[str, Any] = {}

  def put(tree, keys, value, source):
    want = expected['params' if tree is params else 'batch_stats']
    for key in keys:
      want = want[key]
    if tuple(want.shape) != value.shape:
      raise WeightsError(f'{path}: {source} has shape {value.shape}, InceptionV3 expects '
                         f'{tuple(want.shape)} for {"/".join(keys)}')
    node = tree
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = np.asarray(value, np.float32)

  conv_blocks, norm_blocks = keras_layer_order()
  for block, (name, (kernel,)) in zip(conv_blocks, convs):
    put(params, (f'conv2d_bn_{block}', 'conv', 'kernel'), kernel, f'layer {name!r} kernel')
  for block, (name, (beta, mean, var)) in zip(norm_blocks, norms):
    scope = f'conv2d_bn_{block}'
    put(params, (scope, 'bn', 'bias'), beta, f'layer {name!r} beta')
    put(batch_stats, (scope, 'bn', 'mean'), mean, f'layer {name!r} moving_mean')
    put(batch_stats, (scope, 'bn', 'var'), var, f'layer {name!r} moving_variance')
  if include_top:
    name, (kernel, bias) = dense[0]
    put(params, ('predictions', 'kernel'), kernel, f'layer {name!r} kernel')
    put(params, ('predictions', 'bias'), bias, f'layer {name!r} bias')
  return {'params': params, 'batch_stats': batch_stats}


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def save_pretrained(variables: dict[str, Any], directory: str, *, source: str,
                    include_top: bool) -> None:
  """An Orbax checkpoint of the variables plus a manifest naming their source file."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, _VARIABLES_DIRNAME), variables, force=True)
  checkpointer.wait_until_finished()
  manifest = {'source': os.path.basename(source), 'sha256': _sha256(source),
              'include_top': include_top, 'layer_count': NUM_CONV_BN * 2 + int(include_top)}
  with open(os.path.join(directory, MANIFEST_FILENAME), 'w') as f:
    json.dump(manifest, f, indent=2)


def read_manifest(directory: str, include_top: bool | None = None) -> dict[str, Any]:
  """The manifest of a converted directory; checks `include_top` when given."""
  path = os.path.join(directory, MANIFEST_FILENAME)
  if not os.path.exists(path):
    raise WeightsError(f'{directory}: no converted InceptionV3 weights here ({MANIFEST_FILENAME} '
                       'missing); run scripts/convert_weights.py --keras FILE --output DIR first')
  with open(path) as f:
    manifest = json.load(f)
  if include_top is not None and manifest['include_top'] != include_top:
    raise WeightsError(f'{directory}: converted with include_top={manifest["include_top"]}, '
                       f'but include_top={include_top} is needed')
  return manifest


def load_pretrained(directory: str, include_top: bool = False) -> dict[str, Any]:
  """Variables written by `save_pretrained` (scripts/convert_weights.py)."""
  read_manifest(directory, include_top)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          _expected_variables(include_top))
  checkpointer = ocp.StandardCheckpointer()
  return checkpointer.restore(
      os.path.join(os.path.abspath(directory), _VARIABLES_DIRNAME), abstract)
