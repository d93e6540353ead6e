"""Shared fixtures: a tiny built-in dataset and a tiny model config, on 8 forced CPU devices."""

import os

# XLA flags of the tests' processes: LLVM's optimisation off. Tiny models spend most of their
# time compiling, which this cuts by a quarter to a half; XLA's own passes (fusion, layout,
# sharding) are those users get, only the machine code rounds slightly differently (the tests
# that compare runs across device counts compile as users do). Scripts that tests run as whole
# commands get these flags alone (one CPU device, as a user's machine).
SCRIPT_XLA_FLAGS = '--xla_backend_optimization_level=0'
# Before JAX initialises: 8 CPU devices so sharded code runs as on a multi-device host.
os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count=8 {SCRIPT_XLA_FLAGS}')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# Offline, for this process and every process a test starts: IP connections only to this
# machine (tests/offline/sitecustomize.py, found on PYTHONPATH by each new interpreter). The
# repository root is there too: config files that tests write import `tests.conftest`.
_OFFLINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'offline')
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ['PYTHONPATH'] = os.pathsep.join(
    p for p in (_OFFLINE, _ROOT, os.environ.get('PYTHONPATH')) if p)
import pathlib  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, _OFFLINE)
import pytest  # noqa: E402
import sitecustomize  # noqa: E402,F401  (imported for its effect)

from configs import default  # noqa: E402


def tiny_config(data_dir: str):
  """The default config shrunk so a few steps, an evaluation and a resume take seconds."""
  config = default.get_config()
  config.batch_size = 16
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 2
  config.data.data_dir = data_dir
  config.data.image_size = 32
  config.data.max_len = 24
  config.data.vocab_size = 128
  config.data.shuffle_buffer = 64
  shapes = config.data.shapes
  shapes.image_size, shapes.max_objects = 32, 2
  shapes.train_size, shapes.val_size, shapes.test_size = 64, 12, 12
  model = config.model
  model.small_cnn.features = (8, 16)
  model.image_bottleneck, model.embed_dim, model.lstm_size, model.logit_bottleneck = 16, 16, 32, 16
  model.attention_size = 16
  config.optimizer.warmup_steps = 1
  config.eval.batch_size = 8
  config.eval.num_printed_examples = 1
  return config


def write_config_file(path, data_dir: str, **fields) -> str:
  """A config file for scripts: tiny_config with `fields` ('a.b' names) assigned."""
  lines = ['from tests.conftest import tiny_config', 'def get_config():',
           f'  config = tiny_config({data_dir!r})']
  lines += [f'  config.{name} = {value!r}' for name, value in fields.items()]
  path.write_text('\n'.join(lines + ['  return config', '']))
  return str(path)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture
def config(data_dir):
  return tiny_config(data_dir)


def _run_folder(tmp_path_factory) -> pathlib.Path:
  """A folder shared by the xdist workers of this run (and only this run)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


def _trained_once(tmp_path_factory, data_dir: str, name: str, **fields) -> str:
  """A workdir trained by scripts/train.py on tiny_config with `fields` (one CPU device), once
  per run, by the first worker that needs it (the others wait on a file lock)."""
  import fcntl
  import subprocess
  run_folder = _run_folder(tmp_path_factory)
  base = run_folder / name
  workdir = base / 'workdir'
  with open(run_folder / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    if not (base / 'done').exists():
      shutil.rmtree(base, ignore_errors=True)  # What a failed attempt left.
      base.mkdir()
      config_file = write_config_file(base / 'tiny_config.py', data_dir, **fields)
      root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
      subprocess.run([sys.executable, os.path.join(root, 'scripts', 'train.py'), '--config',
                      config_file, '--workdir', str(workdir)], check=True, capture_output=True,
                     timeout=600, cwd=root, env={**os.environ, 'XLA_FLAGS': SCRIPT_XLA_FLAGS})
      (base / 'done').touch()
  return str(workdir)


@pytest.fixture(scope='session', autouse=True)
def scripts_share_compiled_programs(tmp_path_factory):
  """Every process that a test starts, on any worker, reads and fills one JAX compilation cache
  of this run: a program that several scripts compile (a config's train step, the evaluation's
  decoder) compiles once. Not the test processes themselves: with the cache on, jaxlib 0.10.2
  aborted the process (SIGABRT, no message) in test_train's resume."""
  os.environ['JAX_COMPILATION_CACHE_DIR'] = str(_run_folder(tmp_path_factory) / 'xla_cache')


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory, data_dir) -> str:
  """A Show-and-Tell workdir trained 6 steps, for the tests of what reads a trained workdir:
  gallery, export, caption server."""
  return _trained_once(tmp_path_factory, data_dir, 'trained', num_train_steps=6,
                       eval_every_steps=6)


@pytest.fixture(scope='session')
def updown_workdir(tmp_path_factory, data_dir) -> str:
  """The same with the Up-Down decoder on relational scenes: what reads a trained workdir shows
  where the model looked."""
  return _trained_once(tmp_path_factory, data_dir, 'updown', num_train_steps=6,
                       eval_every_steps=6, **{'model.decoder': 'updown',
                                              'model.grid_coordinates': True,
                                              'data.shapes.relations': True})


# A test's report for the end of the run (`record_property(SUMMARY_PROPERTY, text)`): pytest
# shows nothing a passing test prints, and under xdist nothing any test prints.
SUMMARY_PROPERTY = 'summary'


def pytest_terminal_summary(terminalreporter):
  """Prints each SUMMARY_PROPERTY that a test recorded, after its node id."""
  for report in terminalreporter.stats.get('passed', []) + terminalreporter.stats.get('failed', []):
    for name, text in getattr(report, 'user_properties', ()):
      if name == SUMMARY_PROPERTY and report.when == 'call':
        terminalreporter.write_sep('-', report.nodeid)
        terminalreporter.write_line(text)


# Test files that take longest, started first so that no worker runs one alone at the end
# (xdist hands out work in collection order). The README's commands are split into tests of
# their own groups (tests/test_readme_commands.py); every other file is one group, so its
# module fixtures are built once.
_LONGEST_FIRST = ('test_readme_commands', 'test_multiprocess', 'test_inception_v3', 'test_scst',
                  'test_serve', 'test_configs', 'test_features')


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  for item in items:
    if item.get_closest_marker('xdist_group') is None:
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))
  order = {name: rank for rank, name in enumerate(_LONGEST_FIRST)}
  # Stable: each file's tests keep their order.
  items.sort(key=lambda item: order.get(item.module.__name__.rpartition('.')[2], len(order)))
