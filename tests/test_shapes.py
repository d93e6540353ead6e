"""The built-in dataset: rendering, captions, parsing and the tfds builder."""

import numpy as np
import pytest

from jaxcap.data import shapes


def test_example_is_deterministic_for_a_seed():
  a = shapes.make_example(3, 0, 17, image_size=48, min_objects=1, max_objects=4)
  b = shapes.make_example(3, 0, 17, image_size=48, min_objects=1, max_objects=4)
  c = shapes.make_example(4, 0, 17, image_size=48, min_objects=1, max_objects=4)
  np.testing.assert_array_equal(a.image, b.image)
  assert a.captions == b.captions and a.objects == b.objects
  assert not np.array_equal(a.image, c.image)


def test_example_has_five_captions_that_parse_to_its_objects():
  for index in range(200):
    example = shapes.make_example(0, 0, index, image_size=64, min_objects=1, max_objects=4)
    assert example.image.shape == (64, 64, 3) and example.image.dtype == np.uint8
    assert 1 <= len(example.objects) <= 4
    assert len(example.captions) == 5 and len(set(example.captions)) == 5
    for caption in example.captions:
      assert shapes.parse_caption(caption) == shapes.scene_of(example.objects), caption


def test_objects_are_drawn_in_their_colours():
  example = shapes.make_example(0, 0, 5, image_size=64, min_objects=1, max_objects=1)
  (_, colour, _), = example.objects
  distance = np.linalg.norm(example.image.astype(float) - shapes.COLOURS[colour], axis=-1)
  assert (distance < 40).sum() > 20  # Noisy pixels of the object's colour.


def test_parse_caption_counts_and_synonyms():
  caption = ('Two big red circles, a tiny blue square and one small blue square on a noisy '
             'background')
  assert shapes.parse_caption(caption) == (
      (2, 'large', 'red', 'circle'), (2, 'small', 'blue', 'square'))
  assert shapes.parse_caption('there is nothing here') == ()
  assert shapes.parse_caption('two red circles') == ()  # No size: not an object phrase.


def test_scene_accuracy():
  refs = [['a large red circle'], ['two small blue squares']]
  assert shapes.scene_accuracy(['one big red circle', 'two tiny blue squares'], refs) == 1.0
  assert shapes.scene_accuracy(['a big red circle', 'a tiny blue square'], refs) == 0.5
  with pytest.raises(ValueError, match='2 images'):
    shapes.scene_accuracy(['a big red circle'], refs)


def _centroid(image, colour):
  distance = np.linalg.norm(image.astype(float) - shapes.COLOURS[colour], axis=-1)
  ys, xs = np.nonzero(distance < 40)
  return ys.mean(), xs.mean()


def test_relational_captions_say_where_the_objects_are_in_the_pixels():
  seen, checked = set(), 0
  for index in range(150):
    example = shapes.make_example(0, 0, index, image_size=64, min_objects=1, max_objects=4,
                                  relations=True)
    first, second = example.objects
    assert first != second
    assert len(example.captions) == 5 and len(set(example.captions)) == 5
    for caption in example.captions:
      assert shapes.parse_caption(caption) == shapes.scene_of(example.objects), caption
      assert shapes.parse_relation(caption) == example.relation, caption
    seen.add(example.relation[1])
    if first[1] == second[1]:
      continue  # Same colour: the pixels do not tell the objects apart.
    # Where each object's pixels are, independently of how the scene was drawn.
    (y1, x1), (y2, x2) = _centroid(example.image, first[1]), _centroid(example.image, second[1])
    dy, dx = y1 - y2, x1 - x2
    if max(abs(dx), abs(dy)) < 1.5 * min(abs(dx), abs(dy)):
      continue  # A triangle's centroid is off its centre: only clear cases are checked.
    if abs(dx) > abs(dy):
      expected = (first, 'left of', second) if dx < 0 else (second, 'left of', first)
    else:
      expected = (first, 'above', second) if dy < 0 else (second, 'above', first)
    assert example.relation == expected, (index, example.captions)
    checked += 1
  assert seen == {'left of', 'above'} and checked > 80


def test_parse_relation_reads_every_phrasing_one_way():
  red, blue = ('small', 'red', 'square'), ('large', 'blue', 'circle')
  for caption in ('a small red square to the left of a big blue circle',
                  'there is one big blue circle right of a tiny red square',
                  'an image with a large blue circle on the right of a little red square'):
    assert shapes.parse_relation(caption) == (red, 'left of', blue), caption
  assert shapes.parse_relation('a big blue circle under a small red square') == (
      red, 'above', blue)
  assert shapes.parse_relation('a small red square and a big blue circle') is None


def test_relation_accuracy_needs_the_objects_and_the_relation():
  refs = [['a small red square left of a big blue circle']]
  right = 'one big blue circle to the right of one tiny red square'
  assert shapes.relation_accuracy([right], refs) == 1.0
  assert shapes.relation_accuracy(['a big blue circle left of a small red square'], refs) == 0.0
  assert shapes.scene_accuracy(['a big blue circle left of a small red square'], refs) == 1.0
  assert shapes.relation_accuracy(['a small red square above a big blue circle'], refs) == 0.0
  assert shapes.relation_accuracy(['a small red square left of a big red circle'], refs) == 0.0
  assert shapes.relation_accuracy(['a small red square and a big blue circle'], refs) == 0.0


def test_bad_object_counts_are_rejected():
  with pytest.raises(ValueError, match='max_objects'):
    shapes.make_example(0, 0, 0, image_size=64, min_objects=1, max_objects=5)


def test_builder_is_deterministic_and_has_coco_captions_features(config, tmp_path):
  from jaxcap.data import shapes_captions
  config.data.shapes.train_size = 8
  splits = []
  for name in ('a', 'b'):
    builder = shapes_captions.builder_from_config(config.data.shapes, str(tmp_path / name))
    builder.download_and_prepare()
    splits.append(list(builder.as_dataset('train', shuffle_files=False).as_numpy_iterator()))
  assert set(splits[0][0]) == {'image', 'image/id', 'image/filename', 'captions'}
  assert set(splits[0][0]['captions']) == {'id', 'text'}
  assert len(splits[0]) == 8
  for a, b in zip(*splits):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['captions']['text'], b['captions']['text'])
    assert a['image/id'] == b['image/id']
