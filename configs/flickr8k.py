"""Show and Tell on Flickr8k (Karpathy's splits: 6,000 train, 1,000 val, 1,000 test images, five
captions each), the Show-and-Tell decoder on a frozen InceptionV3, as configs/coco.py.

  python scripts/convert_weights.py --keras imagenet --output weights/inception_v3_notop
  python scripts/train.py --config configs/flickr8k.py --workdir workdirs/flickr8k \
      --config.data.karpathy_json=/data/dataset_flickr8k.json \
      --config.data.image_dir=/data/Flicker8k_Dataset

dataset_flickr8k.json is in Karpathy's caption_datasets.zip; the images are the Flickr8k release.
"""

from configs import coco


def get_config():
  config = coco.get_config()
  data = config.data
  # Labels the dataset; it is built from karpathy_json and image_dir (jaxcap/data/karpathy.py).
  data.name = 'flickr8k'
  # Flickr8k has no restval.
  data.train_split = 'train'
  data.eval_splits = ('val', 'test')
  # Pieces trained on 30k captions, about a sixth of COCO's; rarer words are split.
  data.vocab_size = 5_000
  # 6,000 images fit in memory at 299 px (about 1.6 GB as uint8).
  data.cache_images = True

  # A smaller batch for a small dataset: about 107 passes over the images (one caption drawn
  # per image and step: about 21 over the captions), as coco.py's ~113.
  config.batch_size = 64
  config.num_train_steps = 10_000
  config.log_every_steps = 100
  # Every ~11 passes: a small dataset overfits early; watch val.
  config.eval_every_steps = 1_000
  config.checkpoint_every_steps = 1_000
  config.optimizer.warmup_steps = 500
  return config
