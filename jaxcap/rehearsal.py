"""The main job rehearsed at COCO's counts: a COCO-like dataset of Karpathy's split sizes, then
every phase of the job run by its own script, each one's wall time and peak memory recorded.

`run(workdir, scale)` is what `scripts/rehearse.py` and its test call. The dataset has COCO's
shape where it matters for time and memory: 123,287 images (113,287 to train, 5,000 to validate,
5,000 to test) at `scale`, five captions each, words drawn from a ~10k-word vocabulary with
Zipf's frequencies and caption lengths like COCO's (mean ~10.5 words). Each image is a small
JPEG whose colour names the caption's first noun, so the model has something to learn.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import io
import json
import os
import subprocess
import sys
import time

import numpy as np

# Karpathy's split of COCO 2014: image counts per split.
KARPATHY_SPLITS = {'train': 82_783, 'restval': 30_504, 'val': 5_000, 'test': 5_000}
VOCABULARY = 10_000
CAPTIONS_PER_IMAGE = 5
CAPTION_FOLDER_IMAGES = 50_000  # caption.py's folder, at full scale.
_COLOURS = {'red': (200, 40, 40), 'green': (40, 170, 60), 'blue': (40, 70, 200),
            'yellow': (220, 200, 40), 'purple': (140, 50, 160), 'orange': (240, 130, 30),
            'white': (235, 235, 235), 'black': (25, 25, 25)}
_NOUNS = ('man', 'woman', 'dog', 'cat', 'bus', 'train', 'plate', 'bird')
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _words(rng: np.random.Generator) -> np.ndarray:
  """A vocabulary of made-up words (letters only, 2-9 long), distinct."""
  letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
  words: set[str] = set()
  while len(words) < VOCABULARY:
    length = int(rng.integers(2, 10))
    words.add(''.join(rng.choice(letters, length)))
  return np.array(sorted(words))


def _jpeg(colour: tuple[int, int, int], rng: np.random.Generator, size: int) -> bytes:
  from PIL import Image
  pixels = np.clip(np.array(colour, np.float32) + rng.normal(0, 25, (size, size, 3)), 0, 255)
  buffer = io.BytesIO()
  Image.fromarray(pixels.astype(np.uint8)).save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def write_dataset(root: str, scale: float = 1.0, image_size: int = 40,
                  seed: int = 0) -> dict[str, int]:
  """Writes ROOT/dataset_coco.json (Karpathy's schema) and ROOT/images/, returns the counts.

  Memory is one split's entries at a time in the JSON list; images are written as made."""
  rng = np.random.default_rng(seed)
  words = _words(rng)
  zipf = 1.0 / np.arange(1, VOCABULARY + 1)
  zipf /= zipf.sum()
  colours, nouns = list(_COLOURS), list(_NOUNS)
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  images, image_id, sentence_id, counts = [], 0, 0, {}
  for split, full_count in KARPATHY_SPLITS.items():
    counts[split] = max(1, round(full_count * scale))
    for _ in range(counts[split]):
      colour, noun = int(rng.integers(len(colours))), int(rng.integers(len(nouns)))
      name = f'{image_id:06d}.jpg'
      with open(os.path.join(root, 'images', name), 'wb') as f:
        f.write(_jpeg(_COLOURS[colours[colour]], rng, image_size))
      sentences = []
      for _ in range(CAPTIONS_PER_IMAGE):
        # COCO: 10.5 words a caption on average, 8 to 16 for most, a few up to 50.
        length = int(np.clip(np.round(rng.gamma(9.0, 0.9)) + 2, 6, 40))
        tail = words[rng.choice(VOCABULARY, length - 3, p=zipf)]
        text = ' '.join(['a', colours[colour], nouns[noun], *tail])
        sentences.append({'raw': text, 'sentid': sentence_id})
        sentence_id += 1
      images.append({'filename': name, 'split': split, 'imgid': image_id, 'cocoid': image_id,
                     'sentences': sentences})
      image_id += 1
  with open(os.path.join(root, 'dataset_coco.json'), 'w') as f:
    json.dump({'dataset': 'coco', 'images': images}, f)
  return {**counts, 'images': image_id, 'captions': sentence_id}


@dataclasses.dataclass
class Phase:
  name: str
  seconds: float
  peak_rss_mb: float
  command: str


def _run(name: str, argv: Sequence[str], log_dir: str) -> Phase:
  """Runs `argv` as its own process; its wall time and peak resident memory (wait4's maxrss)."""
  start = time.perf_counter()
  with open(os.path.join(log_dir, f'{name}.log'), 'w') as log:
    process = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, cwd=_ROOT)
    _, status, usage = os.wait4(process.pid, 0)
  process.returncode = os.waitstatus_to_exitcode(status)
  seconds = time.perf_counter() - start
  if process.returncode:
    raise RuntimeError(f'{name} failed (exit {process.returncode}); see {log.name}')
  command = ' '.join(os.path.relpath(a, _ROOT) if a.startswith(_ROOT) else a for a in argv[1:])
  return Phase(name, seconds, usage.ru_maxrss / 1024, command)


def run(workdir: str, scale: float = 1.0, *, train_steps: int | None = None,
        overrides: Sequence[str] = ()) -> list[Phase]:
  """Writes the dataset at `scale` (once; kept in WORKDIR/data), then runs each phase of the main
  job on it with configs/rehearsal.py; returns the phases as they ran (also written to
  WORKDIR/phases.json). `overrides` are more `--config.FIELD=VALUE` flags."""
  workdir = os.path.abspath(workdir)  # The phases run from the repository's root.
  os.makedirs(workdir, exist_ok=True)
  data, logs = os.path.join(workdir, 'data'), os.path.join(workdir, 'logs')
  os.makedirs(logs, exist_ok=True)
  phases: list[Phase] = []
  start = time.perf_counter()
  if not os.path.exists(os.path.join(data, 'dataset_coco.json')):
    counts = write_dataset(data, scale)
    phases.append(Phase('write the COCO-like files', time.perf_counter() - start, 0.0,
                        f'{counts["images"]:,} images, {counts["captions"]:,} captions'))
  python, scripts = sys.executable, os.path.join(_ROOT, 'scripts')
  data_flags = [f'--config.data.karpathy_json={os.path.join(data, "dataset_coco.json")}',
                f'--config.data.image_dir={os.path.join(data, "images")}',
                f'--config.data.data_dir={os.path.join(workdir, "tfds")}',
                *([f'--config.num_train_steps={train_steps}'] if train_steps else []),
                *overrides]
  config = ['--config', os.path.join(_ROOT, 'configs', 'rehearsal.py')]
  show_tell, updown, scst = (os.path.join(workdir, n) for n in ('show_tell', 'updown', 'scst'))
  script = lambda name: os.path.join(scripts, name)
  steps = [
      ('dataset build, tokenizer, split reports',
       [python, script('prepare_data.py'), *config, '--workdir', show_tell, *data_flags]),
      ('feature cache, pooled (all splits)',
       [python, script('extract_features.py'), *config, '--workdir', show_tell, *data_flags]),
      ('resident training, show_tell (periodic validation, final test report with beam 3)',
       [python, script('train.py'), *config, '--workdir', show_tell, *data_flags]),
      ('feature cache, grid (all splits)',
       [python, script('extract_features.py'), *config, '--workdir', updown, *data_flags,
        '--config.model.decoder=updown']),
      ('resident training, updown (periodic validation, final test report with beam 3)',
       [python, script('train.py'), *config, '--workdir', updown, *data_flags,
        '--config.model.decoder=updown']),
      # 100 steps: its step's cost does not grow with the data (2.8 s on 2 cores), its setup
      # (the references' n-gram tables, the placement) does.
      (f'self-critical training from show_tell ({train_steps or 100} steps)',
       [python, script('train.py'), *config, '--workdir', scst, *data_flags,
        *[f'--config.{field}=100' for field in ('num_train_steps', 'eval_every_steps',
                                                 'checkpoint_every_steps', 'log_every_steps')
          if not train_steps],
        '--config.trainer=scst', f'--config.scst.init_from={show_tell}',
        f'--config.features.cache_dir={os.path.join(show_tell, "features")}',
        '--config.optimizer.learning_rate=5e-5', '--config.optimizer.warmup_steps=0']),
      ('evaluate.py test split, beam 3, gallery of every test image',
       [python, script('evaluate.py'), '--workdir', show_tell, '--split', 'test', '--gallery',
        f'--gallery_images={KARPATHY_SPLITS["test"]}']),
  ]
  for name, argv in steps:
    phases.append(_run(name, argv, logs))
    _write(workdir, phases)
  folder = _caption_folder(workdir, data, max(1, round(CAPTION_FOLDER_IMAGES * scale)))
  output = os.path.join(workdir, 'folder_captions.tsv')
  if os.path.exists(output):
    os.remove(output)
  phases.append(_run(f'caption.py over a folder of {len(os.listdir(folder)):,} images',
                     [python, script('caption.py'), '--workdir', show_tell, '--output', output,
                      folder], logs))
  _write(workdir, phases)
  return phases


def _caption_folder(workdir: str, data: str, count: int) -> str:
  """A folder of `count` of the dataset's images (links)."""
  folder = os.path.join(workdir, f'folder_{count}')
  if not os.path.isdir(folder):
    os.makedirs(folder)
    names = sorted(os.listdir(os.path.join(data, 'images')))
    for name in names[:count]:
      os.symlink(os.path.join(data, 'images', name), os.path.join(folder, name))
  return folder


def _write(workdir: str, phases: list[Phase]) -> None:
  with open(os.path.join(workdir, 'phases.json'), 'w') as f:
    json.dump([dataclasses.asdict(p) for p in phases], f, indent=1)
