"""The main job: Show and Tell on COCO captions 2014 (Karpathy's splits), frozen InceptionV3.

  python scripts/convert_weights.py --keras imagenet --output weights/inception_v3_notop
  python scripts/train.py --config configs/coco.py --workdir workdirs/coco
  # With COCO already on disk (official layout), no download:
  python scripts/train.py --config configs/coco.py --workdir workdirs/coco \
      --config.data.coco_dir=/data/coco

See the README for disk space, time and the weights step.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 128
  # About 113 passes over the 113k train+restval images (one caption drawn per image and step:
  # about 23 over their 566k captions).
  config.num_train_steps = 100_000
  config.log_every_steps = 200
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 2_000

  data = config.data
  data.name = 'coco_captions'
  # Karpathy's splits: train + restval for training, val for periodic evaluation, test last.
  data.train_split = 'train+restval'
  data.eval_splits = ('val', 'test')
  data.image_size = 299
  data.max_len = 20
  data.vocab_size = 10_000
  # 113k images at 299 px do not fit in memory.
  data.cache_images = False

  model = config.model
  model.encoder = 'inception_v3'
  model.train_encoder = False
  # Written by scripts/convert_weights.py (README, "Pretrained InceptionV3").
  model.encoder_weights = 'weights/inception_v3_notop'
  # Keras' value: the converted moving statistics are used as they are while frozen.
  model.bn_momentum = 0.99
  # NIC and the FC model both need decoder dropout on COCO to not overfit.
  model.dropout = 0.5

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 1_000
  config.eval.batch_size = 256
  # Periodic validation of 5,000 images scores CIDEr-D on the device (`cider_d`, over token
  # ids): pycocoevalcap's set takes seconds of host time per evaluation while the accelerators
  # wait (docs/benchmarks.md, "The main job at COCO's scale"). The best checkpoint is chosen by
  # it; the final test report and scripts/evaluate.py have pycocoevalcap's metrics.
  config.eval.periodic_metrics = 'device'
  config.best_checkpoint.metric = 'cider_d'
  return config
