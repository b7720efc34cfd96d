// The demo page: what the served model knows (GET /v1/model), then each chosen or dropped image
// sent to POST /predict on its own request (one file's error leaves the others' answers), its
// answer drawn as it arrives. DOM built with textContent only: file names are the user's text.

const $ = (id) => document.getElementById(id);
const form = $("predict-form");
const fileInput = $("files");
const dropZone = $("drop-zone");
const topK = $("top-k");
const wantHeatmaps = $("heatmaps");
const layerSelect = $("heatmap-layer");
const results = $("results");
const formStatus = $("form-status");
const READY_TRIES = 120; // the model may still be loading when the page opens: ask once a second

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function plural(count, word) {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}

// The API's error body ({"error": {"code", "message"}}) as one line; the status when there is none.
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      return `${response.status} ${body.error.code}: ${body.error.message}`;
    }
  } catch (ignored) {
    // not JSON (a proxy's page, say): the status line says what is known
  }
  return `${response.status} ${response.statusText || "error"}`;
}

function pause(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function loadModel() {
  const status = $("model-status");
  for (let attempt = 0; attempt < READY_TRIES; attempt += 1) {
    let response;
    try {
      response = await fetch("/v1/model", { headers: { accept: "application/json" } });
    } catch (error) {
      status.textContent = `The service does not answer (${error.message}); trying again…`;
      await pause(1000);
      continue;
    }
    if (response.ok) {
      showModel(await response.json());
      status.hidden = true;
      return;
    }
    status.textContent = `The model is not ready yet (${await errorMessage(response)}); trying again…`;
    await pause(1000);
  }
  status.textContent = "The model did not become ready; reload the page to try again.";
}

function showModel(model) {
  const [channels, height, width] = model.input_size;
  $("model-name").textContent = `${model.name} (version ${model.version}): ${model.parameters.toLocaleString("en")} `
    + `parameters, ${width}x${height} ${channels === 1 ? "grayscale" : "colour"} input, on ${model.device}`;
  $("model-trained-on").textContent = model.trained_on
    || (model.weights === "untrained" ? "nothing: no checkpoint was given, the weights are random"
      : `not known to the service (weights from HALO_CHECKPOINT, version ${model.version})`);
  $("model-preprocessing").textContent = `${model.preprocessing}.`;
  const classList = $("model-classes");
  classList.replaceChildren(...model.classes.map((name) => element("li", "", name)));
  $("model-facts").hidden = false;
  const caveat = $("model-caveat");
  caveat.textContent = model.weights === "untrained"
    ? "These weights are random: the answers below mean nothing."
    : `Whatever the image, the answer is one of these ${model.classes.length} classes: a picture of something `
      + "else (a cat, a street) gets the class it most resembles, not \"none of these\".";
  caveat.hidden = false;

  topK.max = String(model.classes.length);
  topK.value = String(Math.min(3, model.classes.length));
  layerSelect.replaceChildren(...model.halo_layers.map((name) => {
    const option = element("option", "", name === model.default_heatmap_layer ? `${name} (default)` : name);
    option.value = name;
    option.selected = name === model.default_heatmap_layer;
    return option;
  }));
  layerSelect.disabled = !wantHeatmaps.checked || model.halo_layers.length === 0;
  wantHeatmaps.disabled = model.halo_layers.length === 0;
  $("classify").disabled = false;
}

function newCard(file) {
  const card = $("result-template").content.firstElementChild.cloneNode(true);
  card.querySelector(".file-name").textContent = file.name;
  results.append(card);
  return card;
}

function showError(card, message) {
  card.querySelector(".pending").hidden = true;
  const error = card.querySelector(".error");
  error.textContent = message;
  error.hidden = false;
  card.classList.add("failed");
}

// A picture smaller than this across (a 28x28 Fashion-MNIST item) is shown enlarged by a whole
// factor, its pixels kept square: the PNG itself stays the image's own size.
const MIN_SHOWN_PX = 288;

function showPicture(figure, base64, alt, caption) {
  const img = figure.querySelector("img");
  img.alt = alt;
  img.addEventListener("load", () => {
    const factor = Math.floor(MIN_SHOWN_PX / Math.max(img.naturalWidth, img.naturalHeight));
    if (factor > 1) {
      img.style.width = `${img.naturalWidth * factor}px`; // CSSOM: allowed by the CSP
      img.classList.add("enlarged");
    }
  }, { once: true });
  img.src = `data:image/png;base64,${base64}`;
  if (caption) figure.querySelector("figcaption").textContent = caption;
  figure.hidden = false;
}

function showAnswer(card, file, answer, roundTripMs) {
  const list = card.querySelector(".predictions");
  for (const prediction of answer.predictions) {
    const item = element("li", "prediction");
    const percent = (prediction.score * 100).toFixed(1);
    const bar = element("span", "bar");
    const fill = element("span");
    fill.style.width = `${Math.max(0, Math.min(100, prediction.score * 100))}%`; // CSSOM: allowed by the CSP
    bar.append(fill);
    bar.setAttribute("aria-hidden", "true");
    item.append(element("span", "label", prediction.label), bar, element("span", "score", `${percent}%`));
    list.append(item);
  }
  const maps = answer.heatmaps;
  if (maps) {
    const [rows, cols] = maps.blocks;
    const [width, height] = maps.mapping.original_size;
    const [left, top, right, bottom] = maps.mapping.crop;
    const cropped = left > 0 || top > 0 || right < width || bottom < height;
    showPicture(card.querySelector(".overlay"), maps.overlay_png,
      `Attention of layer ${maps.layer} drawn on ${file.name}: warmer and brighter where the model looked more`,
      `Where layer ${maps.layer} looked, on your image (${width}x${height} pixels): yellow where it looked most, `
      + `dark purple least; ${cropped ? "hatched: cropped away, never seen" : "the model saw all of it"}.`);
    showPicture(card.querySelector(".mosaic"), maps.mosaic_png,
      `The ${rows} by ${cols} blocks of layer ${maps.layer} for ${file.name}, each block's attention over its window`);
  }
  const timing = answer.timing;
  card.querySelector(".timing").textContent = `Queue ${timing.queue_ms.toFixed(1)} ms, inference `
    + `${timing.inference_ms.toFixed(1)} ms in a batch of ${timing.batch_size}; `
    + `${roundTripMs.toFixed(0)} ms from this page and back.`;
  card.querySelector(".pending").hidden = true;
  card.querySelector(".answer").hidden = false;
  card.classList.add("answered");
}

async function classifyOne(file, query, card) {
  const body = new FormData();
  body.append("file", file, file.name);
  const started = performance.now();
  let response;
  try {
    response = await fetch(`/predict?${query}`, { method: "POST", body });
  } catch (error) {
    showError(card, `The request did not complete: ${error.message}`);
    return false;
  }
  if (!response.ok) {
    showError(card, await errorMessage(response));
    return false;
  }
  const answer = await response.json();
  showAnswer(card, file, answer.results[0], performance.now() - started);
  return true;
}

async function classify(files) {
  if (files.length === 0) return;
  const query = new URLSearchParams({ top_k: topK.value });
  if (wantHeatmaps.checked && layerSelect.value) {
    query.set("heatmaps", "true");
    query.set("heatmap_format", "png");
    query.set("heatmap_layer", layerSelect.value);
  }
  results.replaceChildren();
  formStatus.textContent = `Classifying ${plural(files.length, "image")}…`;
  const outcomes = await Promise.all([...files].map((file) => classifyOne(file, query, newCard(file))));
  const failed = outcomes.filter((ok) => !ok).length;
  formStatus.textContent = `${plural(files.length - failed, "image")} classified`
    + (failed ? `, ${failed} refused (the reason is on each).` : ".");
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  classify(fileInput.files);
});

wantHeatmaps.addEventListener("change", () => {
  layerSelect.disabled = !wantHeatmaps.checked;
});

// A file dropped anywhere else would make the browser leave the page to show it.
for (const type of ["dragover", "drop"]) {
  window.addEventListener(type, (event) => event.preventDefault());
}
dropZone.addEventListener("dragover", () => dropZone.classList.add("dragging"));
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
dropZone.addEventListener("drop", (event) => {
  dropZone.classList.remove("dragging");
  const files = event.dataTransfer.files;
  if (files.length === 0 || $("classify").disabled) return;
  fileInput.files = files;
  classify(files);
});

loadModel();
