"""Self-critical training of the relations run's Up-Down captioner, from its workdir.

  python scripts/train.py --config configs/relations.py --workdir workdirs/relations
  python scripts/train.py --config configs/relations_scst.py --workdir workdirs/relations_scst

configs/demo_scst.py's recipe on the cached grids of the relations run's trained encoder
(docs/training.md, "Attention over the image grid").
"""

from configs import demo_scst
from configs import relations


def get_config():
  config = demo_scst.get_config()
  config.scst.init_from = 'workdirs/relations'
  config.data = relations.get_config().data
  model = relations.get_config().model
  model.train_encoder = False
  config.model = model
  # CIDEr-D scores "a red square left of a blue circle" and the objects swapped nearly alike
  # (the same n-grams), so the policy gradient alone lets the relation drift: the references'
  # cross-entropy keeps it (docs/training.md).
  config.scst.xe_weight = 0.5
  # 500 steps of 32 images x 5 samples.
  config.num_train_steps = 500
  config.checkpoint_every_steps = 250
  config.eval_every_steps = 500
  return config
