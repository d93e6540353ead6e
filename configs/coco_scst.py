"""Self-critical training on COCO, from a cross-entropy run on cached features.
  python scripts/train.py --config configs/coco_features.py --workdir workdirs/coco_features
  python scripts/train.py --config configs/coco_scst.py --workdir workdirs/coco_scst
The recipe of self-critical.pytorch's FC model: learning rate 5e-5, 5 samples per image, the
mean reward of the other samples as the baseline, beam 3 at evaluation. The reward is CIDEr-D
against the Karpathy training references, computed on the device inside the step.
"""

from configs import coco_features


def get_config():
  config = coco_features.get_config()
  config.trainer = 'scst'
  config.scst.init_from = 'workdirs/coco_features'
  config.scst.num_samples = 5
  config.scst.baseline = 'mean_of_others'
  config.scst.max_len = config.data.max_len
  # The embeddings init_from's run cached: same encoder and images, so its fingerprint matches
  # and nothing is extracted again.
  config.features.cache_dir = 'workdirs/coco_features/features'
  # Images per step, each with 5 sampled captions (640 captions a step); 1,770 steps an epoch.
  config.batch_size = 128
  # About 20 epochs of the 113k training images.
  config.num_train_steps = 35_000
  config.resident.steps_per_call = 100
  config.log_every_steps = 500
  config.checkpoint_every_steps = 2_500
  config.eval_every_steps = 5_000
  config.optimizer.learning_rate = 5e-5
  config.optimizer.warmup_steps = 0
  config.optimizer.end_learning_rate_factor = 1.0
  config.decode.method = 'beam'
  config.decode.beam_size = 3
  return config
