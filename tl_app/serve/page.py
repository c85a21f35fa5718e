"""The upload page at /: pick a model, upload an image, see the top-k with bars.

Self-contained (no external scripts, fonts or styles), so it works offline.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tl-app model server</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 44rem; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; }
  form { display: grid; gap: .6rem; grid-template-columns: 8rem 1fr; align-items: center; }
  button { grid-column: 2; padding: .5rem; font-size: 1rem; }
  #status { margin: 1rem 0; color: #555; min-height: 1.2em; }
  #status.error { color: #b00020; }
  .row { display: grid; grid-template-columns: 10rem 1fr 4.5rem; gap: .5rem; align-items: center; margin: .3rem 0; }
  .track { background: #eee; height: 1.1rem; border-radius: 3px; }
  .bar { background: #3b7ddd; height: 100%; border-radius: 3px; }
  .row:first-child .bar { background: #1f9d55; }
  .prob { text-align: right; font-variant-numeric: tabular-nums; }
  #preview { max-width: 12rem; max-height: 12rem; display: block; margin-top: 1rem; }
  #top1 { font-weight: bold; }
  [hidden] { display: none !important; }
</style>
</head>
<body>
<h1>tl-app model server</h1>
<form id="form">
  <label for="model">Model</label>
  <select id="model" name="model" required></select>
  <label for="file">Image</label>
  <input id="file" name="file" type="file" accept="image/*" required>
  <label for="topk">Top-k</label>
  <input id="topk" name="topk" type="number" min="1" max="5" value="5">
  <label for="token">Token</label>
  <input id="token" name="token" type="password" placeholder="only if the server needs one" autocomplete="off">
  <button id="submit" type="submit">Classify</button>
</form>
<div id="status"></div>
<img id="preview" alt="the image to classify" hidden>
<div id="top1row" hidden>Top-1: <span id="top1"></span></div>
<div id="results"></div>
<script>
const $ = (id) => document.getElementById(id);
function headers() {
  const t = $("token").value.trim();
  return t ? {"Authorization": "Bearer " + t} : {};
}
function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}
async function loadModels() {
  try {
    const r = await fetch("/api/models", {headers: headers()});
    const body = await r.json();
    if (!r.ok) { status(body.error || ("HTTP " + r.status), true); return; }
    const select = $("model");
    const current = select.value;
    select.innerHTML = "";
    for (const m of body.models) {
      const o = document.createElement("option");
      o.value = m.name;
      o.textContent = m.name + " (version " + m.version + ", " + m.classes.length + " classes)";
      o.dataset.classes = String(m.classes.length);
      select.appendChild(o);
    }
    if (current) select.value = current;
    fitTopK();
    document.body.dataset.models = String(body.models.length);
    if (!body.models.length) status("No models under the server's root yet.", true);
    else status("Ready.");
  } catch (e) { status("Could not list models: " + e, true); }
}
function fitTopK() {
  // top-k never above the chosen model's class count; the default is 5 or all classes when fewer
  const option = $("model").selectedOptions[0];
  const classes = option ? Number(option.dataset.classes) || 1 : 1;
  const topk = $("topk");
  const wanted = Number(topk.value) || 5;
  topk.max = String(classes);
  topk.value = String(Math.min(Math.max(wanted, 1), classes));
}
function clearResult() {
  $("results").innerHTML = "";
  $("top1").textContent = "";
  $("top1row").hidden = true;
}
let previewUrl = null;
function preview() {
  const file = $("file").files[0];
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = file ? URL.createObjectURL(file) : null;
  $("preview").hidden = !file;
  if (file) $("preview").src = previewUrl; else $("preview").removeAttribute("src");
  clearResult();
}
function show(result) {
  const box = $("results");
  box.innerHTML = "";
  for (const p of result.top_k) {
    const row = document.createElement("div");
    row.className = "row";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const track = document.createElement("div");
    track.className = "track";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = (100 * p.probability).toFixed(1) + "%";
    track.appendChild(bar);
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = (100 * p.probability).toFixed(1) + "%";
    row.append(label, track, prob);
    box.appendChild(row);
  }
  $("top1").textContent = result.top_k.length ? result.top_k[0].label : "";
  $("top1row").hidden = !result.top_k.length;
}
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("file").files[0];
  const model = $("model").value;
  if (!file || !model) { status("Pick a model and an image.", true); return; }
  const data = new FormData();
  data.append("file", file, file.name);
  status("Classifying " + file.name + " ...");
  document.body.dataset.state = "busy";
  try {
    const url = "/api/models/" + encodeURIComponent(model) + "/predict?top_k=" + encodeURIComponent($("topk").value);
    const r = await fetch(url, {method: "POST", body: data, headers: headers()});
    const body = await r.json();
    if (!r.ok) { status(body.error || ("HTTP " + r.status), true); document.body.dataset.state = "error"; return; }
    show(body.results[0]);
    status(model + " version " + body.version + ": " + file.name);
    document.body.dataset.state = "done";
  } catch (e) { status("Request failed: " + e, true); document.body.dataset.state = "error"; }
});
$("token").addEventListener("change", loadModels);
$("model").addEventListener("change", () => { fitTopK(); clearResult(); });
$("file").addEventListener("change", preview);
loadModels();
</script>
</body>
</html>
"""
