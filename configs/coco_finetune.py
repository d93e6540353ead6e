"""COCO captions with InceptionV3 fine-tuned: random crops and flips, a lower learning rate.

  python scripts/train.py --config configs/coco_finetune.py --workdir workdirs/coco_finetune
"""

from configs import coco


def get_config():
  config = coco.get_config()
  config.model.train_encoder = True
  config.data.augment = True
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 2e-4
  return config
