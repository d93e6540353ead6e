"""Self-critical training of Up-Down on COCO, from a configs/coco_updown.py run.

  python scripts/train.py --config configs/coco_updown.py --workdir workdirs/coco_updown
  python scripts/train.py --config configs/coco_updown_scst.py --workdir workdirs/coco_updown_scst

configs/coco_scst.py's recipe (learning rate 5e-5, 5 samples per image, the mean of the others
as the baseline, CIDEr-D on the device, beam 3 at evaluation) on the cached grids.
"""

from configs import coco_scst
from configs import coco_updown


def get_config():
  config = coco_scst.get_config()
  updown = coco_updown.get_config()
  config.model = updown.model
  config.features.storage_dtype = updown.features.storage_dtype
  config.scst.init_from = 'workdirs/coco_updown'
  # The grids init_from's run cached: the same encoder and images, so nothing is extracted.
  config.features.cache_dir = 'workdirs/coco_updown/features'
  return config
