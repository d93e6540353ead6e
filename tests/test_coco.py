"""COCO captions: the on-disk builder on a tiny official-layout folder with every odd case, tfds'
coco_captions under mock data, and the missing-data message. Other folders, bad input and
training on them: tests/test_caption_files.py."""


import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import coco as coco_config
from jaxcap.data import caption_files
from jaxcap.data import captions as captions_lib
from jaxcap.data import coco_local
from jaxcap.data import input_pipeline
from jaxcap.data import preprocess as preprocess_lib
from jaxcap.data import sources
from jaxcap.data import tokenizer as tokenizer_lib
from tests import caption_folders


@pytest.fixture(scope='module')
def coco_builder(tmp_path_factory):
  root = caption_folders.make_coco_dir(str(tmp_path_factory.mktemp('coco')))
  config = coco_config.get_config()
  config.data.coco_dir = root
  config.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
  return sources.get_builder(config.data), config


def _reasons(skipped):
  counts = {}
  for item in skipped:
    reason = item['reason'].split(' (')[0]
    counts[reason] = counts.get(reason, 0) + 1
  return counts


def test_builder_keeps_and_skips_exactly(coco_builder):
  builder, _ = coco_builder
  sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
  assert sizes == caption_folders.EXPECTED_SPLIT_SIZES
  skipped = caption_files.read_skipped(builder)
  assert _reasons(skipped) == caption_folders.EXPECTED_SKIPPED
  assert any('000000000007' in s['item'] for s in skipped)  # Truncated, named.


def test_odd_images_are_decoded_correctly(coco_builder):
  builder, _ = coco_builder
  examples = {int(e['image/id']): e for e in builder.as_dataset('train').as_numpy_iterator()}
  assert sorted(examples) == [1, 2, 3, 4, 5, 6]
  assert all(e['image'].ndim == 3 and e['image'].shape[-1] == 3 for e in examples.values())
  assert examples[1]['image'].shape[:2] == (40, 60)
  assert examples[3]['image'].shape[:2] == (45, 30)  # Grayscale, now RGB.
  assert examples[4]['image'].shape[:2] == (33, 47)  # CMYK, now RGB.
  assert examples[5]['image'].shape[:2] == (36, 36)  # PNG content.
  assert examples[6]['image'].shape[:2] == (50, 30)  # EXIF rotated upright.
  texts = [t.decode() for t in examples[1]['captions']['text']]
  assert texts[:2] == ['A dog runs on the beach', 'Café crème ☕ on a table']
  assert len(texts) == 3  # 4 captions, one empty.
  assert len(examples[2]['captions']['text']) == 6
  assert examples[1]['image/filename'] == b'COCO_train2014_000000000001.jpg'


def test_without_karpathy_file_val2014_is_split_by_rule(tmp_path):
  root = caption_folders.make_coco_dir(str(tmp_path / 'coco'), karpathy=False)
  config = coco_config.get_config()
  splits, rule = coco_local.split_records(root, config.data.coco_files, caption_files.Skips())
  # 3 val2014 images: val and test take half each (at least one), restval the rest.
  assert [[r.image_id for r in splits[name]] for name in ('val', 'test', 'restval')] == [
      [101], [102], [103]]
  assert len(splits['train']) == 10 and rule.startswith('no dataset_coco.json')


def test_pipeline_on_coco_format_data(coco_builder):
  builder, config = coco_builder
  captions = captions_lib.read_captions(builder, 'train+restval')
  assert len(captions.image_ids) == 7
  tokenizer = tokenizer_lib.train(captions.all_texts(), 64)
  table = captions_lib.TokenTable.build(captions, tokenizer, 20)
  config.data.image_size, config.data.shuffle_buffer = 64, 16
  batch = next(input_pipeline.train_dataset(builder, 'train+restval', table, config.data,
                                            batch_size=4, seed=0).as_numpy_iterator())
  assert batch['image'].shape == (4, 64, 64, 3) and batch['tokens'].shape == (4, 20)
  config.data.augment = True
  batch = next(input_pipeline.train_dataset(builder, 'train+restval', table, config.data,
                                            batch_size=4, seed=0).as_numpy_iterator())
  assert batch['image'].shape == (4, 64, 64, 3)
  assert batch["image"].dtype == np.uint8 and batch["image"].std() > 10


def test_center_crop_takes_the_middle_square():
  image = np.arange(4 * 6).reshape(4, 6, 1).repeat(3, -1).astype(np.uint8)
  crop = np.asarray(preprocess_lib.center_crop(tf.constant(image)))
  np.testing.assert_array_equal(crop, image[:, 1:5])


def test_missing_coco_stops_with_both_ways(tmp_path):
  # The tests run offline (tests/offline): the download host is unreachable.
  config = coco_config.get_config()
  config.data.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(sources.DataNotFoundError) as error:
    sources.get_builder(config.data)
  message = str(error.value)
  assert '--config.data.coco_dir=PATH' in message and '38 GB' in message
  assert 'train2014/ (13 GB)' in message and 'internet' in message


def _mock_coco_captions(self, split, **kwargs):
  """coco_captions examples (random images, five captions each) for tfds.testing.mock_data."""
  del self, split, kwargs
  rng = np.random.default_rng(0)
  num = 6
  return tf.data.Dataset.from_tensor_slices({
      'image': rng.integers(0, 256, (num, 40, 48, 3), dtype=np.uint8),
      'image/id': np.arange(num, dtype=np.int64) + 100,
      'image/filename': [f'COCO_val2014_{i:012d}.jpg' for i in range(num)],
      'captions': {'id': np.arange(num * 5, dtype=np.int64).reshape(num, 5),
                   'text': [[f'a cat number {i} sitting on mat {k}' for k in range(5)]
                            for i in range(num)]},
  })


def test_tfds_coco_captions_path_under_mock_data(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'network_reachable', lambda *a: True)  # Mocked: no traffic.
  config = coco_config.get_config()
  config.data.data_dir = str(tmp_path)
  with tfds.testing.mock_data(as_dataset_fn=_mock_coco_captions):
    builder = sources.get_builder(config.data)
    assert builder.name == 'coco_captions'
    captions = captions_lib.read_captions(builder, 'train')
    assert len(captions.image_ids) == 6 and len(captions.texts[0]) == 5
    tokenizer = tokenizer_lib.train(captions.all_texts(), 64)
    table = captions_lib.TokenTable.build(captions, tokenizer, 20)
    config.data.image_size, config.data.shuffle_buffer = 32, 8
    batch = next(input_pipeline.train_dataset(builder, 'train', table, config.data, batch_size=2,
                                              seed=0).as_numpy_iterator())
  assert batch['image'].shape == (2, 32, 32, 3) and batch['tokens'].shape == (2, 20)
  assert set(tokenizer.decode(batch['tokens'])) <= set(captions.all_texts())


def test_training_without_data_stops_before_any_work(tmp_path):
  from jaxcap import train
  config = coco_config.get_config()
  config.data.data_dir = str(tmp_path / 'tfds')
  config.model.encoder_weights = None
  with pytest.raises(sources.DataNotFoundError, match='coco_dir'):
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert not (tmp_path / 'workdir' / 'checkpoints').exists()


def test_prepare_data_script_reports_splits_and_skips(coco_builder, tmp_path):
  _, config = coco_builder
  result = caption_folders.run_prepare_data(
      str(tmp_path), 'coco.py', f'--config.data.coco_dir={config.data.coco_dir}',
      f'--config.data.data_dir={config.data.data_dir}', '--config.data.image_size=32',
      '--config.batch_size=4', '--input_speed_batches=3')
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert 'train+restval: 7 images, 34 captions (per image: {3: 1, 5: 5, 6: 1})' in out, out
  assert 'val: 1 images (fewer than 100: its metrics will be noisy), 5 captions' in out
  assert 'test: 1 images (fewer than 100: its metrics will be noisy), 5 captions' in out
  assert 'Splits: the splits of dataset_coco.json' in out
  assert 'skipped (train): 2 x unreadable image' in out
  assert 'skipped (train): 1 x listed but missing from disk' in out
  assert 'skipped (all): 1 x empty caption' in out
  assert 'input pipeline:' in out and 'images/s' in out
  assert (tmp_path / 'tokenizer.model').exists()
