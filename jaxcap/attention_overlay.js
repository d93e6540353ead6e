// Where the model looked, for the gallery and the caption page: each `.word` of a caption holds
// its attention map (data-map: rows of weights over the image grid). Hovering a word draws its
// map over the image of the enclosing `.attended` element, on the canvas laid over that image:
// one cell per grid position, darkened by 0.75 x (1 - weight / the word's largest weight), so
// that where the word looked stays bright, whatever its colours.
// Clicking a word pins its map: it comes back when the pointer leaves another word.
function showMap(word) {
  const box = word.closest('.attended');
  const canvas = box.querySelector('canvas');
  const image = box.querySelector('img');
  canvas.width = image.clientWidth;
  canvas.height = image.clientHeight;
  const rows = JSON.parse(word.dataset.map);
  const largest = Math.max(...rows.flat());
  const context = canvas.getContext('2d');
  context.clearRect(0, 0, canvas.width, canvas.height);
  const h = canvas.height / rows.length, w = canvas.width / rows[0].length;
  rows.forEach((row, i) => row.forEach((weight, j) => {
    context.fillStyle = `rgba(0, 0, 0, ${0.75 * (1 - weight / largest)})`;
    context.fillRect(Math.round(j * w), Math.round(i * h),
                     Math.round((j + 1) * w) - Math.round(j * w),
                     Math.round((i + 1) * h) - Math.round(i * h));
  }));
  box.querySelectorAll('.word').forEach(other => other.classList.toggle('shown', other === word));
}

function hideMap(word) {
  const box = word.closest('.attended');
  const pinned = box.querySelector('.word.pinned');
  if (pinned) return showMap(pinned);
  const canvas = box.querySelector('canvas');
  canvas.getContext('2d').clearRect(0, 0, canvas.width, canvas.height);
  word.classList.remove('shown');
}

function pinMap(word) {
  word.closest('.attended').querySelectorAll('.word').forEach(
      other => other.classList.remove('pinned'));
  word.classList.add('pinned');
  showMap(word);
}

// A span for each {word, attention} of `words`, for a caption element.
function wordSpans(words) {
  return words.map(({word, attention}) => {
    const span = document.createElement('span');
    span.className = 'word';
    span.textContent = word;
    span.dataset.map = JSON.stringify(attention);
    span.onmouseenter = () => showMap(span);
    span.onmouseleave = () => hideMap(span);
    span.onclick = () => pinMap(span);
    return span;
  });
}
