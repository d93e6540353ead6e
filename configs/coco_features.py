"""COCO with the frozen InceptionV3 encoded once: the decoder trains on cached embeddings that
stay on the accelerators, `resident.steps_per_call` steps per jitted call.

  python scripts/convert_weights.py --keras imagenet --output weights/inception_v3_notop
  python scripts/extract_features.py --config configs/coco_features.py \
      --workdir workdirs/coco_features
  python scripts/train.py --config configs/coco_features.py --workdir workdirs/coco_features

Same model and loss as configs/coco.py; checkpoints hold the decoder (the encoder comes from
`model.encoder_weights`), so scripts/caption.py and scripts/evaluate.py work on the workdir.
"""

from configs import coco


def get_config():
  config = coco.get_config()
  config.trainer = 'features'
  # A frozen encoder embeds each image the same way every epoch: that is what makes a cache valid.
  config.model.train_encoder = False
  # About 566k training captions: 4,400 steps an epoch at batch 128. Intervals are multiples of
  # resident.steps_per_call.
  config.resident.steps_per_call = 200
  config.log_every_steps = 1_000
  config.checkpoint_every_steps = 2_000
  config.eval_every_steps = 10_000
  return config
