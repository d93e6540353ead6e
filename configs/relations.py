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
  config.model.decoder = 'updown'
  return config
