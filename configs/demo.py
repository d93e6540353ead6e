"""The README demo: a captioner trained from scratch, encoder included, on a 2-core CPU in
minutes (README, "What the demo reaches").

  python scripts/train.py --config configs/demo.py --workdir workdirs/demo

Sized so that it learns within the time while the task still needs the image: a blind decoder
(`--config.model.encoder=zeros`) names almost no scene right.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 64
  config.num_train_steps = 1_500
  config.log_every_steps = 100
  # Evaluate once, at the end: each evaluation costs about 10 s of the 10-minute budget.
  config.eval_every_steps = 1_500
  config.checkpoint_every_steps = 500

  config.data.image_size = 64
  config.data.vocab_size = 128
  config.data.shapes.image_size = 64
  # 1 or 2 objects: scenes of 3 need several times the steps to name right.
  config.data.shapes.max_objects = 2
  config.data.shapes.train_size = 8_000
  config.data.shapes.val_size = 500
  config.data.shapes.test_size = 500

  # Half the default widths: about twice the steps/s on a 2-core CPU.
  config.model.small_cnn.features = (16, 32, 64, 128)
  # The first conv strided, batch norm and ReLU after each pool: no work at full resolution
  # after the first conv, and statistics of the pooled maps, faster and more accurate
  # (docs/benchmarks.md, "The demo on CPU").
  config.model.small_cnn.pool_before_norm = True
  config.model.small_cnn.strided_first_conv = True

  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 100
  return config
