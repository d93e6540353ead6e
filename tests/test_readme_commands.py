"""Every command that README.md and docs/*.md show runs, from workdirs that do not exist.

The commands are read from the documents (fenced `bash` blocks, `$ ` lines of `console` blocks,
and inline code that starts with `python`, `bash` or `.venv/bin/`), so an edited command is the
command tested. Each runs as written, as a subprocess in a fresh folder laid out like a checkout
(`scripts/`, `configs/`, `.venv` and `../shared` are links to the real ones), with the tiny sizes
the other tests use appended as overrides (the last flag wins), and with XLA's LLVM optimisation
off (`conftest.SCRIPT_XLA_FLAGS`: tiny runs are mostly compilation). What cannot exist here is stood
in for, and the output says so:
- COCO: `coco_captions` from tfds needs a 38 GB download, so COCO configs get
  `--config.data.coco_dir=` a COCO-format folder of real JPEG files (tests/caption_folders.py).
- The data folders the README names under `/data/` are test folders of the same layout (real
  JPEG files, JSON in the real schemas): `coco` (official COCO 2014 layout), `mine` (one
  annotation file, `captions.json`, and `images/`), `flickr8k` and `flickr30k` (Karpathy's
  JSON and the image folder of each release's name).
- Keras' ImageNet weights: a Keras InceptionV3 with random weights, saved as the legacy HDF5 file
  that Keras would have downloaded, lies in the command's `~/.keras/models` (HOME is a test
  folder), where Keras finds it instead of downloading.
- Other hosts: the coordinator address becomes 127.0.0.1 and a free port, `/shared/` a test
  folder, and the processes of one multi-host example run together on this machine.
- The install steps of the quick start and the test command itself (quick-start command 2) are
  what `.ci/run` runs: the test checks that `.ci/run` runs quick-start command 2 verbatim, and
  that command 1 installs the same package without the test extra.
- `benchmark.py --coco_like N` writes a COCO-like folder of 12 images instead of N (the
  appended tiny sizes).
- The peers in `../shared/peers` run when that folder exists (it is not part of this
  repository) and their framework is installed (torch is not a jaxcap dependency).
- `scripts/benchmark_gpu.sh` runs two of its runs (ONLY=), the bfloat16 programs no other
  command runs; its other runs are benchmark.py modes that the documents' commands run.
Benchmark commands run with TensorFlow unimportable, as on accelerator hosts without it (the
pipeline mode, tf.data's, aside). Outputs are checked where the documents say what they are
(caption lines and JSON, evaluation files and metrics against pycocoevalcap run directly,
benchmark JSON).

Each command line runs once, however often the documents show it once the tiny sizes are
appended. Commands that share a folder (a workdir they write or resume, an init_from run, a
feature cache) run in one test in the documents' order, after the command that converts the
weights they read (once per checkout: each xdist worker has one); every other command is a test
of its own, so pytest-xdist spreads them over the workers. Each test's report (what ran, what
stood in, the seconds) is printed at the end of the run.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import json
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from tests import caption_folders
from tests.conftest import SCRIPT_XLA_FLAGS
from tests.conftest import SUMMARY_PROPERTY

ROOT = pathlib.Path(__file__).resolve().parents[1]
# README.md, then docs/ in reading order: a command that reads a workdir follows the one that
# writes it.
DOCUMENTS = ('README.md', 'docs/data.md', 'docs/training.md', 'docs/evaluation.md',
             'docs/benchmarks.md', 'docs/design.md', 'docs/testing.md')
pytestmark = pytest.mark.slow

# The tiny sizes of tests/conftest.py's tiny_config, as overrides for any config of configs/.
_TINY_CONFIG = (
    '--config.batch_size=8', '--config.num_train_steps=2', '--config.log_every_steps=2',
    '--config.eval_every_steps=2', '--config.checkpoint_every_steps=2',
    '--config.data.vocab_size=64', '--config.data.shuffle_buffer=8',
    '--config.data.shapes.image_size=32', '--config.data.shapes.max_objects=2',
    '--config.data.shapes.train_size=64', '--config.data.shapes.val_size=12',
    '--config.data.shapes.test_size=12', '--config.model.small_cnn.features=(8, 16)',
    '--config.model.image_bottleneck=16', '--config.model.embed_dim=16',
    '--config.model.lstm_size=32', '--config.model.logit_bottleneck=16',
    '--config.model.attention_size=16',
    '--config.optimizer.warmup_steps=1', '--config.eval.batch_size=8',
    '--config.eval.num_printed_examples=1', '--config.features.batch_size=8',
    '--config.features.batches_per_part=1', '--config.resident.steps_per_call=2')
# InceptionV3 needs 75 pixels at least; small_cnn runs at the tests' 32.
_IMAGE_SIZE = {'inception_v3': 75}
_TINY_BENCHMARK = ('--batch_size', '4', '--steps', '1', '--warmup', '1', '--vocab_size', '64',
                   '--num_batches', '2', '--peak_matmul_size', '128', '--embedding_dim', '32',
                   '--checkpoint_every', '1', '--checkpoint_rounds', '1', '--coco_like', '12')
_TINY_PEER = {'keras_show_tell.py': ('--batch_size', '4', '--vocab_size', '64', '--steps', '1',
                                     '--warmup', '1'),
              'torch_show_tell.py': ('--batch_size', '4', '--vocab_size', '64', '--steps', '1',
                                     '--warmup', '1'),
              'torch_updown.py': ('--batch_size', '4', '--vocab_size', '64', '--features', '32',
                                  '--steps', '1', '--warmup', '1'),
              'keras_inception_infer.py': ('--batch_size', '1', '--steps', '1')}
_PEER_FRAMEWORK = {'keras_show_tell.py': 'keras', 'torch_show_tell.py': 'torch',
                   'torch_updown.py': 'torch',
                   'keras_inception_infer.py': 'keras'}
# scripts/benchmark_gpu.sh's runs that run here (ONLY=): bfloat16 programs that no other
# command runs, one of the frozen InceptionV3 and one of the resident decoder.
_GPU_RUNS = '^(train_frozen_bf16_b256|decoder_resident_bf16_b1024)$'
_INSTALL = re.compile(r'^(python3 -m venv \.venv|\.venv/bin/pip install .*)$')
_TIMEOUT_S = 600


@dataclasses.dataclass
class DocCommand:
  source: str  # 'README.md:13'
  text: str  # As written, continuation lines joined.


def _inline_commands(line: str) -> list[str]:
  return [span for span in re.findall(r'`([^`]+)`', line)
          if re.match(r'(python3? |bash |\.venv/bin/)', span)]


def read_commands(relative_path: str) -> list[DocCommand]:
  """The shell commands a markdown file shows, in order."""
  commands, fence, pending, pending_line = [], None, '', 0
  for number, line in enumerate((ROOT / relative_path).read_text().splitlines(), 1):
    fence_match = re.match(r'^```(\w*)', line)
    if fence_match:
      fence = None if fence is not None else fence_match.group(1)
      continue
    if fence == 'bash':
      stripped = line.strip()
      if not pending and (not stripped or stripped.startswith('#')):
        continue
      pending_line = pending_line if pending else number
      pending += stripped[:-1] + ' ' if stripped.endswith('\\') else stripped
      if not stripped.endswith('\\'):
        commands.append(DocCommand(f'{relative_path}:{pending_line}', ' '.join(pending.split())))
        pending = ''
    elif fence == 'console':
      if line.startswith('$ '):
        commands.append(DocCommand(f'{relative_path}:{number}', line[2:].strip()))
    elif fence is None:
      commands += [DocCommand(f'{relative_path}:{number}', c) for c in _inline_commands(line)]
  return commands


def _ci_command() -> str:
  lines = [line for line in (ROOT / '.ci' / 'run').read_text().splitlines()
           if line.strip() and not line.startswith('#') and not line.startswith(('set ', 'cd '))]
  assert len(lines) == 1, lines
  return lines[0].strip()


@dataclasses.dataclass
class Checkout:
  """A fresh folder laid out like the repository, where the commands run."""
  repo: pathlib.Path
  home: pathlib.Path
  tfds_dir: str
  coco_dir: str
  data: pathlib.Path  # Stands in for /data/.
  shared_storage: pathlib.Path
  results: pathlib.Path
  no_tensorflow: pathlib.Path
  # The sources ('README.md:128') of the commands that ran here without failing: a lane's weight
  # conversion (`Lane.first`) that another test ran here has left the weights the lane reads.
  ran: set[str] = dataclasses.field(default_factory=set)


def _legacy_keras_weights(path: pathlib.Path) -> None:
  """Keras' InceptionV3 without the top, random weights, in the legacy HDF5 layout of the
  ImageNet file Keras downloads."""
  code = (
      'import sys, h5py, keras\n'
      'from keras.src.legacy.saving import legacy_h5_format\n'
      'keras.utils.set_random_seed(0)\n'
      'model = keras.applications.InceptionV3(weights=None, include_top=False)\n'
      'with h5py.File(sys.argv[1], "w") as f:\n'
      '  legacy_h5_format.save_weights_to_hdf5_group(f, model)\n')
  path.parent.mkdir(parents=True, exist_ok=True)
  subprocess.run([sys.executable, '-c', code, str(path)], check=True, timeout=_TIMEOUT_S,
                 env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})


def _my_images(folder: pathlib.Path) -> None:
  """The README's my_images/: three colour scenes, a grayscale photo and a text file."""
  folder.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8)).save(folder / 'gray_128px.jpg')
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (64, 64, 3),
                                 dtype=np.uint8)).save(folder / f'scene{i}.png')
  (folder / 'readme.txt').write_text('not an image')


@pytest.fixture(scope='module')
def checkout(tmp_path_factory, data_dir) -> Checkout:
  base = tmp_path_factory.mktemp('readme')
  repo = base / 'repo'
  repo.mkdir()
  for name in ('scripts', 'configs', 'jaxcap', 'tests'):
    (repo / name).symlink_to(ROOT / name)
  (repo / '.venv').symlink_to(sys.prefix)
  if (ROOT.parent / 'shared').exists():
    (base / 'shared').symlink_to(ROOT.parent / 'shared')
  home = base / 'home'
  _legacy_keras_weights(
      home / '.keras' / 'models' / 'inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5')
  _my_images(repo / 'my_images')
  no_tensorflow = base / 'no_tensorflow' / 'tensorflow'
  no_tensorflow.mkdir(parents=True)
  (no_tensorflow / '__init__.py').write_text(
      "raise ImportError('TensorFlow is hidden: accelerator hosts run benchmarks without it')\n")
  data = base / 'data'
  mine = caption_folders.make_coco_format_dir(str(data / 'mine'), {'images': 20})
  os.replace(os.path.join(mine, 'annotations', 'captions_images.json'),
             os.path.join(mine, 'captions.json'))
  caption_folders.make_flickr8k_dir(str(data / 'flickr8k'))
  caption_folders.make_flickr8k_dir(str(data / 'flickr30k'), 'dataset_flickr30k.json',
                                    'flickr30k-images')
  return Checkout(repo, home, data_dir, caption_folders.make_coco_dir(str(data / 'coco')), data,
                  base / 'shared_storage', base / 'results', no_tensorflow.parent)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Plan:
  """How one documented command runs here."""
  command: DocCommand
  argv: list[str]
  env: dict[str, str]
  stand_in: str = ''  # What was stood in for, if anything.
  expected_returncode: int = 0
  json_path: pathlib.Path | None = None
  not_run: str = ''  # Why it is not run as a subprocess of this test.
  converts_for_lane: bool = False  # Runs first to convert the weights that its lane reads.


def _config_overrides(argv: list[str], checkout: Checkout) -> tuple[list[str], str]:
  """Tiny sizes for the config named by --config, and the COCO stand-in where needed."""
  config_path = pathlib.Path(argv[argv.index('--config') + 1])
  config = importlib.import_module(f'configs.{config_path.stem}').get_config()
  image_size = _IMAGE_SIZE.get(config.model.encoder, 32)
  extra = [*_TINY_CONFIG, f'--config.data.image_size={image_size}',
           f'--config.data.data_dir={checkout.tfds_dir}']
  if config.trainer == 'scst':  # Images per step: the COCO stand-in has 6 training images.
    extra.append('--config.batch_size=2')
  stand_in = ''
  if config.data.name == 'coco_captions' and not any(
      a.startswith('--config.data.coco_dir') for a in argv):
    extra.append(f'--config.data.coco_dir={checkout.coco_dir}')
    stand_in = 'COCO-format test folder for the tfds download'
  return extra, stand_in


def plan(command: DocCommand, checkout: Checkout) -> Plan:
  # One CPU device, as a user's machine has (conftest forces 8 for this process).
  env = {**os.environ, 'HOME': str(checkout.home), 'TF_CPP_MIN_LOG_LEVEL': '2',
         'XLA_FLAGS': SCRIPT_XLA_FLAGS,
         'PATH': f'{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}'}
  env.pop('KERAS_HOME', None)
  segments = [s.strip() for s in command.text.split('&&')]
  if '-m pytest' in command.text:
    return Plan(command, [], env, not_run='the test command: .ci/run runs it (checked below)')
  installs = [s for s in segments if _INSTALL.match(s)]
  segments = [s for s in segments if not _INSTALL.match(s)]
  assert len(segments) == 1, f'{command.source}: one command per line, please: {command.text}'
  argv = [str(checkout.home) + a[1:] if a.startswith('~/') else a
          for a in shlex.split(segments[0], comments=True)]
  stand_ins = ['install steps: run by .ci/run'] if installs else []
  if argv[0] in ('python', 'python3', '.venv/bin/python'):
    argv[0] = sys.executable
  program = pathlib.Path(argv[1]).name
  result = Plan(command, argv, env)
  if argv[1].startswith('../shared/peers/'):
    argv += _TINY_PEER[program]
  elif program in ('train.py', 'prepare_data.py', 'extract_features.py'):
    extra, stand_in = _config_overrides(argv, checkout)
    argv += extra
    stand_ins += [stand_in] if stand_in else []
    if any('=/data/' in a for a in argv):
      argv[:] = [a.replace('=/data/', f'={checkout.data}/') for a in argv]
      stand_ins.append('test folders of the same layout for /data/')
    for i, arg in enumerate(argv):
      if arg.startswith('--coordinator_address='):
        argv[i] = '--coordinator_address=127.0.0.1:{port}'
        stand_ins.append('this machine for the other hosts')
      if arg.startswith('/shared/'):
        argv[i] = str(checkout.shared_storage / arg[len('/shared/'):])
  elif program == 'benchmark.py':
    extra, _ = _config_overrides(argv, checkout)
    result.json_path = checkout.results / (re.sub(r'\W+', '_', command.text)[:200] + '.json')
    argv += [*extra, *_TINY_BENCHMARK, '--json', str(result.json_path)]
    if 'pipeline' not in argv:  # The pipeline mode is tf.data's: the one that needs TensorFlow.
      env['PYTHONPATH'] = f'{checkout.no_tensorflow}{os.pathsep}{env.get("PYTHONPATH", "")}'
  elif program == 'benchmark_gpu.sh':
    argv += [*_TINY_CONFIG, '--config.data.image_size=75', *_TINY_BENCHMARK]
    env['OUT'], env['ONLY'] = str(checkout.results / 'gpu'), _GPU_RUNS
    stand_ins.append(f'two of its runs (ONLY={_GPU_RUNS}): the others run benchmark.py\'s '
                     'modes that the commands above run')
    env['PYTHONPATH'] = f'{checkout.no_tensorflow}{os.pathsep}{env.get("PYTHONPATH", "")}'
  elif program == 'rehearse.py':
    argv += ['--scale', '0.0003', '--train_steps', '2',
             *(f'--set={o[2:]}' for o in _TINY_CONFIG if 'num_train_steps' not in o)]
    stand_ins.append("1/3,000 of COCO's counts and the tests' tiny sizes")
  elif program == 'convert_weights.py':
    if '--keras' in argv and argv[argv.index('--keras') + 1] == 'imagenet':
      stand_ins.append("random-weight Keras file in ~/.keras/models for Keras' ImageNet download")
    elif any(a.startswith(str(checkout.home)) for a in argv):
      stand_ins.append('random-weight Keras file for the ImageNet one')
  elif program == 'caption.py':
    result.expected_returncode = 1 if 'my_images/' in argv else 0  # readme.txt: see the README.
  elif program == 'serve.py':
    result.not_run = 'a server that runs until stopped: tests/test_serve.py starts it on 127.0.0.1'
  elif program == 'benchmark_serve.py':
    result.not_run = 'needs the server above: tests/test_serve.py runs it against its server'
  elif argv[0] == 'curl':
    result.not_run = "a request to the server above: tests/test_serve.py sends the API's requests"
  result.stand_in = '; '.join(stand_ins)
  return result


def _run_together(plans: list[Plan], checkout: Checkout) -> list[subprocess.CompletedProcess]:
  """Starts the plans' processes at once (a multi-host example), output to files (a full pipe
  would stall a process while its peer is waited for); waits for all of them."""
  port, logs = _free_port(), checkout.results / 'logs'
  logs.mkdir(parents=True, exist_ok=True)
  processes, files = [], []
  for p in plans:
    stem = logs / re.sub(r'\W+', '_', p.command.source + p.command.text)[:200]
    out, err = open(f'{stem}.out', 'w+'), open(f'{stem}.err', 'w+')
    files.append((out, err))
    processes.append(
        subprocess.Popen([a.replace('{port}', str(port)) for a in p.argv],
                         cwd=checkout.repo,
                         env=p.env,
                         stdout=out,
                         stderr=err,
                         text=True))
  results = []
  try:
    for p, process, (out, err) in zip(plans, processes, files):
      process.wait(timeout=_TIMEOUT_S)
      out.seek(0)
      err.seek(0)
      results.append(
          subprocess.CompletedProcess(p.argv, process.returncode, out.read(), err.read()))
  finally:
    for process, (out, err) in zip(processes, files):
      process.kill()
      out.close()
      err.close()
  return results


def _check_benchmark(p: Plan, result, checkout: Checkout) -> None:
  del result, checkout
  results = json.loads(p.json_path.read_text())
  _check_benchmark_json(results)


def _check_benchmark_json(results: dict) -> None:
  if results['mode'] == 'checkpoint':
    assert results['state_bytes'] > 0 and results['checkpoints'] > 0, results
    assert set(results['loop_seconds']) == {'none', 'sync', 'async'}, results
    assert all(seconds > 0 for seconds in results['loop_seconds'].values()), results
    return
  assert results['steps_per_sec'] > 0 and results['examples_per_sec'] > 0, results
  if results['mode'] == 'pipeline':
    assert results['images_per_sec_per_core'] > 0, results
  elif results['mode'] == 'cider':  # No matrix products: no MFU to report.
    assert 'mfu' not in results and results['scores_per_sec'] > 0, results
  else:
    assert results['flops_per_step'] > 0 and 0 < results['mfu'], results
  assert ('tokens_per_sec' in results) == (
      results['mode'] in ('train', 'decoder', 'decoder_resident'))


def _check_benchmark_gpu(p: Plan, result, checkout: Checkout) -> None:
  del p
  names = sorted(n for n in os.listdir(checkout.results / 'gpu') if n.endswith('.json'))
  runs = [
      line.split()[1]
      for line in (ROOT / 'scripts' / 'benchmark_gpu.sh').read_text().splitlines()
      if line.startswith('run ')
  ]
  chosen = sorted(f'{name}.json' for name in runs if re.search(_GPU_RUNS, name))
  assert len(chosen) == 2 and names == chosen and result.stdout.count('== ') == 2, (names,
                                                                                    result.stdout)
  for name in names:
    _check_benchmark_json(json.loads((checkout.results / 'gpu' / name).read_text()))


def _check_caption(p: Plan, result, checkout: Checkout) -> None:
  """Lines `path<TAB>caption` for the images, errors on stderr; or the JSON list."""
  del checkout
  args = p.argv[2:]
  paths = [a for i, a in enumerate(args) if not a.startswith('-') and
           (i == 0 or args[i - 1] not in ('--workdir', '--step', '--beam', '--temperature'))]
  if '--json' in p.argv:
    entries = json.loads(result.stdout)
    assert [e['path'] for e in entries] == paths and all(
        isinstance(e['caption'], str) for e in entries)
    assert all(e['log_prob'] < 0 for e in entries), entries
    for e in entries:  # A decoder that attends: an H x W map per generated token.
      if 'attention' in e:
        maps = np.asarray(e['attention'])
        assert maps.shape == (len(e['tokens']), *e['grid']), (maps.shape, e['grid'])
        np.testing.assert_allclose(maps.sum((1, 2)), 1.0, atol=1e-4)
    return
  lines = result.stdout.strip().split('\n')
  images = ('gray_128px.jpg', 'scene0.png', 'scene1.png', 'scene2.png')  # my_images/, by name.
  expected = [image for path in paths for image in (
      [f'my_images/{n}' for n in images] if path.rstrip('/') == 'my_images' else [path])]
  assert [line.split('\t')[0] for line in lines] == expected, lines
  assert all(len(line.split('\t')) == 2 for line in lines)
  if 'my_images/' in paths:  # The folder's text file is reported, the images still captioned.
    errors = [line for line in result.stderr.split('\n') if 'readme.txt' in line]
    assert len(errors) == 1 and 'not a readable image' in errors[0], result.stderr
    assert 'BytesIO' not in errors[0], errors[0]  # PIL's in-memory file is named by its path.


def _check_evaluate(p: Plan, result, checkout: Checkout) -> None:
  """The results file and the metrics file it prints, the metrics equal to pycocoevalcap's own
  on that results file."""
  from jaxcap import evaluate
  from jaxcap import workdir as workdir_lib
  from jaxcap.data import captions as captions_lib
  from jaxcap.data import sources
  match = re.search(r'^(\w+) step (\d+) (\w+): .*cider=.* \| (\S+)\.json( \S+\.html)?$',
                    result.stdout, re.M)
  assert match, result.stdout
  split, step, method, stem, page = match.groups()
  assert bool(page) == ('--gallery' in p.argv)
  if page:
    assert 'CIDEr-D' in (checkout.repo / page.strip()).read_text()
  assert split == p.argv[p.argv.index('--split') + 1]
  assert method == (f'beam{p.argv[p.argv.index("--beam") + 1]}' if '--beam' in p.argv else 'greedy')
  stem = checkout.repo / stem
  generated = json.loads(stem.with_name(stem.name + '.json').read_text())
  metrics = json.loads(stem.with_name(stem.name + '_metrics.json').read_text())
  assert metrics['step'] == int(step) and metrics['num_images'] == len(generated) > 0
  assert set(generated[0]) == {'image_id', 'caption'}
  workdir = str(checkout.repo / p.argv[p.argv.index('--workdir') + 1])
  config = workdir_lib.load_config(workdir)
  captions = captions_lib.read_captions(sources.get_builder(config.data), split)
  references = dict(zip(captions.image_ids.tolist(), captions.texts))
  direct = evaluate.coco_metrics(references, {g['image_id']: g['caption'] for g in generated})
  for key, value in direct.items():
    assert metrics[key] == pytest.approx(value, abs=1e-9), key
  assert 'scene_accuracy' in metrics and metrics['decode']['method'] == method.rstrip('0123456789')


def _check_rehearse(p: Plan, result, checkout: Checkout) -> None:
  """Every phase ran and was measured, and left what it makes: the final test report on the
  best checkpoint, self-critical training's log, the gallery, the folder's captions."""
  workdir = checkout.repo / p.argv[p.argv.index('--workdir') + 1]
  phases = json.loads((workdir / 'phases.json').read_text())
  assert len(phases) == 9 and all(ph['seconds'] > 0 for ph in phases), phases
  assert all(ph['peak_rss_mb'] > 50 for ph in phases[1:]), phases
  assert all(f'| {ph["name"]} |' in result.stdout for ph in phases), result.stdout
  for run in ('show_tell', 'updown', 'scst'):
    records = [json.loads(line) for line in (workdir / run / 'metrics.jsonl').open()]
    test, = [r for r in records if r['split'] == 'test']
    assert test['num_images'] >= 1 and 'checkpoint_step' in test, test
  assert list((workdir / 'show_tell' / 'eval').glob('test_step*_beam3.html'))
  folder, = workdir.glob('folder_[0-9]*')
  lines = (workdir / 'folder_captions.tsv').read_text().splitlines()
  assert len(lines) == len(list(folder.iterdir())) and all('\t' in line for line in lines)


_CHECKS = {'benchmark.py': _check_benchmark, 'benchmark_gpu.sh': _check_benchmark_gpu,
           'caption.py': _check_caption, 'evaluate.py': _check_evaluate,
           'rehearse.py': _check_rehearse}


def _coordinator(p: Plan) -> str | None:
  match = re.search(r'--coordinator_address=(\S+)', p.command.text)
  return match and match.group(1)


def _groups(plans: list[Plan]) -> list[list[Plan]]:
  """Consecutive processes of one multi-host example form one group; others are alone."""
  groups: list[list[Plan]] = []
  for p in plans:
    processes = next((int(a.split('=')[1]) for a in p.argv if a.startswith('--num_processes=')), 1)
    if processes > 1 and groups and _coordinator(groups[-1][0]) == _coordinator(p) and \
        len(groups[-1]) < processes:
      groups[-1].append(p)
    else:
      groups.append([p])
  return groups


def _not_run(p: Plan, checkout: Checkout) -> str:
  """Why a planned command cannot run here, or need not ('' if it runs)."""
  if p.converts_for_lane and p.command.source in checkout.ran:
    return 'ran in this checkout before (another test): the weights are there'
  if p.not_run or not p.argv[1].startswith('../shared/peers/'):
    return p.not_run
  framework = _PEER_FRAMEWORK[pathlib.Path(p.argv[1]).name]
  if not (checkout.repo.parent / p.argv[1][3:]).exists():
    return f'{p.argv[1]} is not beside this checkout (the peers are not part of it)'
  if subprocess.run([sys.executable, '-c', f'import {framework}'], capture_output=True).returncode:
    return f'{framework} is not installed (a peer\'s framework, not a jaxcap dependency)'
  return ''


def _run_in_order(plans: list[Plan], checkout: Checkout, report) -> list[str]:
  """Runs the plans' groups one after the other; returns the failures."""
  failures = []
  for group in _groups(plans):
    for p in group:
      p.not_run = _not_run(p, checkout)
      if p.not_run:
        report(f'  [not run] {p.command.source}: {p.command.text}\n      why: {p.not_run}')
    runnable = [p for p in group if not p.not_run]
    if not runnable:
      continue
    start = time.perf_counter()
    results = _run_together(runnable, checkout)
    seconds = time.perf_counter() - start
    for p, result in zip(runnable, results):
      problem = ''
      if result.returncode != p.expected_returncode:
        problem = f'exit {result.returncode} (expected {p.expected_returncode})'
      else:
        try:
          _CHECKS.get(pathlib.Path(p.argv[1]).name, lambda *_: None)(p, result, checkout)
        except (AssertionError, KeyError, ValueError, OSError) as error:
          problem = f'output check failed: {error!r}'[:3000]
      lines = [
          f'  [{"FAILED" if problem else "ok"} {seconds:.0f}s] {p.command.source}: {p.command.text}'
      ]
      lines += [f'      stand-in: {p.stand_in}'] if p.stand_in else []
      lines.append(f'      ran: {shlex.join(p.argv)}')
      report('\n'.join(lines))
      if not problem:
        checkout.ran.add(p.command.source)
      else:
        failures.append(f'{p.command.source}: {p.command.text}\n  {problem}\n'
                        f'{result.stdout[-1500:]}\n{result.stderr[-3000:]}')
  return failures


# Planning at collection, against a checkout of placeholder paths: the same final command line
# runs once; commands that share a folder they write or resume (a workdir, an init_from run, a
# feature cache) run in one test, in the documents' order; a command that reads converted weights
# runs after the command that converts them, in its own test; the others run in tests of their
# own, which pytest-xdist spreads over the workers (each worker has its own checkout).
_PLACEHOLDER = Checkout(
    repo=pathlib.Path('/checkout/repo'),
    home=pathlib.Path('/checkout/home'),
    tfds_dir='/checkout/tfds',
    coco_dir='/checkout/data/coco',
    data=pathlib.Path('/checkout/data'),
    shared_storage=pathlib.Path('/checkout/shared_storage'),
    results=pathlib.Path('/checkout/results'),
    no_tensorflow=pathlib.Path('/checkout/no_tensorflow'))
_TRAINS = ('train.py', 'extract_features.py', 'prepare_data.py')


def _flags(argv: list[str]) -> tuple[tuple[str, ...], dict[str, str]]:
  """(positional arguments, {flag: value}) of a command line, the last of a repeated flag
  winning as it does for absl."""
  positional, flags, i = [], {}, 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--') and '=' in arg:
      name, value = arg.split('=', 1)
    elif arg.startswith('--') and i + 1 < len(argv) and not argv[i + 1].startswith('--'):
      name, value = arg, argv[i + 1]
      i += 1
    elif arg.startswith('--'):
      name, value = arg, 'true'
    else:
      positional.append(arg)
      i += 1
      continue
    flags[name] = value
    i += 1
  return tuple(positional), flags


def _effective(p: Plan) -> tuple:
  """What a planned command does: its arguments and its flags' final values."""
  positional, flags = _flags([a for a in p.argv if a != str(p.json_path)])
  return positional, tuple(sorted(flags.items()))


def _folders(p: Plan) -> tuple[set[str], set[str]]:
  """(folders the command writes or resumes, converted weights it reads), as absolute paths."""
  _, flags = _flags(p.argv)
  written, weights = {flags[f] for f in ('--workdir', '--output') if f in flags}, set()
  if pathlib.Path(p.argv[1]).name in _TRAINS:
    config = importlib.import_module(f'configs.{pathlib.Path(flags["--config"]).stem}').get_config()
    value = lambda field: flags.get(f'--config.{field}',
                                    str(functools.reduce(getattr, field.split('.'), config)))
    written |= {value('scst.init_from'), value('features.cache_dir')}
    if pathlib.Path(p.argv[1]).name != 'prepare_data.py':  # It reads no weights.
      weights.add(value('model.encoder_weights'))
  absolute = lambda folders: {os.path.normpath(os.path.join(str(_PLACEHOLDER.repo), f))
                              for f in folders if f and f != 'None'}
  return absolute(written), absolute(weights)


def _overlap(a: set[str], b: set[str]) -> bool:
  return any(x == y or x.startswith(y + os.sep) or y.startswith(x + os.sep) for x in a for y in b)


@dataclasses.dataclass
class Lane:
  """Commands that run in one test, in order."""
  commands: list[DocCommand]
  written: set[str]
  weights: set[str]
  notes: list[str] = dataclasses.field(default_factory=list)
  name: str = ''  # The test's id: where its first own command is written.
  first: list[DocCommand] = dataclasses.field(default_factory=list)  # Weight conversions.


def _lanes() -> tuple[list[Lane], list[DocCommand]]:
  """The documents' commands in lanes, and the test command (quick start 2, run by .ci/run)."""
  commands = [c for path in DOCUMENTS for c in read_commands(path)]
  order = {id(c): i for i, c in enumerate(commands)}
  lanes: list[Lane] = []
  first_of: dict[tuple, DocCommand] = {}
  ci, same = [], []
  for command in commands:
    p = plan(command, _PLACEHOLDER)
    if not p.argv:
      ci.append(command)
      continue
    key = _effective(p)
    if key in first_of:
      same.append((first_of[key], f'[same command] {command.source} runs as '
                                  f'{first_of[key].source}: {command.text}'))
      continue
    first_of[key] = command
    lane = Lane([command], *_folders(p))
    for other in [x for x in lanes if _overlap(x.written, lane.written)]:
      lanes.remove(other)
      lane = Lane(sorted(other.commands + lane.commands, key=lambda c: order[id(c)]),
                  other.written | lane.written, other.weights | lane.weights)
    lanes.append(lane)
  # Converted weights: their converting command (the first one) runs first in each lane that
  # reads them.
  for lane in lanes:
    lane.name = lane.commands[0].source
    for folder in sorted(lane.weights - lane.written):
      producer = next(x for x in lanes if folder in x.written).commands[0]
      lane.notes.append(f'[first] {producer.source} converts the weights that the lane reads')
      lane.commands.insert(0, producer)
      lane.first.append(producer)
  for first, note in same:
    next(x for x in lanes if first in x.commands).notes.append(note)
  names = collections.Counter()
  for lane in lanes:  # Two inline commands can share a line: the second gets ' (2)'.
    names[lane.name] += 1
    lane.name += f' ({names[lane.name]})' if names[lane.name] > 1 else ''
  # The longest first (more commands, more time), so that xdist starts them first.
  return sorted(lanes, key=lambda x: -len(x.commands)), ci


LANES, CI_COMMANDS = _lanes()


def test_every_document_is_read_and_the_readme_is_one_page():
  """Each docs/*.md is in DOCUMENTS (its commands run); the README stays short; no section is
  named after an issue or a commit (history stays in git)."""
  assert set(DOCUMENTS[1:]) == {f'docs/{p.name}' for p in (ROOT / 'docs').glob('*.md')}
  assert len((ROOT / 'README.md').read_text().splitlines()) <= 250
  for path in DOCUMENTS:
    in_fence = False
    for line in (ROOT / path).read_text().splitlines():
      in_fence ^= line.startswith('```')
      if line.startswith('#') and not in_fence:
        assert not re.search(r'\b[Ii]ssue\b|\b[0-9a-f]{7,40}\b', line), (path, line)


def test_quick_start_is_what_ci_runs():
  """Quick-start command 2 is .ci/run's; command 1 installs the same package, test extra aside."""
  texts = [c.text for path in DOCUMENTS for c in read_commands(path)]
  quick_install, quick_test = texts[0], texts[1]
  assert [c.text for c in CI_COMMANDS] == [quick_test]
  assert quick_test == _ci_command(), (quick_test, _ci_command())
  install_1 = [s.strip() for s in quick_install.split('&&')][:2]
  install_2 = [s.strip() for s in quick_test.split('&&')][:2]
  assert install_1 == [install_2[0], install_2[1].replace(" -e '.[test]'", ' -e .')], install_1
  commands = [c for lane in LANES for c in lane.commands]
  assert len({id(c) for c in commands}) >= 25, [c.text for c in commands]


@pytest.mark.parametrize('lane', [
    pytest.param(lane, id=lane.name, marks=pytest.mark.xdist_group(f'readme {lane.name}'))
    for lane in LANES])
def test_documented_commands_run(lane, checkout, record_property):
  plans = [plan(command, checkout) for command in lane.commands]
  for p in plans:
    p.converts_for_lane = any(p.command is c for c in lane.first)
  lines = [f'{len(plans)} command(s) in document order; seconds are wall time:']
  failures = _run_in_order(plans, checkout, lines.append)
  lines += [f'  {note}' for note in lane.notes]
  # The report is printed at the end of the run by tests/conftest.py (pytest_terminal_summary).
  record_property(SUMMARY_PROPERTY, '\n'.join(lines))
  assert not failures, '\n\n'.join(failures)
