"""scripts/benchmark.py (jaxcap.benchmark) runs without TensorFlow and writes valid JSON."""

import json
import pathlib
import subprocess
import sys

from PIL import Image
import pytest

from jaxcap import benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs the script with TensorFlow made unimportable, as on accelerator hosts without it.
_WITHOUT_TF = """
import runpy, sys
sys.modules['tensorflow'] = None
sys.argv = ['benchmark.py'] + sys.argv[1:]
runpy.run_path({script!r}, run_name='__main__')
"""


def test_timed_calls_cover_whole_cycles():
  # The decoder modes' host batches are sorted by length: timing part of a cycle through them
  # would time the shortest only.
  counts = [0, 0, 0]

  def call(i):
    counts[i] += 1
  calls = [lambda i=i: call(i) for i in range(3)]
  benchmark.time_calls(calls, steps=4, warmup=1)
  # Each once untimed (compilation), the first once more (warmup), then 4 -> 6 timed: 2 each.
  assert counts == [4, 3, 3]


_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 vaes

processor\t: 1
model name\t: another
flags\t\t: amx_tile
"""


def test_host_cpu_names_the_model_and_the_vector_isa():
  cpu = benchmark.host_cpu(_CPUINFO)
  assert cpu == {'cpu': 'AMD EPYC (family 25 model 17)',
                 'cpu_isa': ['avx2', 'fma', 'avx512f', 'avx512_bf16']}


@pytest.mark.slow
def test_sampling_mode_without_tensorflow(tmp_path):
  # The other modes and decoding methods run as the commands of docs/benchmarks.md and the
  # README, without TensorFlow too (tests/test_readme_commands.py); sampling is shown in neither.
  output = tmp_path / 'result.json'
  code = _WITHOUT_TF.format(script=str(ROOT / 'scripts' / 'benchmark.py'))
  runs = [('decode', 'sample')]
  for mode, method in runs:
    result = subprocess.run([
        sys.executable, '-c', code, '--config',
        str(ROOT / 'configs' / 'demo.py'), '--mode', mode, '--batch_size', '8', '--steps', '1',
        '--warmup', '1', '--vocab_size', '50', '--peak_matmul_size', '256', '--num_batches', '4',
        '--config.resident.steps_per_call=2', f'--config.decode.method={method}', '--json',
        str(output)
    ],
                            capture_output=True,
                            text=True,
                            timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(output.read_text())
    assert results['mode'] == mode and results['decode']['method'] == method
    assert results['steps_per_sec'] > 0 and results['examples_per_sec'] > 0
    assert results['flops_per_step'] > 0 and results['peak_tflops'] > 0
    assert 0 < results['mfu'] and results['device_count'] == 8
    assert results['peak_devices'] == 1  # The 8 CPU devices share one process's cores.
    assert results['cpu'] and isinstance(results['cpu_isa'], list)
    assert ('tokens_per_sec' in results) == (mode in ('train', 'decoder', 'decoder_resident'))


@pytest.mark.slow
def test_pipeline_mode_times_the_input(tmp_path, data_dir):
  output, config_file = tmp_path / 'result.json', tmp_path / 'tiny.py'
  config_file.write_text('from tests.conftest import tiny_config\n'
                         f'def get_config():\n  return tiny_config({data_dir!r})\n')
  result = subprocess.run([
      sys.executable,
      str(ROOT / 'scripts' / 'benchmark.py'), '--config',
      str(config_file), '--mode', 'pipeline', '--batch_size', '8', '--steps', '2', '--warmup', '1',
      '--workdir',
      str(tmp_path), '--json',
      str(output)
  ],
                          capture_output=True,
                          text=True,
                          timeout=300,
                          cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads(output.read_text())
  assert results['mode'] == 'pipeline' and results['examples_per_sec'] > 0


@pytest.mark.slow
def test_pipeline_mode_on_a_coco_like_folder(tmp_path):
  """COCO's main config streams a generated COCO-like folder: 640 x 480 JPEGs of about COCO's
  file size, read through the COCO-format builder and the streaming path."""
  output = tmp_path / 'result.json'
  result = subprocess.run([
      sys.executable, str(ROOT / 'scripts' / 'benchmark.py'), '--config',
      str(ROOT / 'configs' / 'coco.py'), '--mode', 'pipeline', '--coco_like', '12',
      '--batch_size', '4', '--steps', '3', '--warmup', '1', '--workdir', str(tmp_path),
      '--config.data.vocab_size=64', '--json', str(output)
  ], capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads(output.read_text())
  assert results['images'] == 12 + 8 and 100e3 < results['mean_jpeg_bytes'] < 220e3
  assert results['image_size'] == 299 and not results['cache_images']
  assert results['images_per_sec_per_core'] == pytest.approx(
      results['examples_per_sec'] / results['cpu_cores'])
  train = json.loads((tmp_path / 'coco_like' / 'annotations' / 'captions_train2014.json')
                     .read_text())
  assert len(train['images']) == 12 and len(train['annotations']) == 5 * 12
  with Image.open(tmp_path / 'coco_like' / 'train2014' / train['images'][0]['file_name']) as image:
    assert image.format == 'JPEG' and image.size == (640, 480)
