"""What every trainer is built from (`Setup`) and what the loop drives (`Trainer`)."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jaxcap import checkpoint
from jaxcap.state import TrainState

# (state, steps) -> (state, metrics with a leading axis of `steps`); batches follow state.step.
RunFn = Callable[[TrainState, int], tuple[TrainState, dict[str, jax.Array]]]


@dataclasses.dataclass
class Trainer:
  """The state a trainer trains and checkpoints, and how to advance it."""
  state: TrainState
  run: RunFn
  steps_per_call: int
  # The full model (encoder and decoder) of a trained state, for evaluation.
  full_state: Callable[[TrainState], TrainState]
  # Rates derived from steps/s in the logs: {'examples_per_sec': batch_size, ...}.
  per_step: dict[str, int]


@dataclasses.dataclass
class Setup:
  """A run's model, devices and data, as the loop prepared them."""
  config: ml_collections.ConfigDict
  model: nn.Module
  vocab_size: int
  mesh: jax.sharding.Mesh
  # The full model's initial state (pretrained encoder; for 'scst', init_from's model).
  full_state: TrainState
  checkpoints: checkpoint.Checkpoints
  # The training split's token table (`jaxcap.data.captions.TokenTable`).
  train_table: Any
  # Host batches of the training split from a step on (tf.data, imported by the caller).
  train_batches: Callable[[int], Iterator[dict[str, np.ndarray]]]
  # The training split's cached embeddings (`jaxcap.feature_cache.SplitFeatures`), extracted
  # first if needed.
  cached_features: Callable[[], Any]
