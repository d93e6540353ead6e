"""COCO caption metrics through pycocoevalcap (runs java)."""

import pytest

from jaxcap import evaluate

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
