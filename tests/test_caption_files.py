"""Caption datasets from files on disk (jaxcap/data/caption_files.py, coco_local.py,
karpathy.py): the split rule, COCO-format folders of any size and names, Karpathy's JSON on a
Flickr8k-style folder, every bad input's message or skip, and training on each."""

import copy
import json
import logging
import os

import numpy as np
import pytest

from configs import coco as coco_config
from configs import flickr8k as flickr8k_config
from jaxcap.data import caption_files
from jaxcap.data import prepare
from jaxcap.data import sources
from tests import caption_folders


def _coco_config(tmp_path, root, **files):
  config = coco_config.get_config()
  config.data.coco_dir, config.data.data_dir = root, str(tmp_path / 'tfds')
  config.data.coco_files.update(files)
  return config


def _flickr_config(tmp_path, json_path, image_dir):
  config = flickr8k_config.get_config()
  config.data.karpathy_json, config.data.image_dir = json_path, image_dir
  config.data.data_dir = str(tmp_path / 'tfds')
  return config


def _sizes(builder):
  return {name: split.num_examples for name, split in builder.info.splits.items()}


def _skips(builder):
  """reason (before its parenthesised detail) -> the skipped entries with it."""
  skips = {}
  for item in caption_files.read_skipped(builder):
    skips.setdefault(item['reason'].split(' (')[0], []).append(item)
  return skips


def _files_under(folder):
  """Every file under `folder`, however deep (tfds's empty download folders aside)."""
  return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files]


@pytest.mark.parametrize('fraction', [0.5, 0.1])
def test_split_rule_is_its_definition(fraction):
  for size in [*range(0, 41), 9_999, 10_000, 10_001, 40_504]:
    pool = list(range(size))
    val, test, rest = caption_files.cut_eval_splits(pool, fraction)
    # The rule as the README states it: each of val and test takes `fraction` of the pool,
    # at least one image and at most 5,000; test gets what val leaves; the rest is the rest.
    share = min(5000, max(1, int(size * fraction)))
    expected_val = min(share, size)
    expected_test = min(share, size - expected_val)
    assert (len(val), len(test)) == (expected_val, expected_test), size
    assert val + test + rest == pool  # Contiguous, in id order, nothing lost or repeated.
  # COCO 2014's val2014 without Karpathy's file: the fixed cut of earlier versions.
  val, test, rest = caption_files.cut_eval_splits(list(range(40_504)), 0.5)
  assert (len(val), len(test), len(rest)) == (5000, 5000, 30_504)


def test_coco_folder_of_twenty_images_is_split_by_rule(tmp_path, caplog):
  root = caption_folders.make_coco_format_dir(
      str(tmp_path / 'coco'), {
          'train2014': 12,
          'val2014': 8
      })
  config = _coco_config(tmp_path, root)
  builder = sources.get_builder(config.data)
  assert _sizes(builder) == {'train': 12, 'val': 4, 'test': 4}  # Half of val2014 each.
  rule, empty = caption_files.split_notes(builder)
  assert 'val = the first 50%' in rule and 'restval = the rest' in rule
  assert list(empty) == ['restval'] and '50%' in empty['restval']
  assert caption_files.read_skipped(builder) == []
  # Training drops the empty restval with a logged line; evaluation on it stops, naming it.
  with caplog.at_level(logging.WARNING):
    assert sources.resolve_split(builder, 'train+restval', 'config.data.train_split',
                                        drop_empty=True) == 'train'
  assert "'restval' has no images and is left out" in caplog.text
  with pytest.raises(caption_files.DataError, match=r"config.data.eval_splits names split "
                     r"'restval', which has no images .*no image falls in it \(no dataset_coco"):
    sources.resolve_split(builder, 'restval', 'config.data.eval_splits')
  with pytest.raises(caption_files.DataError, match="has no split 'tset'; it has test, train, val"):
    sources.resolve_split(builder, 'tset', 'config.data.eval_splits')


def test_one_annotation_file_under_other_names(tmp_path):
  root = caption_folders.make_coco_format_dir(str(tmp_path / 'mine'), {'photos': 20})
  config = _coco_config(tmp_path, root, train_annotations='annotations/captions_photos.json',
                        train_images='photos', val_annotations=None)
  builder = sources.get_builder(config.data)
  assert _sizes(builder) == {'train': 16, 'val': 2, 'test': 2}  # 10% each, the rest trains.
  examples = list(builder.as_dataset('val').as_numpy_iterator())
  assert sorted(int(e['image/id']) for e in examples) == [1, 2]  # The lowest ids.
  assert 'no val annotations' in caption_files.split_notes(builder)[0]
  # Another folder's config gets its own prepared copy, not this one.
  other = caption_folders.make_coco_format_dir(str(tmp_path / 'other'), {'photos': 10})
  config.data.coco_dir = other
  assert _sizes(sources.get_builder(config.data)) == {'train': 8, 'val': 1, 'test': 1}


def test_an_empty_evaluation_split_stops_naming_it_and_the_rule(tmp_path):
  root = caption_folders.make_coco_format_dir(
      str(tmp_path / 'coco'), {
          'train2014': 4,
          'val2014': 1
      })
  config = _coco_config(tmp_path, root)
  with pytest.raises(caption_files.DataError) as error:
    prepare.prepare(config, str(tmp_path / 'workdir'))
  message = str(error.value)
  assert "config.data.eval_splits names split 'test', which has no images" in message
  assert 'val = the first 50% (at least 1, at most 5,000), test = as many again' in message
  assert not os.path.exists(tmp_path / 'workdir' / 'tokenizer.model')


def test_no_training_images_stops_naming_the_split(tmp_path):
  root = caption_folders.make_coco_format_dir(str(tmp_path / 'coco'), {'photos': 2})
  config = _coco_config(tmp_path, root, train_annotations='annotations/captions_photos.json',
                        train_images='photos', val_annotations=None)
  with pytest.raises(caption_files.DataError, match=r"config.data.train_split='train\+restval': "
                     r"no training images .*train: no image falls in it"):
    prepare.prepare(config, str(tmp_path / 'workdir'))


def test_flickr8k_style_folder_builds_with_its_splits(tmp_path):
  json_path, image_dir = caption_folders.make_flickr8k_dir(str(tmp_path / 'flickr8k'))
  builder = sources.get_builder(_flickr_config(tmp_path, json_path, image_dir).data)
  assert _sizes(builder) == caption_folders.FLICKR8K_SPLITS
  assert caption_files.read_skipped(builder) == []
  assert caption_files.split_notes(builder) == (
      'the splits of dataset_flickr8k.json', {'restval': 'no image falls in it (the splits of '
                                              'dataset_flickr8k.json)'})
  with open(json_path) as f:
    entries = {e['imgid']: e for e in json.load(f)['images']}
  for example in builder.as_dataset('test').as_numpy_iterator():
    entry = entries[int(example['image/id'])]  # Ids are imgid (no cocoid in Flickr files).
    assert entry['split'] == 'test' and example['image/filename'].decode() == entry['filename']
    assert [t.decode() for t in example['captions']['text']] == [
        s['raw'] for s in entry['sentences']]
    assert example['captions']['id'].tolist() == entry['sentids']
    assert example['image'].shape == (48, 40, 3)


def _break_entries(case, entries, image_dir):
  """Applies one bad input to Flickr8k-style entries; returns (reason, detail, sizes)."""
  sizes = dict(caption_folders.FLICKR8K_SPLITS)
  if case == 'sentence without raw':
    del entries[0]['sentences'][1]['raw']
    return 'sentence without raw', 'images[0].sentences[1] has no "raw" string', sizes
  if case == 'filename missing from the folder':
    os.remove(os.path.join(image_dir, entries[3]['filename']))
    sizes['train'] -= 1
    return 'listed but missing from disk', 'images[3].filename', sizes
  if case == 'image listed twice':
    twin = copy.deepcopy(entries[2])
    twin['split'] = 'test'
    entries.append(twin)
    return 'listed twice', 'images[20] has the file of images[2]', sizes
  if case == 'unknown split':
    entries[5]['split'] = 'dev'
    sizes['train'] -= 1
    message = "images[5].split is 'dev'; the schema has train, restval, val, test"
    return 'unknown split', message, sizes
  raise ValueError(case)


@pytest.mark.parametrize('case', ['sentence without raw', 'filename missing from the folder',
                                  'image listed twice', 'unknown split'])
def test_bad_items_are_skipped_naming_file_and_field(tmp_path, case):
  json_path, image_dir = caption_folders.make_flickr8k_dir(str(tmp_path / 'flickr8k'))
  with open(json_path) as f:
    data = json.load(f)
  reason, detail, sizes = _break_entries(case, data['images'], image_dir)
  with open(json_path, 'w') as f:
    json.dump(data, f)
  builder = sources.get_builder(_flickr_config(tmp_path, json_path, image_dir).data)
  assert _sizes(builder) == sizes
  skips = _skips(builder)
  assert list(skips) == [reason], skips
  [item] = skips[reason]
  assert detail in item['reason'] and json_path in item['reason'], item
  if case == 'sentence without raw':
    first = next(e for e in builder.as_dataset('train').as_numpy_iterator() if e['image/id'] == 0)
    assert len(first['captions']['text']) == 4


def _write_json(path, data):
  with open(path, 'w') as f:
    f.write(data if isinstance(data, str) else json.dumps(data))


_GOOD_SENTENCE = {'raw': 'a dog', 'sentid': 0}


@pytest.mark.parametrize('content,message', [
    ('{"images": [', 'cannot read Karpathy\'s caption JSON'),
    ([{'filename': 'a.jpg'}], 'the file is a list, not an object'),
    ({'dataset': 'flickr8k'}, 'the file has no "images" field'),
    ({'images': [{'filename': 'a.jpg', 'sentences': [_GOOD_SENTENCE]}]},
     'images[0] has no "split" field'),
    ({'images': [{'filename': 7, 'split': 'train', 'sentences': [_GOOD_SENTENCE], 'imgid': 0}]},
     'images[0].filename is 7, not a str'),
    ({'images': [{'filename': 'a.jpg', 'split': 'train', 'sentences': [_GOOD_SENTENCE]}]},
     'images[0] has no "imgid" field'),
    ({'images': [{'filename': 'a.jpg', 'split': 'train', 'imgid': 0, 'sentences': 'a dog'}]},
     "images[0].sentences is 'a dog', not a list"),
])
def test_a_karpathy_json_out_of_schema_stops_and_builds_nothing(tmp_path, content, message):
  json_path, image_dir = caption_folders.make_flickr8k_dir(str(tmp_path / 'flickr8k'))
  _write_json(json_path, content)
  config = _flickr_config(tmp_path, json_path, image_dir)
  with pytest.raises(caption_files.DataError) as error:
    sources.get_builder(config.data)
  assert str(error.value).startswith(json_path) and message in str(error.value), error.value
  assert _files_under(config.data.data_dir) == []


@pytest.mark.parametrize('mutate,message', [
    (lambda d: d.pop('annotations'), 'the file has no "annotations" field'),
    (lambda d: d['images'][1].pop('file_name'), 'images[1] has no "file_name" field'),
    (lambda d: d['annotations'][3].update(image_id='7'),
     "annotations[3].image_id is '7', not a int"),
])
def test_coco_annotations_out_of_schema_stop_and_build_nothing(tmp_path, mutate, message):
  root = caption_folders.make_coco_format_dir(
      str(tmp_path / 'coco'), {
          'train2014': 4,
          'val2014': 3
      })
  path = os.path.join(root, 'annotations', 'captions_val2014.json')
  with open(path) as f:
    data = json.load(f)
  mutate(data)
  _write_json(path, data)
  config = _coco_config(tmp_path, root)
  with pytest.raises(caption_files.DataError) as error:
    sources.get_builder(config.data)
  assert str(error.value).startswith(path) and message in str(error.value), error.value
  assert _files_under(config.data.data_dir) == []


def test_coco_image_listed_twice_keeps_the_first(tmp_path):
  root = caption_folders.make_coco_format_dir(
      str(tmp_path / 'coco'), {
          'train2014': 4,
          'val2014': 3
      })
  path = os.path.join(root, 'annotations', 'captions_val2014.json')
  with open(path) as f:
    data = json.load(f)
  data['images'].append(dict(data['images'][0], file_name='train2014_000002.jpg'))
  _write_json(path, data)
  builder = sources.get_builder(_coco_config(tmp_path, root).data)
  assert _sizes(builder) == {'train': 4, 'val': 1, 'test': 1, 'restval': 1}
  [item] = _skips(builder)['listed twice']
  assert f'{path}: images[3] has the id (as ' in item['reason']


def test_a_split_whose_images_are_all_unreadable_stops_and_builds_nothing(tmp_path):
  root = caption_folders.make_coco_format_dir(
      str(tmp_path / 'coco'), {
          'train2014': 4,
          'val2014': 2
      })
  for name in os.listdir(os.path.join(root, 'val2014')):
    _write_json(os.path.join(root, 'val2014', name), 'not a JPEG')
  config = _coco_config(tmp_path, root)
  with pytest.raises(caption_files.DataError, match=r"every image of split 'val' was skipped "
                     r"\(\{'unreadable image': 1\}\); nothing was written"):
    sources.get_builder(config.data)
  assert _files_under(config.data.data_dir) == []


def test_half_given_karpathy_source_and_missing_flickr_stop_with_how_to(tmp_path):
  config = flickr8k_config.get_config()
  config.data.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(sources.DataNotFoundError, match=r'--config.data.karpathy_json=FILE '
                     r'--config.data.image_dir=DIR,\nKarpathy\'s dataset_flickr8k.json'):
    sources.get_builder(config.data)
  config.data.karpathy_json = str(tmp_path / 'dataset_flickr8k.json')
  with pytest.raises(caption_files.DataError, match='go together'):
    sources.get_builder(config.data)
  config.data.image_dir = str(tmp_path)
  with pytest.raises(caption_files.DataError, match='config.data.karpathy_json: .* is not a file'):
    sources.get_builder(config.data)


def _prepare_data(tmp_path, config_name, *overrides):
  return caption_folders.run_prepare_data(str(tmp_path / 'w'), config_name,
                                          f'--config.data.data_dir={tmp_path / "tfds"}', *overrides)


def test_prepare_data_reports_a_flickr8k_folder_and_stops_cleanly_on_bad_json(tmp_path):
  json_path, image_dir = caption_folders.make_flickr8k_dir(str(tmp_path / 'flickr8k'))
  source = [f'--config.data.karpathy_json={json_path}', f'--config.data.image_dir={image_dir}']
  result = _prepare_data(tmp_path, 'flickr8k.py', *source)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert 'Splits: the splits of dataset_flickr8k.json' in out, out
  assert 'restval: no images, left out' in out
  assert 'train: 14 images, 70 captions (per image: {5: 14})' in out
  assert 'val: 3 images (fewer than 100: its metrics will be noisy), 15 captions' in out
  assert 'test: 3 images (fewer than 100' in out and 'skipped: nothing' in out
  _write_json(json_path, {'images': [{'filename': 'a.jpg'}]})
  result = _prepare_data(tmp_path, 'flickr8k.py', *source, '--config.data.data_dir=' +
                         str(tmp_path / 'tfds2'))
  assert result.returncode == 1
  assert f'{json_path}: images[0] has no "split" field' in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize('source', ['coco folder without Karpathy file', 'flickr8k folder'])
def test_trains_and_evaluates_on_folders(tmp_path, source):
  from jaxcap import train
  if source == 'flickr8k folder':
    config = _flickr_config(tmp_path, *caption_folders.make_flickr8k_dir(str(tmp_path / 'data')))
  else:
    root = caption_folders.make_coco_format_dir(str(tmp_path / 'data'),
                                                {'train2014': 12, 'val2014': 8})
    config = _coco_config(tmp_path, root)  # train+restval: restval is empty and left out.
  config.model.encoder, config.model.encoder_weights = 'small_cnn', None
  config.model.small_cnn.features = (8,)
  config.model.lstm_size = config.model.embed_dim = 16
  config.data.image_size, config.data.vocab_size, config.data.shuffle_buffer = 32, 64, 8
  config.batch_size = config.eval.batch_size = 8
  config.num_train_steps, config.log_every_steps = 3, 1
  results = train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  expected = 3 if source == 'flickr8k folder' else 4
  assert results['val']['num_images'] == results['test']['num_images'] == expected
  assert np.isfinite(results['test']['loss']) and 'cider' in results['test']


def test_stored_image_size_stores_the_shorter_side_at_that_size(tmp_path):
  """Each image downscaled once at build time (aspect kept), in its own prepared copy; against
  PIL's bilinear resize of the file, up to JPEG's rounding."""
  from PIL import Image
  root = caption_folders.make_coco_format_dir(str(tmp_path / 'mine'), {'photos': 10})
  config = _coco_config(tmp_path, root, train_annotations='annotations/captions_photos.json',
                        train_images='photos', val_annotations=None)
  full = sources.get_builder(config.data)
  config.data.stored_image_size = 20  # The files are 40 x 48 (width x height).
  stored = sources.get_builder(config.data)
  assert stored.info.full_name != full.info.full_name
  for example in stored.as_dataset('train').take(3).as_numpy_iterator():
    with Image.open(os.path.join(root, 'photos', example['image/filename'].decode())) as image:
      expected = np.asarray(image.convert('RGB').resize((20, 24), Image.BILINEAR), np.float32)
    assert example['image'].shape == (24, 20, 3)
    assert np.abs(example['image'] - expected).mean() < 6  # JPEG of a noisy image: about 3.5.
  # No larger than the size: stored as they are.
  config.data.stored_image_size = 64
  example = next(sources.get_builder(config.data).as_dataset('train').as_numpy_iterator())
  assert example['image'].shape == (48, 40, 3)
  config.data.stored_image_size = 0
  with pytest.raises(caption_files.DataError, match='stored_image_size=0: a size in pixels'):
    sources.get_builder(config.data)
  config.data.name, config.data.coco_dir = 'shapes_captions', None
  config.data.stored_image_size = 20
  with pytest.raises(caption_files.DataError, match="applies to datasets built from files"):
    sources.get_builder(config.data)
