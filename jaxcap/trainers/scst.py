"""The 'scst' trainer: self-critical sequence training (Rennie et al. 2017) on cached embeddings.

Each step draws its images on the device, samples `num_samples` captions of each, scores them
with CIDEr-D against the image's training references (`jaxcap.rewards`, inside the step), and
follows the policy gradient of `-(reward - baseline) * sum log p(token)` over the sampled tokens
(EOS included, PAD excluded), averaged over those tokens. The baseline is the mean reward of
the image's other samples ('mean_of_others', the "new self-critical" variant) or the reward of
its greedy caption ('greedy', the original). With `xe_weight` > 0 the loss adds that weight
times the cross-entropy of one reference per image, drawn each step (a mixed objective): CIDEr-D
scores n-grams, so it hardly tells two objects' order apart, and the references keep it. One
jitted call runs K steps in a `lax.scan`.

Images and their references are placed once, in contiguous blocks along the mesh's 'data' axis
(`jaxcap.trainers.resident`); each device shard draws its share of a step's images from its own
block, so drawing needs no communication. Image order is a pure function of (seed, step): a
resumed run replays exactly.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from jaxcap import decode
from jaxcap import parallel
from jaxcap import rewards
from jaxcap import state as state_lib
from jaxcap import train_step as train_step_lib
from jaxcap.data.tokenizer import BOS_ID
from jaxcap.data.tokenizer import PAD_ID
from jaxcap.models import captioner
from jaxcap.trainers import resident
from jaxcap.trainers.base import Setup
from jaxcap.trainers.base import Trainer

BASELINES = ('mean_of_others', 'greedy')


class ScstData(NamedTuple):
  """Training images on the devices: leading axes (device shard, image in the shard)."""
  embedding: jax.Array                  # (shards, images_per_shard, ...) image features
  references: rewards.ImageReferences   # (shards, images_per_shard, ...)


def place(embedding: np.ndarray, references: rewards.ImageReferences, mesh: Mesh,
          dtype=jnp.float32) -> ScstData:
  """Whole-split arrays (the same on every process) -> contiguous blocks, one per device (the
  last few images dropped)."""
  return ScstData(resident.image_blocks(np.asarray(embedding).astype(dtype), mesh),
                  rewards.ImageReferences(*(resident.image_blocks(x, mesh) for x in references)))


def images_at(order_key: jax.Array, step: jax.Array, num_shards: int, images_per_shard: int,
              per_shard_batch: int) -> jax.Array:
  """(shards, per_shard_batch) image indices of `step`: each epoch a new permutation per shard."""
  steps_per_epoch = images_per_shard // per_shard_batch
  epoch, position = jnp.divmod(step, steps_per_epoch)
  keys = jax.random.split(jax.random.fold_in(order_key, epoch), num_shards)
  order = jax.vmap(lambda key: jax.random.permutation(key, images_per_shard))(keys)
  return jax.lax.dynamic_slice_in_dim(order, position * per_shard_batch, per_shard_batch, axis=1)


def baseline_rewards(sample_rewards: jax.Array, greedy_rewards: jax.Array,
                     baseline: str) -> jax.Array:
  """(B, S) baseline of each sample's reward."""
  if baseline == 'mean_of_others':
    num_samples = sample_rewards.shape[1]
    others = jnp.sum(sample_rewards, axis=1, keepdims=True) - sample_rewards
    return others / (num_samples - 1)
  if baseline == 'greedy':
    return jnp.broadcast_to(greedy_rewards[:, None], sample_rewards.shape)
  raise ValueError(f'config.scst.baseline={baseline!r} is not one of {BASELINES}')


def policy_loss(params, apply_fn: Callable, embedding: jax.Array, samples: jax.Array,
                advantage: jax.Array, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Mean over sampled tokens of -advantage * log p(token), and the number of those tokens.

  `samples` (N, T) are the ids after BOS (PAD after EOS). p is the distribution they were
  sampled from: the model's softmax at `temperature` without PAD and BOS (with the plain
  softmax, pushing down a bad sample's tokens moves probability onto the never-sampled PAD,
  unpenalised, and training collapses). Teacher-forced on the samples through the decoder's
  chunked vocabulary projection: no (N, T, vocab) array.
  """
  inputs = jnp.concatenate(
      [jnp.full((samples.shape[0], 1), BOS_ID, samples.dtype), samples[:, :-1]], 1)
  mask = (samples != PAD_ID).astype(jnp.float32)
  num_tokens = jnp.maximum(jnp.sum(mask), 1.0)
  weighted_nll, _ = apply_fn({'params': params}, embedding, inputs, samples,
                             advantage[:, None] * mask, temperature, method='sampler_loss_sums')
  return weighted_nll / num_tokens, num_tokens


def reference_per_image(references: rewards.ImageReferences, key: jax.Array) -> jax.Array:
  """(B, L) ids after BOS (EOS included) of one real reference per image, drawn uniformly."""
  choice = jax.random.categorical(key, jnp.where(references.mask > 0, 0.0, -jnp.inf))
  return jnp.take_along_axis(references.tokens, choice[:, None, None], axis=1)[:, 0]


def mixed_loss(params, apply_fn: Callable, sample_embedding: jax.Array, samples: jax.Array,
               advantage: jax.Array, temperature: float, embedding: jax.Array,
               reference_tokens: jax.Array | None,
               xe_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`policy_loss` of the samples + xe_weight * the mean token cross-entropy of the references
  (B, L) of the images (`embedding`, B), in the sampler's distribution at temperature 1; and
  the parts (the number of sampled tokens; the references' loss when xe_weight > 0)."""
  loss, num_tokens = policy_loss(params, apply_fn, sample_embedding, samples, advantage,
                                 temperature)
  parts = {'num_tokens': num_tokens}
  if xe_weight:
    parts['reference_loss'], _ = policy_loss(params, apply_fn, embedding, reference_tokens,
                                             jnp.ones(reference_tokens.shape[0]))
    loss = loss + xe_weight * parts['reference_loss']
  return loss, parts


def make_scst_step(*, per_shard_batch: int, num_samples: int, baseline: str, temperature: float,
                   max_len: int, xe_weight: float = 0.0) -> Callable:
  """`(state, data, tables, seed_key) -> (state, metrics)`: one self-critical step at state.step."""
  if baseline not in BASELINES:
    raise ValueError(f'config.scst.baseline={baseline!r} is not one of {BASELINES}')
  if num_samples < 2 and baseline == 'mean_of_others':
    raise ValueError('config.scst.num_samples must be at least 2 for the mean_of_others baseline')
  if xe_weight < 0:  # A negative weight would push the references' likelihood down.
    raise ValueError(f'config.scst.xe_weight={xe_weight} must be at least 0')

  def step(state: state_lib.TrainState, data: ScstData, tables: rewards.NgramTables,
           seed_key: jax.Array):
    order_key = state_lib.rng_stream(seed_key, 'order')
    sample_key = state_lib.rng_stream(seed_key, 'sample')
    reference_key = state_lib.rng_stream(seed_key, 'reference')
    num_shards, images_per_shard = data.embedding.shape[:2]
    index = images_at(order_key, state.step, num_shards, images_per_shard, per_shard_batch)
    take = jax.vmap(lambda array, rows: array[rows])
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    embedding = flat(take(data.embedding, index)).astype(jnp.float32)    # (B, ...)
    references = rewards.ImageReferences(*(flat(take(x, index)) for x in data.references))
    batch_size = embedding.shape[0]

    variables = {'params': state.params}
    sample_embedding = jnp.repeat(embedding, num_samples, axis=0)        # (B * S, ...)
    samples = decode.sample_from_embedding(
        state.apply_fn, variables, sample_embedding, max_len,
        jax.random.fold_in(sample_key, state.step), temperature)
    greedy = decode.greedy_from_embedding(state.apply_fn, variables, embedding, max_len)
    sample_references = rewards.gather_references(
        references, jnp.repeat(jnp.arange(batch_size), num_samples))
    sample_rewards = rewards.scores(tables, sample_references,
                                    samples).reshape(batch_size, num_samples)
    greedy_rewards = rewards.scores(tables, references, greedy)
    baselines = baseline_rewards(sample_rewards, greedy_rewards, baseline)
    advantage = jax.lax.stop_gradient(sample_rewards - baselines).reshape(-1)

    reference_tokens = (reference_per_image(references, jax.random.fold_in(reference_key,
                                                                            state.step))
                        if xe_weight else None)
    (loss, parts), grads = jax.value_and_grad(mixed_loss, has_aux=True)(
        state.params, state.apply_fn, sample_embedding, samples, advantage, temperature,
        embedding, reference_tokens, xe_weight)
    metrics = {**parts, 'loss': loss,
               'sample_reward': jnp.mean(sample_rewards), 'baseline_reward': jnp.mean(baselines),
               'greedy_reward': jnp.mean(greedy_rewards),
               'sample_length': parts['num_tokens'] / samples.shape[0]}
    return train_step_lib.apply_gradients(state, grads, {}, metrics)

  return step


def config_step(config: ml_collections.ConfigDict, per_shard_batch: int) -> Callable:
  """`make_scst_step` with `config.scst`'s settings."""
  return make_scst_step(per_shard_batch=per_shard_batch, num_samples=config.scst.num_samples,
                        baseline=config.scst.baseline, temperature=config.scst.temperature,
                        max_len=config.scst.max_len, xe_weight=config.scst.xe_weight)


def make(state: state_lib.TrainState, data: ScstData, tables: rewards.NgramTables,
         config: ml_collections.ConfigDict, mesh: Mesh,
         full_state: Callable = lambda s: s) -> Trainer:
  """The self-critical trainer of a decoder `state` on cached embeddings and their references
  placed on the devices (`place`), each image's sampled captions scored with the references'
  n-gram `tables` (`rewards.CiderD.tables`)."""
  per_shard_batch = resident.per_shard_batch(config, mesh, data.embedding.shape[1], 'images')
  tables = jax.device_put(tables, parallel.replicated(mesh))
  seed_key = resident.seed_key(config, mesh)
  steps_fn = resident.jit_steps(config_step(config, per_shard_batch))

  def run(state, num_steps):
    return steps_fn(num_steps)(state, data, tables, seed_key)

  return Trainer(state, run, config.resident.steps_per_call, full_state,
                 {'examples_per_sec': config.batch_size,
                  'captions_per_sec': config.batch_size * config.scst.num_samples})


def build(setup: Setup) -> Trainer:
  """`setup.full_state`'s decoder (init_from's) fine-tuned on the training split's cached
  embeddings, with a fresh optimizer (Adam's moments start at zero)."""
  config, mesh = setup.config, setup.mesh
  cached = setup.cached_features()
  tokens, counts = resident.references(cached, setup.train_table)
  # Rewards compare the ids after BOS, EOS included, as sampled captions have them.
  scorer = rewards.CiderD.from_padded(tokens[:, :, 1:], counts, setup.vocab_size)
  logging.info('Self-critical training: %d images with %d references each at most, %d samples '
               'each, %s baseline, from %s', len(cached.image_ids), tokens.shape[1],
               config.scst.num_samples, config.scst.baseline, config.scst.init_from)
  state = state_lib.initial_decoder_state(config, setup.model, mesh, cached.embedding.shape[1:])
  state = state.replace(params={'decoder': setup.full_state.params['decoder']})
  state = setup.checkpoints.restore_latest(state)
  data = place(cached.embedding, scorer.references, mesh, captioner.DTYPES[config.model.dtype])
  return make(state, data, scorer.tables, config, mesh,
              functools.partial(state_lib.with_trained_decoder, setup.full_state))
