// lverse serve: the page's behaviour. Plain JavaScript, no library, nothing fetched from elsewhere.
// Every request goes through the HTTP API (docs/serve.md): POST makes a job, GET /api/jobs/ID is
// polled for its place in the queue, the tokens drawn and the preview, then the result is drawn.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const fmt = (x) => (typeof x === "number" ? x.toFixed(3) : String(x));
let INFO = null;

const LABELS = { candidates: "candidates", keep: "keep", temperature: "temperature", top_k: "top-k",
                 top_p: "top-p", guidance: "guidance", rerank: "reranker", seed: "seed" };
const STEPS = { temperature: "0.05", top_p: "0.05", guidance: "0.1" };

// --- settings, prefilled with the bundle's defaults ------------------------------------------
function buildSettings(div) {
  const d = INFO.defaults[div.dataset.direction];
  for (const f of div.dataset.fields.split(" ")) {
    const label = document.createElement("label");
    label.textContent = LABELS[f];
    const input = document.createElement("input");
    input.name = f;
    if (f === "rerank") {
      input.setAttribute("list", "rerankers");
      input.value = d.rerank;
    } else {
      input.type = "number";
      input.step = STEPS[f] || "1";
      input.value = f === "keep" ? 1 : f === "seed" ? 0 : d[f];
      if (f === "candidates") { input.min = 1; input.max = INFO.limits.max_candidates; }
      if (f === "keep") { input.min = 1; input.max = INFO.limits.max_keep; }
    }
    label.appendChild(input);
    div.appendChild(label);
  }
}

// What the user typed, as sent: numbers as numbers, anything else as typed (the server checks it
// and says what is wrong); an empty field is left out and takes the default.
function readSettings(div) {
  const out = {};
  for (const input of div.querySelectorAll("input")) {
    const v = input.value.trim();
    if (v === "") continue;
    out[input.name] = input.name === "rerank" || isNaN(Number(v)) ? v : Number(v);
  }
  return out;
}

// --- running a job ---------------------------------------------------------------------------
class JobView {
  constructor(form, box) {
    this.form = form;
    this.box = box;
    this.go = $("button[type=submit]", form);
    this.cancel = $("button.cancel", form);
  }

  reset() {
    this.box.innerHTML = "";
    this.box.appendChild($("#job-template").content.cloneNode(true));
    this.box.classList.remove("busy");
  }

  error(message) { $(".error", this.box).textContent = message; }

  show(job) {
    const stage = $(".stage", this.box), count = $(".count", this.box), bar = $("progress", this.box);
    if (job.state === "queued") {
      stage.textContent = job.position > 0
        ? `Waiting in the queue: ${job.position} request${job.position > 1 ? "s" : ""} ahead of yours`
        : "Starting…";
      count.textContent = "";
    } else {
      stage.textContent = job.stage[0].toUpperCase() + job.stage.slice(1);
      count.textContent = job.state === "running" && job.total
        ? `${job.tokens.toLocaleString()} / ${job.total.toLocaleString()} tokens`
        : job.seconds.ran !== null ? `in ${job.seconds.ran.toFixed(1)} s` : "";
    }
    bar.value = job.total ? job.tokens / job.total : 0;
    const img = $("img.preview", this.box);
    if (job.preview && img.getAttribute("src") !== job.preview) img.src = job.preview;
  }

  // send(): the fetch that makes the job; render(result, box): draws a finished job's result.
  async run(send, render, results) {
    this.reset();
    results.innerHTML = "";
    this.go.disabled = true;
    this.box.classList.add("busy");
    try {
      const res = await send();
      let job = await res.json();
      if (!res.ok) { this.error(job.error || res.statusText); return; }
      this.cancel.disabled = false;
      this.cancel.onclick = async () => {
        this.cancel.disabled = true;
        await fetch(`/api/jobs/${job.id}`, { method: "DELETE" });
      };
      while (job.state === "queued" || job.state === "running") {
        this.show(job);
        await sleep(250);
        const poll = await fetch(`/api/jobs/${job.id}`);
        if (!poll.ok) { this.error((await poll.json()).error || poll.statusText); return; }
        job = await poll.json();
      }
      this.show(job);
      if (job.state === "done") render(job.result, results, this);
      else if (job.state === "error") this.error(job.error);
      else $(".stage", this.box).textContent = "Cancelled";
    } catch (e) {
      this.error(`cannot reach the server (${e})`);
    } finally {
      this.box.classList.remove("busy");
      this.go.disabled = false;
      this.cancel.disabled = true;
    }
  }
}

function postJSON(url, body) {
  return fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
}

function postImage(url, file, settings) {
  const form = new FormData();
  form.append("image", file, file.name);
  for (const [k, v] of Object.entries(settings)) form.append(k, String(v));
  return fetch(url, { method: "POST", body: form });
}

// --- drawing results -------------------------------------------------------------------------
function figure(url, caption, cls) {
  const fig = document.createElement("figure");
  if (cls) fig.className = cls;
  const img = document.createElement("img");
  img.src = url;
  img.alt = caption;
  img.loading = "lazy";
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(img, cap);
  return fig;
}

function scoreLine(scores) {
  return Object.entries(scores).filter(([k]) => k !== "score").map(([k, v]) => `${k} ${fmt(v)}`).join(" · ");
}

function renderImages(result, box, view) {
  if (result.warning) $(".warning", view.box).textContent = `Warning: ${result.warning}`;
  result.images.forEach((im, r) => {
    const n = result.candidates[r].length;
    const fig = figure(im.url, `score ${fmt(im.score)} (${scoreLine(im.scores)}) · candidate ${im.candidate + 1} of ${n}, seed ${im.seed}`, "kept");
    $("img", fig).classList.add("kept");
    box.appendChild(fig);
  });
  const all = document.createElement("div");
  all.className = "candidates";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "cancel show-candidates";
  const total = result.candidates.reduce((s, c) => s + c.length, 0);
  button.textContent = `Show all ${total} candidates, best first`;
  button.onclick = () => {
    button.remove();
    result.candidates.forEach((round, r) => {
      const grid = document.createElement("div");
      grid.className = "grid";
      for (const c of round) {
        grid.appendChild(figure(c.url, `#${c.candidate + 1} ${fmt(c.score)}`, c.candidate === result.images[r].candidate ? "kept-best" : ""));
      }
      all.appendChild(grid);
    });
  };
  all.appendChild(button);
  box.appendChild(all);
}

function renderCaptions(result, box) {
  box.appendChild(figure(result.input, "the image as the model sees it"));
  const right = document.createElement("div");
  const best = document.createElement("p");
  best.className = "caption";
  best.textContent = result.caption;
  const table = document.createElement("table");
  table.className = "captions";
  const families = Object.keys(result.candidates[0]).filter((k) => !["caption", "raw"].includes(k));
  table.innerHTML = `<tr><th>#</th><th>caption</th><th>drawn</th>${families.map((f) => `<th>${f}</th>`).join("")}</tr>`;
  // Candidates come best first; the same caption drawn several times has the same scores, so it is
  // shown once with how often it was drawn.
  const rows = [];
  for (const c of result.candidates) {
    const last = rows[rows.length - 1];
    if (last && last.c.caption === c.caption && last.c.score === c.score) last.n += 1;
    else rows.push({ c, n: 1 });
  }
  rows.forEach(({ c, n }, i) => {
    const tr = document.createElement("tr");
    if (i >= 10) tr.hidden = true;
    const cells = [String(i + 1), c.caption || "(empty)", `×${n}`, ...families.map((f) => fmt(c[f]))];
    cells.forEach((text, j) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (j !== 1) td.className = "num";
      tr.appendChild(td);
    });
    table.appendChild(tr);
  });
  right.append(best, table);
  if (rows.length > 10) {
    const more = document.createElement("button");
    more.type = "button";
    more.className = "cancel";
    more.textContent = `Show all ${rows.length} different captions`;
    more.onclick = () => { table.querySelectorAll("tr[hidden]").forEach((tr) => (tr.hidden = false)); more.remove(); };
    right.appendChild(more);
  }
  box.appendChild(right);
}

function tripText(text, cls) {
  const p = document.createElement("div");
  p.className = `text ${cls}`;
  p.textContent = text;
  return p;
}

function arrow() {
  const a = document.createElement("span");
  a.className = "arrow";
  a.textContent = "→";
  return a;
}

function renderTripImage(result, box) {
  const row = document.createElement("div");
  row.className = "trip";
  row.append(figure(result.input, "your image"), arrow(), tripText(result.caption, "caption"), arrow(),
             figure(result.image.url, `drawn from the caption · score ${fmt(result.image.score)}`, "back"));
  box.appendChild(row);
}

function renderTripText(result, box) {
  const row = document.createElement("div");
  row.className = "trip";
  row.append(tripText(result.prompt, "prompt"), arrow(),
             figure(result.image.url, `best image · score ${fmt(result.image.score)}`, "there"), arrow(),
             tripText(result.caption, "caption"));
  box.appendChild(row);
}

// --- image inputs: a file chooser and a drop zone ----------------------------------------------
function imageInput(zone, input) {
  const state = { file: null };
  const take = (file) => {
    state.file = file;
    const img = $("img.local", zone);
    img.src = URL.createObjectURL(file);
    img.alt = file.name;
  };
  input.addEventListener("change", () => { if (input.files.length) take(input.files[0]); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) take(e.dataTransfer.files[0]);
  });
  return state;
}

// --- wiring --------------------------------------------------------------------------------------
function wire() {
  for (const b of document.querySelectorAll("nav.tabs button")) {
    b.addEventListener("click", () => {
      document.querySelectorAll("nav.tabs button, .tab").forEach((x) => x.classList.remove("active"));
      b.classList.add("active");
      $(`#${b.dataset.tab}`).classList.add("active");
    });
  }
  document.querySelectorAll(".settings").forEach(buildSettings);
  const list = document.createElement("datalist");
  list.id = "rerankers";
  for (const r of INFO.rerankers) list.appendChild(new Option(r, r));
  document.body.appendChild(list);

  const t2i = new JobView($("#t2i-form"), $("#t2i-job"));
  $("#t2i-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const body = { prompt: $("#t2i-prompt").value, ...readSettings($("#t2i .settings")) };
    t2i.run(() => postJSON("/api/text-to-image", body), renderImages, $("#t2i-results"));
  });

  const i2t = new JobView($("#i2t-form"), $("#i2t-job"));
  const i2tImage = imageInput($("#i2t-drop"), $("#i2t-file"));
  $("#i2t-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (!i2tImage.file) { i2t.reset(); i2t.error("choose or drop an image first"); return; }
    i2t.run(() => postImage("/api/image-to-text", i2tImage.file, readSettings($("#i2t .settings"))),
            renderCaptions, $("#i2t-results"));
  });

  const rti = new JobView($("#rti-form"), $("#rti-job"));
  const rtiImage = imageInput($("#rti-drop"), $("#rti-file"));
  $("#rti-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (!rtiImage.file) { rti.reset(); rti.error("choose or drop an image first"); return; }
    rti.run(() => postImage("/api/round-trip/image", rtiImage.file, readSettings($("#rt-settings"))),
            renderTripImage, $("#rti-results"));
  });

  const rtt = new JobView($("#rtt-form"), $("#rtt-job"));
  $("#rtt-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const body = { prompt: $("#rtt-prompt").value, ...readSettings($("#rt-settings")) };
    rtt.run(() => postJSON("/api/round-trip/text", body), renderTripText, $("#rtt-results"));
  });
}

async function showQueue() {
  for (;;) {
    try {
      const q = (await (await fetch("/api/info")).json()).queue;
      $("#queue").textContent = q.running ? `busy · ${q.waiting} waiting` : "idle";
    } catch (e) {
      $("#queue").textContent = "server unreachable";
    }
    await sleep(2000);
  }
}

async function main() {
  INFO = await (await fetch("/api/info")).json();
  const where = INFO.checkpoint ? INFO.checkpoint.split("/").slice(-2).join("/") : "in-memory model";
  $("#model").textContent = `${where} · ${INFO.device} · ${INFO.resolution}×${INFO.resolution}` +
    (INFO.has_clip ? " · CLIP reranker" : "");
  wire();
  document.body.dataset.ready = "1";
  showQueue();
}

main();
