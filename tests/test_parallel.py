"""jaxcap.parallel's compiler options: on CPU, convolutions stay XLA's, products go to YNNPACK."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxcap import parallel


def _convolution_then_product(state, images):
  """A convolution, a batch-norm-like reduction and a product: the kinds the option sorts."""
  y = jax.lax.conv_general_dilated(images, state['kernel'], (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = jax.nn.relu(y - y.mean(axis=(0, 1, 2)))
  return y.reshape(y.shape[0], -1, y.shape[-1]) @ state['dense']


def _inputs(batch=8):
  rng = np.random.default_rng(0)
  state = {'kernel': jnp.asarray(rng.standard_normal((3, 3, 16, 32)), jnp.float32),
           'dense': jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)}
  return state, jnp.asarray(rng.standard_normal((batch, 16, 16, 16)), jnp.float32)


def _entry_computation(compiled_text: str) -> str:
  return compiled_text.split('ENTRY', 1)[1].split('\n}\n', 1)[0]


def test_cpu_programs_leave_convolutions_to_xla_and_products_to_ynnpack():
  mesh = parallel.make_mesh(jax.devices('cpu'))
  state, images = _inputs(batch=mesh.size)
  jitted = parallel.jit_data_parallel(_convolution_then_product, mesh)
  entry = _entry_computation(jitted.lower(state, images).compile().as_text())
  # XLA's own convolution is an instruction of the program; YNNPACK's would sit in a fusion.
  assert re.search(r'= f32\[[\d,]+\]\S* convolution\(', entry), entry
  assert 'ynn_fusion' in entry, entry
  # jaxlib's default (the convolution in YNNPACK too) is the independent reference.
  gradient_fn = jax.grad(lambda s, x: _convolution_then_product(s, x).sum())
  np.testing.assert_allclose(
      jitted(state, images),
      jax.jit(_convolution_then_product)(state, images),
      rtol=1e-4,
      atol=1e-3)
  expected = jax.jit(gradient_fn)(state, images)
  for name, gradient in parallel.jit_data_parallel(gradient_fn, mesh)(state, images).items():
    np.testing.assert_allclose(gradient, expected[name], rtol=1e-4, atol=1e-3)


def test_compiler_options_only_for_the_cpu():
  fusion_types = parallel.compiler_options('cpu')['xla_cpu_experimental_ynn_fusion_type']
  assert 'DOT' in fusion_types and 'CONVOLUTION' not in fusion_types
  assert parallel.compiler_options('gpu') == {}
  assert parallel.compiler_options('cuda') == {}
  assert parallel.compiler_options('tpu') == {}


def test_extras_install_jaxs_accelerator_packages_at_the_required_version():
  """Each accelerator extra is jax[EXTRA] with the base requirement's version range, and EXTRA
  is an extra of the installed jax (its metadata names what that extra pulls)."""
  import configparser
  import importlib.metadata
  import pathlib

  from packaging.requirements import Requirement

  setup = configparser.ConfigParser()
  setup.read(pathlib.Path(__file__).resolve().parents[1] / 'setup.cfg')
  base = [Requirement(line) for line in setup['options']['install_requires'].splitlines()
          if line.strip().startswith('jax>')]
  assert len(base) == 1, base
  jax_extras = {r.split('extra == ')[1].strip('"\'')
                for r in importlib.metadata.requires('jax') if 'extra == ' in r}
  extras = setup['options.extras_require']
  for name in ('cuda12', 'cuda13', 'tpu'):
    requirements = [Requirement(line) for line in extras[name].splitlines() if line.strip()]
    assert [(r.name, r.extras, r.specifier) for r in requirements] == [
        ('jax', {name}, base[0].specifier)], (name, requirements)
    assert name in jax_extras, (name, sorted(jax_extras))


def test_a_host_with_an_unused_gpu_is_warned(tmp_path, monkeypatch, caplog):
  """The run logs its devices; where the host has an NVIDIA GPU (its device file, or
  nvidia-smi on the PATH) and JAX's backend is the CPU, it warns naming the extra."""
  mesh = parallel.make_mesh(jax.devices('cpu'))
  monkeypatch.setenv('PATH', str(tmp_path / 'bin'))
  caplog.set_level('INFO')
  parallel.log_devices(mesh, dev=str(tmp_path))
  assert f'{mesh.size} device(s)' in caplog.text and 'on cpu' in caplog.text
  assert not [r for r in caplog.records if r.levelname == 'WARNING']
  (tmp_path / 'nvidia0').touch()
  parallel.log_devices(mesh, dev=str(tmp_path))
  warning, = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert 'NVIDIA GPU' in warning and "'.[cuda12]'" in warning, warning
  (tmp_path / 'nvidia0').unlink()
  (tmp_path / 'bin').mkdir()
  (tmp_path / 'bin' / 'nvidia-smi').write_text('#!/bin/sh\n')
  (tmp_path / 'bin' / 'nvidia-smi').chmod(0o755)
  assert parallel.unused_accelerator(dev=str(tmp_path)) == ('an NVIDIA GPU', 'cuda12')
  (tmp_path / 'bin' / 'nvidia-smi').unlink()
  (tmp_path / 'accel0').touch()
  assert parallel.unused_accelerator(dev=str(tmp_path)) == ('a TPU', 'tpu')
