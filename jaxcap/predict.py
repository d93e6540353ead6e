"""A trained captioner from its workdir alone (config, tokenizer and a checkpoint), and the one
compiled function that captions images with it: evaluation, scripts/caption.py, the server and
the export all caption through `caption_fn`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import logging
import sys
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jaxcap import checkpoint
from jaxcap import decode
from jaxcap import parallel
from jaxcap import state as state_lib
from jaxcap import trainers
from jaxcap import workdir as workdir_lib
from jaxcap.data import tokenizer as tokenizer_lib
from jaxcap.models import captioner


@dataclasses.dataclass
class Trained:
  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  state: state_lib.TrainState
  mesh: jax.sharding.Mesh
  # Which checkpoint this is and how it was chosen ('step 400, the best by validation cider').
  checkpoint: str = ''

  @property
  def attention_grid(self) -> tuple[int, int] | None:
    return attention_grid(self.config, self.state)


def attention_grid(config: ml_collections.ConfigDict,
                   state: state_lib.TrainState) -> tuple[int, int] | None:
  """(H, W) of the grid the decoder attends over, or None for one that does not attend."""
  if not captioner.DECODERS[config.model.decoder]:
    return None
  return tuple(state_lib.features_shape(config, state)[:2])


def init_from_state(config: ml_collections.ConfigDict,
                    template: state_lib.TrainState) -> state_lib.TrainState:
  """`template` (this config's initial full state) with the model of `config.scst.init_from`'s
  checkpoint `config.scst.init_from_step` (default: its best, else its latest): where
  self-critical training starts, and where its encoder comes from. The optimizer state and
  step stay the template's (a fresh start)."""
  init_from = workdir_lib.check_is_workdir(config.scst.init_from, 'config.scst.init_from')
  trained = restore(init_from, config.scst.init_from_step)
  logging.info('Self-critical training starts from %s: %s', init_from, trained.checkpoint)
  return state_lib.with_model_of(template, trained.state, f'config.scst.init_from={init_from}')


def full_model_state(config: ml_collections.ConfigDict, model: nn.Module,
                     mesh: jax.sharding.Mesh, encoder_weights: dict | None) -> state_lib.TrainState:
  """The full model a run starts from: its initial state with the pretrained encoder, or for
  self-critical training, `config.scst.init_from`'s model."""
  full_state = state_lib.initial_state(config, model, mesh, encoder_weights)
  if trainers.check_trainer(config) == 'scst':
    full_state = init_from_state(config, full_state)
  return full_state


def restore(workdir: str, step: str | int | None = None) -> Trained:
  """A workdir's checkpoint `step`, replicated over all devices: 'best' (its best validation
  score), 'latest', a step number, or None (the best where one is recorded, else the latest).

  A run trained on cached features checkpoints the decoder alone: its encoder comes from
  `config.model.encoder_weights` (or the seeded initialisation the cache was made with), or,
  for self-critical training, from `config.scst.init_from`'s checkpoint.
  """
  config = workdir_lib.load_config(workdir)
  best = checkpoint.best_of(config)
  manager = checkpoint.create_manager(workdir, config.keep_checkpoints, best)
  try:
    step, chosen = checkpoint.choose_step(manager, best, step, workdir)
    tokenizer = tokenizer_lib.Tokenizer.load(workdir_lib.tokenizer_path(workdir))
    mesh = parallel.make_mesh()
    model = captioner.create_model(config.model, tokenizer.vocab_size)
    on_features = trainers.on_features(config)
    if on_features:  # The checkpoint holds the decoder; the encoder is built here.
      full_state = full_model_state(config, model, mesh,
                                    captioner.load_encoder_weights(config.model))
      template = state_lib.initial_decoder_state(config, model, mesh,
                                                 state_lib.features_shape(config, full_state))
    else:  # A full checkpoint holds everything: nothing to initialise (InceptionV3's is slow).
      template = state_lib.abstract_state(config, model, mesh)
    state = checkpoint.restore(manager, template, step)
  finally:
    manager.close()
  if on_features:
    state = state_lib.with_trained_decoder(full_state, state).replace(step=state.step)
  return Trained(config, tokenizer, state, mesh, chosen)


def restore_or_exit(workdir: str, step: str | int | None = None) -> Trained:
  """`restore` for scripts: a folder that is not a trained workdir, or a step it does not
  hold, ends the program with the message (exit code 1) instead of a traceback; the checkpoint
  loaded is named on stderr."""
  try:
    trained = restore(workdir, step)
  except (FileNotFoundError, ValueError) as error:
    raise SystemExit(str(error)) from None
  print(f'{workdir}: checkpoint {trained.checkpoint}', file=sys.stderr)
  return trained


CaptionFn = Callable[[Callable, Any, jax.Array], dict[str, jax.Array]]


def caption_fn(config: ml_collections.ConfigDict, *, method: str | None = None,
               beam_hypotheses: int = 0, top_k: Callable = jax.lax.top_k) -> CaptionFn:
  """`(apply_fn, variables, images) -> outputs`: how jaxcap captions images.

  outputs['ids'] (B, max_len - 1) and outputs['log_probs'] (B,) are the captions by
  `config.decode` (`method` overrides its method) and the model's log-probability of each;
  outputs['attention'] (B, max_len - 1, N) each id's weights over the N grid positions of a
  decoder that attends (N = 0 for one that does not);
  with `beam_hypotheses=K`, also outputs['beam_ids'] (B, K, max_len - 1) and
  outputs['beam_log_probs'] (B, K), every beam hypothesis, best first. `top_k` is the beam's
  (`decode.portable_top_k` for the export).
  """
  decode_config = config.decode.copy_and_resolve_references()
  if method is not None:
    decode_config.method = method
  decode_key, max_len = state_lib.named_key(config.seed, 'decode'), config.data.max_len

  def captions(apply_fn, variables, images):
    captions = decode.decode_with_log_probs(
        apply_fn, variables, images, max_len, decode_config, decode_key, top_k)
    outputs = {'ids': captions.tokens, 'log_probs': captions.log_probs,
               'attention': captions.attention}
    if beam_hypotheses:
      outputs['beam_ids'], outputs['beam_log_probs'], _ = decode.beam_hypotheses(
          apply_fn, variables, images, max_len, beam_hypotheses, decode_config.length_penalty,
          top_k)
    return outputs
  return captions


def batch_sizes(largest: int, multiple: int = 1) -> tuple[int, ...]:
  """Batch shapes to compile: 1, 4, 16, ... and `largest`, each rounded up to a `multiple`
  (the devices of the mesh)."""
  sizes, size = set(), 1
  while size < largest:
    sizes.add(-(-size // multiple) * multiple)
    size *= 4
  return tuple(sorted(sizes | {-(-largest // multiple) * multiple}))


class Predictor:
  """`caption_fn` jitted data-parallel over a mesh for fixed batch sizes: any number of images
  up to the largest is padded to the next size, and the padding rows are dropped.

  `extra_fn(state, batch)` adds outputs computed from the same batch (evaluation's loss).
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               sizes: Sequence[int], *, method: str | None = None, beam_hypotheses: int = 0,
               extra_fn: Callable[[state_lib.TrainState, dict], dict] | None = None):
    self.mesh, self.sizes = mesh, tuple(sorted(sizes))
    self.image_size = config.data.image_size
    captions = caption_fn(config, method=method, beam_hypotheses=beam_hypotheses)

    def predict(state, batch):
      outputs = captions(state.apply_fn, state.variables, batch['image'])
      return {**outputs, **(extra_fn(state, batch) if extra_fn else {})}
    self._jitted = parallel.jit_data_parallel(predict, mesh)
    self._compiled: dict[int, Callable] = {}

  def place(self, state: state_lib.TrainState) -> state_lib.TrainState:
    """`state` replicated over this predictor's mesh."""
    return jax.device_put(state, parallel.replicated(self.mesh))

  def compile(self, state: state_lib.TrainState) -> None:
    """Compiles every batch size now (a server's start-up), not at its first batch."""
    for size in self.sizes:
      shape = jax.ShapeDtypeStruct((size, self.image_size, self.image_size, 3), np.float32,
                                   sharding=parallel.data_sharding(self.mesh))
      self._compiled[size] = self._jitted.lower(state, {'image': shape}).compile()

  def run(self, state: state_lib.TrainState, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """The outputs of one batch as given (this process's rows of a global batch)."""
    batch = parallel.shard_batch(batch, self.mesh)
    size = batch['image'].shape[0]
    return self._compiled.get(size, self._jitted)(state, batch)

  def __call__(self, state: state_lib.TrainState, images: np.ndarray) -> dict[str, np.ndarray]:
    """The outputs of `images` (N, H, W, 3), N up to the largest size, on the host."""
    count = len(images)
    size = next(s for s in self.sizes if s >= count)
    padded = np.zeros((size, *images.shape[1:]), np.float32)
    padded[:count] = images
    outputs = jax.device_get(self.run(state, {'image': padded}))
    return {name: np.asarray(value)[:count] for name, value in outputs.items()}
