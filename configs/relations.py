"""The demo's recipe on relational scenes, with the decoder that attends over the image grid.

  python scripts/train.py --config configs/relations.py --workdir workdirs/relations

Every scene holds two different objects, and its captions say where one is relative to the
other ("a small red square to the left of a big blue circle"). Evaluation reports
`relation_accuracy` (objects and relation right) next to `scene_accuracy` (objects right).
`--config.model.decoder=show_tell` is the same run without attention (docs/training.md,
"Attention over the image grid").
"""

from configs import demo


def get_config():
  config = demo.get_config()
  config.data.shapes.relations = True
  # Room for the relation words: at 128 pieces a fifth of the captions outgrow max_len.
  config.data.vocab_size = 256
  config.model.decoder = 'updown'
  # Two LSTMs and attention cost about three times the demo's one LSTM of 300 per word: these
  # sizes keep the run near the demo's time (docs/benchmarks.md).
  config.model.lstm_size = 160
  config.model.attention_size = 64
  # Pooled CNN features say what is there, not where: without the positions the decoder names
  # the relation's axis but not its direction (docs/training.md).
  config.model.grid_coordinates = True
  return config
