"""Self-critical training of the README demo's captioner, from the demo's workdir.
  python scripts/train.py --config configs/demo.py --workdir workdirs/demo
  python scripts/train.py --config configs/demo_scst.py --workdir workdirs/demo_scst
The demo's encoder stays at its trained weights: its embeddings are cached once, and the
decoder trains on the device-computed CIDEr-D of its sampled captions (docs/training.md,
"Self-critical training").
"""

from configs import demo


def get_config():
  config = demo.get_config()
  config.trainer = 'scst'
  config.scst.init_from = 'workdirs/demo'
  config.scst.num_samples = 5
  config.scst.baseline = 'mean_of_others'
  # Self-critical training runs on the cached embeddings of the frozen encoder.
  config.model.train_encoder = False
  # Images per step, each with 5 samples: 160 captions. 1,100 steps: 4m45s on a 2-core Zen 3,
  # the wall time of the control (300 more cross-entropy steps of the demo, README).
  config.batch_size = 32
  config.num_train_steps = 1_100
  config.resident.steps_per_call = 50
  config.log_every_steps = 50
  config.checkpoint_every_steps = 550
  config.eval_every_steps = 1_100
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 20
  config.optimizer.end_learning_rate_factor = 1.0
  return config
