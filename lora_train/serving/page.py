"""The page at ``/``: pick an adapter, type text, see the class probabilities as bars (plain HTML + JS, no CDN).

``/?adapter=NAME&text=TEXT`` pre-fills the form and classifies at once (handy for links and screenshots).
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lora_train adapters</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  .muted { color: #666; font-size: .9rem; }
  label { display: block; margin-top: 1rem; font-weight: 600; }
  select, textarea { width: 100%; font: inherit; padding: .4rem; box-sizing: border-box; }
  textarea { height: 5rem; }
  button { margin-top: .8rem; font: inherit; padding: .4rem 1.2rem; cursor: pointer; }
  .row { display: grid; grid-template-columns: 8rem 1fr 4.5rem; align-items: center; gap: .6rem; margin: .35rem 0; }
  .track { background: #eee; border-radius: 3px; height: 1.3rem; }
  .bar { background: #4a7bd0; height: 100%; border-radius: 3px; }
  .best .bar { background: #1f9d55; }
  .best .name { font-weight: 700; }
  .num { text-align: right; font-variant-numeric: tabular-nums; }
  #error { color: #b00020; margin-top: 1rem; white-space: pre-wrap; }
</style>
</head>
<body>
<h1>lora_train adapters</h1>
<div class="muted" id="info">loading adapters&hellip;</div>
<form id="form">
  <label for="adapter">Adapter</label>
  <select id="adapter" required></select>
  <div class="muted" id="about"></div>
  <label for="text">Text</label>
  <textarea id="text" required placeholder="Type a sentence to classify"></textarea>
  <button type="submit">Classify</button>
</form>
<div id="error"></div>
<div id="result"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let adapters = [];

function describe(a) {
  const acc = a.metrics.eval_accuracy;
  const score = acc === undefined ? "" : ", validation accuracy " + acc.toFixed(4);
  return a.task + " on " + a.base_model + ": " + a.labels.length + " classes" + score;
}

async function loadAdapters() {
  const response = await fetch("/v1/adapters");
  adapters = await response.json();
  const select = $("adapter");
  select.replaceChildren(...adapters.map((a) => new Option(a.name + " (" + a.task + ")", a.name)));
  $("info").textContent = adapters.length + " adapter(s) over one base model";
  const wanted = new URLSearchParams(location.search).get("adapter");
  if (wanted) select.value = wanted;
  showAbout();
}

function showAbout() {
  const a = adapters.find((x) => x.name === $("adapter").value);
  $("about").textContent = a ? describe(a) : "";
}

function showResult(prediction) {
  const rows = Object.entries(prediction.probabilities).sort((x, y) => y[1] - x[1]);
  const nodes = rows.map(([name, p]) => {
    const row = document.createElement("div");
    row.className = "row" + (name === prediction.label ? " best" : "");
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const track = document.createElement("div");
    track.className = "track";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = (100 * p).toFixed(1) + "%";
    track.append(bar);
    const number = document.createElement("span");
    number.className = "num";
    number.textContent = (100 * p).toFixed(1) + " %";
    row.append(label, track, number);
    return row;
  });
  if (prediction.truncated) {
    const note = document.createElement("div");
    note.className = "muted";
    note.textContent = "The text was longer than the adapter's max_length and was cut.";
    nodes.push(note);
  }
  $("result").replaceChildren(...nodes);
}

async function classify(event) {
  if (event) event.preventDefault();
  $("error").textContent = "";
  const body = JSON.stringify({ adapter: $("adapter").value, texts: [$("text").value] });
  const response = await fetch("/v1/classify", {
    method: "POST", headers: { "Content-Type": "application/json" }, body,
  });
  const answer = await response.json();
  if (!response.ok) {
    $("result").replaceChildren();
    const detail = answer.detail;
    $("error").textContent = response.status + ": " + (typeof detail === "string" ? detail : JSON.stringify(detail));
    return;
  }
  showResult(answer.predictions[0]);
}

$("adapter").addEventListener("change", showAbout);
$("form").addEventListener("submit", classify);
loadAdapters().then(() => {
  const text = new URLSearchParams(location.search).get("text");
  if (text) { $("text").value = text; classify(); }
}).catch((err) => { $("error").textContent = "cannot list adapters: " + err; });
</script>
</body>
</html>
"""
