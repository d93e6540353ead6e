"""Procedural shape scenes with COCO-style captions: the offline built-in dataset.

Pure numpy (no TensorFlow): a scene is a list of objects, each a (size, colour, shape) triple
placed without overlap on a noisy, varied background. Every image gets five captions in varied
phrasings that all name the same multiset of objects, so a caption can be parsed back into that
multiset and a generated caption scored by `scene_accuracy`.

With `relations`, every scene holds two different objects and its captions also say where the
first is relative to the second ("a small red square to the left of a big blue circle", "a big
blue circle right of a small red square"): `relation_accuracy` scores objects and relation.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from collections.abc import Sequence
import dataclasses
import re

import numpy as np

SHAPES = ('circle', 'square', 'triangle', 'diamond')
COLOURS = {
    'red': (215, 35, 35),
    'green': (35, 165, 55),
    'blue': (35, 75, 220),
    'yellow': (235, 215, 35),
    'purple': (145, 50, 185),
    'orange': (245, 135, 20),
}
SIZES = ('small', 'large')
MAX_OBJECTS = 4

# Radius of an object as a fraction of the image side, per size.
_RADIUS_FRACTION = {'small': 0.12, 'large': 0.2}
# Words a caption may use for each size; the first is the canonical one.
_SIZE_WORDS = {'small': ('small', 'little', 'tiny'), 'large': ('large', 'big')}
_COUNT_WORDS = {1: ('a', 'one'), 2: ('two',), 3: ('three',), 4: ('four',)}
_NUM_CAPTIONS = 5
_COLOUR_JITTER = 18
_NOISE_STD = 12.0
_PLACEMENT_TRIES = 100
# Smallest gap between two objects, as a fraction of the image side.
_MARGIN_FRACTION = 0.03

# Words a caption may use for where one object is relative to another, per relation.
_RELATION_WORDS = {
    'left of': ('to the left of', 'left of', 'on the left of'),
    'right of': ('to the right of', 'right of', 'on the right of'),
    'above': ('above', 'over'),
    'below': ('below', 'under', 'beneath'),
}
_INVERSE = {'left of': 'right of', 'right of': 'left of', 'above': 'below', 'below': 'above'}
# A relational scene is redrawn until its larger centre offset is this many times the smaller:
# no scene is nearly diagonal, so "left of" or "above" is never a close call.
_RELATION_CLEARANCE = 1.25

# Object = (size, colour, shape); Scene = sorted tuple of (count, size, colour, shape).
Object = tuple[str, str, str]
Scene = tuple[tuple[int, str, str, str], ...]
# (first object, 'left of' or 'above', second object): each relation said one way.
Relation = tuple[Object, str, Object]


@dataclasses.dataclass(frozen=True)
class Example:
  image: np.ndarray  # (size, size, 3) uint8
  objects: tuple[Object, ...]
  captions: tuple[str, ...]
  relation: Relation | None = None


def scene_of(objects: Iterable[Object]) -> Scene:
  """The canonical multiset of (count, size, colour, shape) for a list of objects."""
  counts = collections.Counter(objects)
  return tuple(sorted((n, *obj) for obj, n in counts.items()))


# --------------------------------------------------------------------------- rendering


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A desaturated gradient with a random direction and tint, plus pixel noise."""
  yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
  angle = rng.uniform(0, 2 * np.pi)
  ramp = np.cos(angle) * xx + np.sin(angle) * yy
  base = rng.uniform(70, 190)
  contrast = rng.uniform(-50, 50)
  tint = rng.uniform(-12, 12, size=3)
  image = base + contrast * ramp[..., None] + tint
  image = image + rng.normal(0, _NOISE_STD, size=(size, size, 3))
  return image


def _mask(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
  if shape == 'circle':
    return dx**2 + dy**2 <= radius**2
  if shape == 'square':
    return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * radius
  if shape == 'diamond':
    return np.abs(dx) + np.abs(dy) <= 1.15 * radius
  if shape == 'triangle':  # pointing up, apex at -radius, base at +0.75 radius
    return (dy <= 0.75 * radius) & (np.abs(dx) <= (dy + radius) * 0.62)
  raise ValueError(f'unknown shape {shape!r}')


def _place(rng: np.random.Generator, radii: Sequence[float],
           size: int) -> list[tuple[float, float]]:
  """Random non-overlapping centres, by rejection sampling with restarts."""
  margin = _MARGIN_FRACTION * size
  for _ in range(_PLACEMENT_TRIES):
    centres: list[tuple[float, float]] = []
    for radius in radii:
      for _ in range(_PLACEMENT_TRIES):
        cy, cx = rng.uniform(radius + 1, size - radius - 1, size=2)
        if all((cy - y)**2 + (cx - x)**2 > (radius + r + margin)**2
               for (y, x), r in zip(centres, radii)):
          centres.append((cy, cx))
          break
      else:
        break  # This object does not fit next to the ones placed: start over.
    if len(centres) == len(radii):
      return centres
  raise ValueError(f'cannot place {len(radii)} objects without overlap in {size}px')


def render(objects: Sequence[Object], size: int, rng: np.random.Generator) -> np.ndarray:
  """Draws the objects on a fresh background; returns a (size, size, 3) uint8 image."""
  return render_with_centres(objects, size, rng)[0]


def render_with_centres(objects: Sequence[Object], size: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[float, float]]]:
  """`render`, and each object's centre (y, x) in pixels."""
  image = _background(rng, size)
  radii = [_RADIUS_FRACTION[obj_size] * size for obj_size, _, _ in objects]
  centres = _place(rng, radii, size)
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  for i, (cy, cx) in enumerate(centres):
    _, colour, shape = objects[i]
    mask = _mask(shape, yy - cy, xx - cx, radii[i])
    rgb = np.array(COLOURS[colour], float) + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, 3)
    image[mask] = rgb + rng.normal(0, _NOISE_STD / 2, size=(mask.sum(), 3))
  return np.clip(np.round(image), 0, 255).astype(np.uint8), centres


def relation_between(centre: tuple[float, float], other: tuple[float, float]) -> str:
  """Where an object at `centre` (y, x) is relative to one at `other`, by the larger offset."""
  dy, dx = centre[0] - other[0], centre[1] - other[1]
  if abs(dx) >= abs(dy):
    return 'left of' if dx < 0 else 'right of'
  return 'above' if dy < 0 else 'below'


def canonical_relation(first: Object, relation: str, second: Object) -> Relation:
  """The relation said one way: 'right of' and 'below' become 'left of' and 'above'."""
  if relation in ('right of', 'below'):
    return second, _INVERSE[relation], first
  return first, relation, second


# --------------------------------------------------------------------------- captions


def _group_phrase(count: int, size: str, colour: str, shape: str, rng: np.random.Generator) -> str:
  count_word = rng.choice(_COUNT_WORDS[count])
  size_word = rng.choice(_SIZE_WORDS[size])
  noun = shape if count == 1 else shape + 's'
  return f'{count_word} {size_word} {colour} {noun}'


def _join(phrases: Sequence[str]) -> str:
  if len(phrases) == 1:
    return phrases[0]
  return ', '.join(phrases[:-1]) + ' and ' + phrases[-1]


_TEMPLATES = (
    lambda p, one: _join(p),
    lambda p, one: f"there {'is' if one else 'are'} {_join(p)}",
    lambda p, one: f'a picture of {_join(p)}',
    lambda p, one: f'{_join(p)} on a noisy background',
    lambda p, one: f'an image with {_join(p)}',
    lambda p, one: (f'{p[-1]} next to {_join(p[:-1])}' if len(p) > 1 else f'{p[0]} on its own'),
)


def captions_for(objects: Sequence[Object], rng: np.random.Generator,
                 num_captions: int = _NUM_CAPTIONS) -> tuple[str, ...]:
  """Five differently phrased captions naming exactly `objects`."""
  groups = scene_of(objects)
  templates = rng.choice(len(_TEMPLATES), size=num_captions, replace=False)
  captions = []
  for template in templates:
    order = rng.permutation(len(groups))
    phrases = [_group_phrase(*groups[i], rng) for i in order]
    captions.append(_TEMPLATES[template](phrases, groups[order[0]][0] == 1))
  return tuple(captions)


_RELATION_TEMPLATES = (
    lambda a, r, b: f'{a} {r} {b}',
    lambda a, r, b: f'there is {a} {r} {b}',
    lambda a, r, b: f'a picture of {a} {r} {b}',
    lambda a, r, b: f'{a} {r} {b} on a noisy background',
    lambda a, r, b: f'an image with {a} {r} {b}',
)


def relation_captions_for(relation: Relation, rng: np.random.Generator,
                          num_captions: int = _NUM_CAPTIONS) -> tuple[str, ...]:
  """Differently phrased captions naming both objects and where the first is relative to the
  second, each starting with either object."""
  first, word, second = relation
  templates = rng.choice(len(_RELATION_TEMPLATES), size=num_captions, replace=False)
  captions = []
  for template in templates:
    a, r, b = (first, word, second) if rng.random() < 0.5 else (second, _INVERSE[word], first)
    captions.append(_RELATION_TEMPLATES[template](
        _group_phrase(1, *a, rng), rng.choice(_RELATION_WORDS[r]), _group_phrase(1, *b, rng)))
  return tuple(captions)


_SIZE_OF_WORD = {word: size for size, words in _SIZE_WORDS.items() for word in words}
_COUNT_OF_WORD = {word: n for n, words in _COUNT_WORDS.items() for word in words} | {'an': 1}
_GROUP_PATTERN = re.compile(
    r'\b(' + '|'.join(_COUNT_OF_WORD) + r')\s+(' + '|'.join(_SIZE_OF_WORD) + r')\s+(' +
    '|'.join(COLOURS) + r')\s+(' + '|'.join(SHAPES) + r')(s?)\b')


def parse_caption(caption: str) -> Scene:
  """The multiset of objects a caption names (count, size, colour, shape), sorted.

  Phrases that do not read as "<count> <size> <colour> <shape>" are ignored, so a caption
  with a malformed or missing object phrase parses to a different scene and scores zero.
  """
  counts: collections.Counter = collections.Counter()
  for count, size, colour, shape, _ in _GROUP_PATTERN.findall(caption.lower()):
    counts[(_SIZE_OF_WORD[size], colour, shape)] += _COUNT_OF_WORD[count]
  return tuple(sorted((n, *obj) for obj, n in counts.items()))


_OBJECT_PATTERN = (r'(?:' + '|'.join(_COUNT_OF_WORD) + r')\s+(' + '|'.join(_SIZE_OF_WORD) +
                   r')\s+(' + '|'.join(COLOURS) + r')\s+(' + '|'.join(SHAPES) + r')')
_RELATION_OF_WORDS = {w: r for r, words in _RELATION_WORDS.items() for w in words}
_RELATION_PATTERN = re.compile(
    r'\b' + _OBJECT_PATTERN + r'\s+(' +
    '|'.join(sorted(_RELATION_OF_WORDS, key=len, reverse=True)) + r')\s+' + _OBJECT_PATTERN +
    r'\b')


def parse_relation(caption: str) -> Relation | None:
  """The first "<object> <relation words> <object>" of a caption, said one way, or None."""
  match = _RELATION_PATTERN.search(caption.lower())
  if match is None:
    return None
  size_a, colour_a, shape_a, words, size_b, colour_b, shape_b = match.groups()
  return canonical_relation((_SIZE_OF_WORD[size_a], colour_a, shape_a), _RELATION_OF_WORDS[words],
                            (_SIZE_OF_WORD[size_b], colour_b, shape_b))


def relation_correct(generated: str, references: Sequence[str]) -> bool:
  """Whether a caption names exactly the scene's objects and where one is relative to the
  other, as its first reference does."""
  expected = parse_relation(references[0])
  return (expected is not None and parse_relation(generated) == expected
          and scene_correct(generated, references))


def relation_accuracy(generated: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Fraction of images whose generated caption names the objects and their relation right."""
  if len(generated) != len(references):
    raise ValueError(f'{len(generated)} generated captions for {len(references)} images')
  if not generated:
    return 0.0
  return float(np.mean([relation_correct(g, refs) for g, refs in zip(generated, references)]))


def scene_correct(generated: str, references: Sequence[str]) -> bool:
  """Whether a caption names exactly the objects of its scene, parsed from the first reference
  (all references of an image name the same objects by construction)."""
  return parse_caption(generated) == parse_caption(references[0])


def scene_accuracy(generated: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Fraction of images whose generated caption names exactly the objects of the scene."""
  if len(generated) != len(references):
    raise ValueError(f'{len(generated)} generated captions for {len(references)} images')
  if not generated:
    return 0.0
  hits = [scene_correct(g, refs) for g, refs in zip(generated, references)]
  return float(np.mean(hits))


# --------------------------------------------------------------------------- scenes


def sample_objects(rng: np.random.Generator, min_objects: int,
                   max_objects: int) -> tuple[Object, ...]:
  num_objects = int(rng.integers(min_objects, max_objects + 1))
  return tuple((str(rng.choice(SIZES)), str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
               for _ in range(num_objects))


def _relational_example(rng: np.random.Generator, image_size: int) -> Example:
  """Two different objects, placed until one is clearly left/right of or above/below the
  other."""
  objects = sample_objects(rng, 2, 2)
  while objects[0] == objects[1]:
    objects = sample_objects(rng, 2, 2)
  while True:
    image, (centre, other) = render_with_centres(objects, image_size, rng)
    offsets = sorted([abs(centre[0] - other[0]), abs(centre[1] - other[1])])
    if offsets[1] >= _RELATION_CLEARANCE * offsets[0]:
      break
  relation = canonical_relation(objects[0], relation_between(centre, other), objects[1])
  return Example(image=image, objects=objects, captions=relation_captions_for(relation, rng),
                 relation=relation)


def make_example(seed: int, split_index: int, index: int, *, image_size: int,
                 min_objects: int, max_objects: int, relations: bool = False) -> Example:
  """One deterministic example: the same arguments always give the same image and captions.
  With `relations`, two objects and relational captions (min/max_objects do not apply)."""
  if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
    raise ValueError(f'need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, '
                     f'got {min_objects}, {max_objects}')
  rng = np.random.default_rng([seed, split_index, index])
  if relations:
    return _relational_example(rng, image_size)
  objects = sample_objects(rng, min_objects, max_objects)
  image = render(objects, image_size, rng)
  return Example(image=image, objects=objects, captions=captions_for(objects, rng))
