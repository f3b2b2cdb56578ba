// The viewer's page: plain DOM code over the JSON API of deconvnet/serve.py.
"use strict";

const $ = (id) => document.getElementById(id);
const THUMBS = 24;  // data set images per page of the picker
let info = null;
let thumbOffset = 0;
let featureRequest = 0;  // only the latest request for a map is drawn
let analysisRequest = 0;

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function figure(src, caption, className = "pix") {
  return el("figure", {}, el("img", {src, className, alt: caption}), el("figcaption", {textContent: caption}));
}

function setStatus(id, text, isError = false) {
  $(id).textContent = text;
  $(id).classList.toggle("error", isError);
}

// ---------------------------------------------------------------- top-k over the data set (Fig. 2)

async function pollTopk() {
  let state;
  try {
    state = await api("/api/topk");
  } catch (e) {
    $("topk-text").textContent = `top-k: ${e.message}`;
    setTimeout(pollTopk, 2000);
    return;
  }
  $("topk-bar").max = state.total;
  $("topk-bar").value = state.done;
  if (state.state === "running") {
    $("topk-text").textContent = `top-k: ${state.done} / ${state.total} images`;
    setTimeout(pollTopk, 500);
  } else if (state.state === "error") {
    $("topk-text").textContent = "top-k failed";
    setStatus("feature-status", state.error, true);
  } else {
    $("topk-text").textContent = `top-k: ${state.total} images, ready`;
    $("features").classList.remove("waiting");
    showFeature();
  }
}

function selectedLayer() {
  return info.layers.find((layer) => layer.name === $("layer").value);
}

async function showFeature() {
  const layer = selectedLayer();
  const feature = Math.min(Math.max(0, parseInt($("feature").value, 10) || 0), layer.maps - 1);
  $("feature").value = feature;
  $("feature").max = layer.maps - 1;
  if ($("features").classList.contains("waiting")) {
    setStatus("feature-status", "waiting for the top-k pass");
    return;
  }
  const request = ++featureRequest;
  setStatus("feature-status", `computing ${layer.name} map ${feature} ...`);
  try {
    const result = await api(`/api/topk/${encodeURIComponent(layer.name)}/${feature}`);
    if (request !== featureRequest) return;
    const projections = result.entries.map((e, j) =>
      el("img", {src: e.projection, className: "pix", title: `#${j + 1}: image ${e.image} (${e.label}), activation ${e.value.toFixed(3)}`}));
    const patches = result.entries.map((e, j) =>
      el("img", {src: e.patch, className: "pix", title: `#${j + 1}: image ${e.image} (${e.label}), box ${e.box}`}));
    $("gallery-projections").replaceChildren(...projections);
    $("gallery-patches").replaceChildren(...patches);
    const strongest = result.entries.length ? result.entries[0].value.toFixed(3) : "none";
    setStatus("feature-status", `${layer.name} map ${feature}: top ${result.entries.length} of ${info.topk_images} images, strongest activation ${strongest}`);
    const link = $("atlas-link");  // the same map in the atlas: LAYER.html#MAP
    link.hidden = !info.atlas;
    if (info.atlas) link.href = `${info.atlas}${encodeURIComponent(layer.name)}.html#${feature}`;
  } catch (e) {
    if (request === featureRequest) setStatus("feature-status", e.message, true);
  }
}

function pickFeature(layer, feature) {
  $("layer").value = layer;
  $("feature").value = feature;
  showFeature();
  $("features").scrollIntoView({behavior: "smooth"});
}

// ---------------------------------------------------------------- one image

async function showThumbnails() {
  try {
    const page = await api(`/api/images?offset=${thumbOffset}&count=${THUMBS}`);
    $("thumbs-range").textContent = ` ${page.offset}-${page.offset + page.images.length - 1} of ${page.total} `;
    $("thumbs").replaceChildren(...page.images.map((image) => {
      const node = el("img", {src: image.png, title: `image ${image.index}: ${image.label}`});
      node.dataset.index = image.index;
      node.addEventListener("click", () => {
        document.querySelectorAll("#thumbs img").forEach((n) => n.classList.toggle("selected", n === node));
        analyse(`/api/images/${image.index}`, {}, `data set image ${image.index} (${image.label})`);
      });
      return node;
    }));
  } catch (e) {
    setStatus("analysis-status", e.message, true);
  }
}

async function analyse(path, options, caption) {
  const request = ++analysisRequest;
  setStatus("analysis-status", `analysing ${caption} ...`);
  try {
    const result = await api(path, options);
    if (request !== analysisRequest) return;
    drawAnalysis(result, caption);
    setStatus("analysis-status", "");
  } catch (e) {
    if (request === analysisRequest) setStatus("analysis-status", e.message, true);
  }
}

function drawAnalysis(result, caption) {
  $("analysis").hidden = false;
  $("picture").src = result.picture;
  $("picture-caption").textContent = caption;
  $("prediction").replaceChildren(...result.prediction.map((p) => el("tr", {},
    el("td", {textContent: p.name}),
    el("td", {textContent: `${(100 * p.probability).toFixed(1)}%`}),
    el("td", {}, el("div", {className: "bar", style: `width: ${Math.round(150 * p.probability)}px`})))));
  $("layers").replaceChildren(...result.layers.map((layer) => el("div", {className: "layer"},
    el("div", {className: "name", textContent: layer.layer},
      result.image && result.image.index !== undefined ? sanityButton(result.image.index, layer.layer) : ""),
    el("div", {className: "features"}, ...layer.features.map((f) => {
      const card = el("div", {className: "feature", title: `show the top 9 of ${layer.layer} map ${f.feature} over the data set`},
        el("div", {className: "title", textContent: `map ${f.feature}: ${f.value.toFixed(3)}`}),
        el("div", {className: "row"},
          figure(f.activation, "activation"), figure(f.input, "field"),
          ...info.rules.map((rule) => f.projections[rule] ? figure(f.projections[rule], rule)
            : el("figure", {title: f.errors[rule]}, el("figcaption", {className: "error", textContent: `${rule}: not defined here`})))));
      card.addEventListener("click", () => pickFeature(layer.layer, f.feature));
      return card;
    })))));
  const o = result.occlusion;
  $("occlusion-caption").textContent = `(Fig. 7: a ${o.size} px grey square every ${o.stride} px; ` +
    `${o.layer} map ${o.feature}; p(${o.target_name}) unoccluded ${(100 * o.unoccluded.probability).toFixed(1)}%)`;
  const legend = el("div", {className: "legend"}, ...o.legend.flatMap((entry) =>
    [el("span", {style: `background: ${entry.color}`}), entry.name]));
  $("occlusion").replaceChildren(
    figure(o.covered, "(a) square where p is lowest", "pix big"),
    figure(o.activity, `(b) ${o.layer} map ${o.feature}: total activation`, "pix big"),
    o.projection ? figure(o.projection, `(c) projection of map ${o.feature}`, "pix big")
      : el("figure", {}, el("figcaption", {className: "error", textContent: `(c) no projection: ${o.projection_missing}`})),
    figure(o.probability, `(d) p(${o.target_name}), 0 (blue) to 1 (red)`, "pix big"),
    el("figure", {}, el("img", {src: o.label, className: "pix big", alt: "most probable label"}),
      el("figcaption", {textContent: "(e) most probable label"}), legend));
}

// The sanity checks of the strongest unit of a layer: its randomisation strip (Adebayo et al. 2018).
function sanityButton(index, layer) {
  const strip = el("div", {className: "strip"});
  const button = el("button", {textContent: "randomisation strip", title:
    "re-initialise the layers from this one down, one at a time, and re-project its strongest unit by each rule"});
  button.addEventListener("click", async () => {
    button.disabled = true;
    strip.replaceChildren(el("span", {textContent: " randomising ..."}));
    try {
      const r = await api(`/api/sanity/${index}/${encodeURIComponent(layer)}`);
      const rho = Object.entries(r.all_randomised).map(([rule, v]) => `${rule} ${v === null ? "-" : v.toFixed(2)}`).join(", ");
      strip.replaceChildren(figure(r.strip, `rank correlation with the trained projection once every layer is re-initialised: ${rho}`, "strip-img"));
    } catch (e) {
      strip.replaceChildren(el("span", {className: "error", textContent: e.message}));
    }
    button.disabled = false;
  });
  return el("span", {}, " ", button, strip);
}

function upload() {
  const file = $("upload").files[0];
  if (!file) return;
  document.querySelectorAll("#thumbs img").forEach((n) => n.classList.remove("selected"));
  if (file.size > info.max_upload) {
    setStatus("analysis-status", `${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB; the limit is ${info.max_upload / 2 ** 20} MB`, true);
    return;
  }
  analyse("/api/upload", {method: "POST", body: file, headers: {"Content-Type": file.type || "application/octet-stream"}},
          `upload ${file.name}`);
}

// ---------------------------------------------------------------- start

async function start() {
  info = await api("/api/info");
  $("meta").textContent = `${info.checkpoint} (${info.model}, ${info.classes.length} classes) on ${info.data}`;
  $("layer").replaceChildren(...info.layers.map((layer) =>
    el("option", {value: layer.name, textContent: `${layer.name} (${layer.maps} maps)`})));
  $("layer").addEventListener("change", showFeature);
  $("feature").addEventListener("change", showFeature);
  $("feature-prev").addEventListener("click", () => { $("feature").value = parseInt($("feature").value, 10) - 1; showFeature(); });
  $("feature-next").addEventListener("click", () => { $("feature").value = parseInt($("feature").value, 10) + 1; showFeature(); });
  $("thumbs-prev").addEventListener("click", () => { thumbOffset = Math.max(0, thumbOffset - THUMBS); showThumbnails(); });
  $("thumbs-next").addEventListener("click", () => {
    if (thumbOffset + THUMBS < info.data_images) thumbOffset += THUMBS;
    showThumbnails();
  });
  $("upload").addEventListener("change", upload);
  showFeature();
  showThumbnails();
  pollTopk();
}

start().catch((e) => setStatus("analysis-status", `cannot reach the server: ${e.message}`, true));
