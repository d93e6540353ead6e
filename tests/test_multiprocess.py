"""Across processes and interruptions: 2 processes x 2 devices train exactly as 1 x 4, and a
run killed with SIGKILL and restarted reproduces the uninterrupted run's losses."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxcap import inference
from jaxcap.data import input_pipeline
from tests.conftest import tiny_config, write_config_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TIMEOUT_S = 240


def _env(devices: int) -> dict[str, str]:
  return {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
          'PYTHONPATH': str(ROOT)}


def _train_command(config_file: str, workdir: pathlib.Path, *flags: str) -> list[str]:
  return [sys.executable, str(ROOT / 'scripts' / 'train.py'), '--config', config_file,
          '--workdir', str(workdir), *flags]


def _train_losses(workdir: pathlib.Path) -> dict[int, float]:
  """Train loss per step from metrics.jsonl; a step logged twice (replayed) keeps its last."""
  losses = {}
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    if record['split'] == 'train':
      losses[record['step']] = record['train_loss']
  return losses


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture
def built_data_dir(data_dir):
  input_pipeline.get_builder(tiny_config(data_dir).data)  # Built once, before processes share it.
  return data_dir


def test_two_processes_train_as_one(built_data_dir, tmp_path):
  config_file = write_config_file(
      tmp_path / 'config.py', built_data_dir, num_train_steps=6, log_every_steps=1,
      checkpoint_every_steps=3, **{'data.input_shards': 2, 'data.eval_splits': ('val',)})
  single = tmp_path / 'single'
  result = subprocess.run(_train_command(config_file, single), env=_env(4), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-3000:]

  double = tmp_path / 'double'
  address = f'127.0.0.1:{_free_port()}'
  processes = [subprocess.Popen(
      _train_command(config_file, double, f'--coordinator_address={address}', '--num_processes=2',
                     f'--process_id={i}'), env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  outputs = [p.communicate(timeout=TIMEOUT_S) for p in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  assert 'on 4 devices' in outputs[0][1]

  single_losses, double_losses = _train_losses(single), _train_losses(double)
  assert sorted(double_losses) == list(range(1, 7))
  np.testing.assert_allclose([double_losses[s] for s in range(1, 7)],
                             [single_losses[s] for s in range(1, 7)], rtol=1e-5)
  single_state, double_state = inference.restore(str(single)).state, inference.restore(str(double)).state
  assert int(double_state.step) == 6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(single_state.params), jax.device_get(double_state.params))
  # Evaluation gathered both processes' captions: every val image was scored once.
  val = [json.loads(line) for line in (double / 'metrics.jsonl').read_text().splitlines()
         if json.loads(line)['split'] == 'val']
  assert val[-1]['num_images'] == 12
  assert len(json.loads((double / 'captions' / 'val_step6.json').read_text())) == 12


def test_sigkill_and_restart_replays_the_same_losses(built_data_dir, tmp_path):
  steps = 40
  config_file = write_config_file(
      tmp_path / 'config.py', built_data_dir, num_train_steps=steps, log_every_steps=1,
      checkpoint_every_steps=5, **{'data.eval_splits': ()})
  uninterrupted = tmp_path / 'uninterrupted'
  result = subprocess.run(_train_command(config_file, uninterrupted), env=_env(8),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-3000:]

  killed = tmp_path / 'killed'
  process = subprocess.Popen(_train_command(config_file, killed), env=_env(8),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + TIMEOUT_S
  while not (killed / 'checkpoints' / '10').exists():
    assert process.poll() is None and time.monotonic() < deadline
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  logged_before = max(_train_losses(killed))
  assert logged_before < steps, 'the run ended before it was killed'
  result = subprocess.run(_train_command(config_file, killed), env=_env(8), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resumed from the checkpoint of step' in result.stderr

  expected, replayed = _train_losses(uninterrupted), _train_losses(killed)
  assert sorted(replayed) == list(range(1, steps + 1))
  assert [replayed[s] for s in range(1, steps + 1)] == [expected[s] for s in range(1, steps + 1)]
