"""The main job at COCO's counts on a small machine: configs/coco_features.py's recipe (cached
features, resident decoder training, periodic validation, the final report with beam search)
with the small CNN at 32 x 32 pixels, on the COCO-like dataset that `scripts/rehearse.py` writes
(123,287 images in Karpathy's splits, five captions each, a ~10k-word vocabulary).

  python scripts/rehearse.py --workdir workdirs/rehearsal --scale 0.1

runs every phase with this config and records each one's time and peak memory. The data paths
(`data.karpathy_json`, `data.image_dir`, `data.data_dir`) are set by the script.
"""

from configs import coco_features


def get_config():
  config = coco_features.get_config()
  config.data.name = 'coco_rehearsal'
  # Small images and a small encoder: the counts are COCO's, the pixels are not.
  config.data.image_size = 32
  config.model.encoder = 'small_cnn'
  config.model.encoder_weights = None
  config.model.small_cnn.features = (16, 32, 64)
  config.model.bn_momentum = 0.9
  # A short run: the phases, not the model, are what is measured.
  config.num_train_steps = 400
  config.resident.steps_per_call = 100
  config.log_every_steps = 100
  config.checkpoint_every_steps = 200
  # One periodic validation halfway, then the last step's and the final report.
  config.eval_every_steps = 200
  config.decode.method = 'beam'
  config.decode.beam_size = 3
  config.eval.batch_size = 500
  config.features.batch_size = 1000
  return config
