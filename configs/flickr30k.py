"""Show and Tell on Flickr30k (Karpathy's splits: 29,000 train, 1,014 val, 1,000 test images,
five captions each), the Show-and-Tell decoder on a frozen InceptionV3, as configs/coco.py.

  python scripts/convert_weights.py --keras imagenet --output weights/inception_v3_notop
  python scripts/train.py --config configs/flickr30k.py --workdir workdirs/flickr30k \
      --config.data.karpathy_json=/data/dataset_flickr30k.json \
      --config.data.image_dir=/data/flickr30k-images

dataset_flickr30k.json is in Karpathy's caption_datasets.zip; the images are the Flickr30k release.
"""

from configs import flickr8k


def get_config():
  config = flickr8k.get_config()
  config.data.name = 'flickr30k'
  # 145k training captions, as coco.py.
  config.data.vocab_size = 10_000
  # 29,000 images at 299 px (about 7.8 GB as uint8) are read from disk each pass instead.
  config.data.cache_images = False

  # About 110 passes over the images (about 22 over the captions), as coco.py's ~113.
  config.batch_size = 128
  config.num_train_steps = 25_000
  config.log_every_steps = 200
  # Every ~11 passes.
  config.eval_every_steps = 2_500
  config.checkpoint_every_steps = 2_500
  config.optimizer.warmup_steps = 1_000
  return config
