"""Up-Down on COCO: the attention decoder over the frozen InceptionV3's 8 x 8 grid, trained with
cross-entropy on cached grids (configs/coco_features.py's recipe with model.decoder='updown').

  python scripts/convert_weights.py --keras imagenet --output weights/inception_v3_notop
  python scripts/extract_features.py --config configs/coco_updown.py --workdir workdirs/coco_updown
  python scripts/train.py --config configs/coco_updown.py --workdir workdirs/coco_updown

The cache holds every image's grid: 123k images x 64 positions x 2048 channels x 2 bytes
(bfloat16), about 32 GB on disk. Resident training keeps the training split's grids on the
accelerators (about 29 GB in bfloat16, split over the devices); where they do not fit, use more
devices (docs/training.md, "Attention over the image grid").
"""

from configs import coco_features


def get_config():
  config = coco_features.get_config()
  config.model.decoder = 'updown'
  # Anderson et al.'s sizes: both LSTMs, the attention and the word embedding 512 wide (the
  # language LSTM's 1000 there; 512 as in shared/peers/torch_updown.py).
  config.model.embed_dim = 512
  config.model.lstm_size = 512
  config.model.attention_size = 512
  # Grids are 64 times an embedding: bfloat16 halves them on disk and on the devices.
  config.features.storage_dtype = 'bfloat16'
  config.model.dtype = 'bfloat16'
  return config
