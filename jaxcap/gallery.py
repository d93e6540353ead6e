"""A gallery of an evaluation: one HTML page of images beside their captions and scores.

The page stands alone: it opens from disk with no server and no network, since thumbnails are
inlined as JPEG data URIs and its style and its controls are in the page. For a decoder that
attends, each word of a caption carries its attention map (`jaxcap.attention_maps`): hovering
or clicking the word draws that map over the image (`attention_overlay.js`).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import html
import io
import json
import os

import numpy as np
from PIL import Image

from jaxcap import attention_maps
from jaxcap.data import shapes

THUMBNAIL_SIDE = 160


@dataclasses.dataclass(frozen=True)
class Entry:
  image_id: int
  thumbnail: bytes  # JPEG
  caption: str
  references: Sequence[str]
  cider_d: float
  scene_correct: bool | None = None  # Built-in data only: does the caption name the scene?
  # Each word of the caption with its (H, W) attention map (a decoder that attends).
  words: Sequence[tuple[str, np.ndarray]] = ()


def thumbnail_jpeg(image: np.ndarray | bytes, side: int = THUMBNAIL_SIDE) -> bytes:
  """An image (pixels, or encoded bytes) as a JPEG whose longer side is at most `side`."""
  picture = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else Image.fromarray(image)
  picture = picture.convert('RGB')
  picture.thumbnail((side, side))
  out = io.BytesIO()
  picture.save(out, format='JPEG', quality=85)
  return out.getvalue()


def entries(generated: Mapping[int, str], cider_d: Mapping[int, float],
            references: Mapping[int, Sequence[str]], images: Mapping[int, np.ndarray | bytes],
            scene_check: bool,
            token_maps: Mapping[int, attention_maps.TokenMaps] | None = None) -> list[Entry]:
  """An entry per image of `images`; `scene_check` (built-in data) marks whether each caption
  names its scene; `token_maps` give its words their attention maps."""
  token_maps = token_maps or {}
  return [Entry(image_id=i, thumbnail=thumbnail_jpeg(image), caption=generated[i],
                references=tuple(references[i]), cider_d=cider_d[i],
                scene_correct=shapes.scene_correct(generated[i], references[i])
                if scene_check else None,
                words=attention_maps.word_maps(token_maps[i]) if i in token_maps else ())
          for i, image in sorted(images.items())]


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table.metrics td, table.metrics th { padding: 0.2em 0.8em; text-align: right; }
#entries { display: flex; flex-wrap: wrap; gap: 1em; }
figure { width: 320px; margin: 0; padding: 0.6em; border: 1px solid #ccc; border-radius: 6px; }
figure img { display: block; width: 160px; image-rendering: pixelated; }
.caption { font-weight: 600; margin: 0.4em 0; }
.score { font-size: 0.9em; color: #555; }
.right { color: #11772d; } .wrong { color: #b3261e; }
.picture { position: relative; width: 160px; }
.picture canvas { position: absolute; left: 0; top: 0; pointer-events: none; }
.word { cursor: pointer; border-radius: 3px; }
.word:hover, .word.shown { background: #ffe08a; }
ol.references { font-size: 0.85em; color: #555; padding-left: 1.4em; margin: 0.3em 0; }
"""

# Reorders the figures by their data attributes; nothing is fetched.
_SCRIPT = """
function orderBy(key) {
  const box = document.getElementById('entries');
  const figures = Array.from(box.children);
  figures.sort(key === 'worst'
      ? (a, b) => a.dataset.cider - b.dataset.cider || a.dataset.id - b.dataset.id
      : (a, b) => a.dataset.id - b.dataset.id);
  figures.forEach(f => box.appendChild(f));
}
"""


def _metrics_table(metrics: Mapping[str, float]) -> str:
  names = [k for k in metrics if isinstance(metrics[k], (int, float))]
  head = ''.join(f'<th>{html.escape(k)}</th>' for k in names)
  cells = ''.join(f'<td>{metrics[k]:.3f}</td>' if isinstance(metrics[k], float)
                  else f'<td>{metrics[k]}</td>' for k in names)
  return f'<table class="metrics"><tr>{head}</tr><tr>{cells}</tr></table>'


def _caption_html(entry: Entry) -> str:
  """The caption as text, or as words that show their attention maps."""
  if not entry.words:
    return html.escape(entry.caption)
  spans = []
  for word, weights in entry.words:
    rows = json.dumps(np.round(np.asarray(weights, float), 5).tolist())
    spans.append(f'<span class="word" data-map="{html.escape(rows)}" '
                 'onmouseenter="showMap(this)" onmouseleave="hideMap(this)" '
                 f'onclick="pinMap(this)">{html.escape(word)}</span>')
  return ' '.join(spans)


def _figure(entry: Entry) -> str:
  image = base64.b64encode(entry.thumbnail).decode('ascii')
  references = ''.join(f'<li>{html.escape(r)}</li>' for r in entry.references)
  scene = ''
  if entry.scene_correct is not None:
    scene = (' &middot; <span class="right">scene right</span>' if entry.scene_correct
             else ' &middot; <span class="wrong">scene wrong</span>')
  return (f'<figure class="attended" data-id="{entry.image_id}" '
          f'data-cider="{entry.cider_d:.6f}">'
          f'<div class="picture"><img src="data:image/jpeg;base64,{image}" '
          f'alt="image {entry.image_id}"><canvas></canvas></div>'
          f'<figcaption><div class="caption">{_caption_html(entry)}</div>'
          f'<div class="score">image {entry.image_id} &middot; CIDEr-D '
          f'<span class="cider">{entry.cider_d:.3f}</span>{scene}</div>'
          f'references:<ol class="references">{references}</ol></figcaption></figure>')


def render(title: str, metrics: Mapping[str, float], entries: Sequence[Entry],
           num_images: int) -> str:
  """The page: `metrics` of all `num_images` images of the split, then `entries` by image id."""
  entries = sorted(entries, key=lambda e: e.image_id)
  shown = (f'all {num_images} images' if len(entries) == num_images else
           f'the first {len(entries)} of {num_images} images by id')
  return (
      '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
      f'<title>{html.escape(title)}</title><style>{_STYLE}</style>'
      f'<script>{_SCRIPT}{attention_maps.overlay_script()}</script></head><body>'
      f'<h1>{html.escape(title)}</h1>'
      f'<p>Metrics over all {num_images} images; showing {shown}. CIDEr-D per image is '
      'pycocoevalcap\'s, whose mean over the split is the CIDEr above.</p>'
      f'{_metrics_table(metrics)}'
      '<p><label for="order">Order: </label><select id="order" onchange="orderBy(this.value)">'
      '<option value="id">image id</option><option value="worst">worst first (CIDEr-D)</option>'
      '</select></p>'
      f'<div id="entries">{"".join(_figure(e) for e in entries)}</div></body></html>\n')


def write(path: str, title: str, metrics: Mapping[str, float], entries: Sequence[Entry],
          num_images: int) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(render(title, metrics, entries, num_images))
  os.replace(path + '.tmp', path)
