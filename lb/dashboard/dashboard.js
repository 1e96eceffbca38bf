// The dashboard's behaviour: poll GET /cluster, keep the worker table, charts and job bars current, call the
// admin API from the buttons, stream a chat reply in the playground. No libraries: it must run air-gapped.
"use strict";

const POLL_MS = 2000;
const $ = (sel) => document.querySelector(sel);
const tokenInput = $("#admin-token");
const notice = $("#notice");
let adminTokenSet = false;
const jobRates = new Map(); // job id -> [time, done] at the first sighting, for an ETA when the job has none

tokenInput.value = sessionStorage.getItem("ib-admin-token") || "";
tokenInput.addEventListener("change", () => sessionStorage.setItem("ib-admin-token", tokenInput.value));

// ---- formatting -------------------------------------------------------------------------------------------
const dash = "–";
function num(v, digits = 0) { return v === null || v === undefined ? dash : Number(v).toFixed(digits); }
function ms(v) { return v === null || v === undefined ? dash : v >= 1000 ? (v / 1000).toFixed(2) + " s" : v.toFixed(0) + " ms"; }
function ago(unix) {
  if (!unix) return "never";
  const s = Math.max(0, Date.now() / 1000 - unix);
  return s < 60 ? s.toFixed(1) + " s" : Math.round(s / 60) + " min";
}
function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return dash;
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min` : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}
function show(message, ok = false) {
  notice.textContent = message;
  notice.className = ok ? "notice ok" : "notice";
  notice.hidden = false;
}

// ---- the worker table --------------------------------------------------------------------------------------
const COLUMNS = ["index", "url", "state", "model", "gpu", "in_flight", "engine", "tokens", "ttft", "latency",
                 "served", "errors", "checked", "gpu_use", "power", "host", "actions"];

function firstGpu(w) {
  const g = w.gpu;
  return g && g.available && g.gpus && g.gpus.length ? g.gpus[0] : null;
}

function cells(w) {
  const g = firstGpu(w);
  const e = w.engine || {};
  const r = w.recent || {};
  const gpuName = g ? (g.name || "GPU").replace(/^NVIDIA /, "") + (w.gpu.gpus.length > 1 ? ` ×${w.gpu.gpus.length}` : "")
                    : (w.gpu && w.gpu.available === false ? "none" : dash);
  return {
    index: String(w.index),
    url: w.url.replace(/^https?:\/\//, ""),
    model: w.models.join(", ") || dash,
    gpu: gpuName,
    in_flight: String(w.in_flight),
    engine: `${num(e.running)} / ${num(e.waiting)}` + (e.kv_cache_usage != null ? ` (KV ${(e.kv_cache_usage * 100).toFixed(0)}%)` : ""),
    tokens: num(e.tokens_per_s, 1),
    ttft: ms(e.ttft_ms),
    latency: `${ms(r.latency_ms_p50)} / ${ms(r.latency_ms_p99)}`,
    served: String(w.requests_served),
    errors: `${w.errors} / ${w.retries}`,
    checked: ago(w.last_check),
    gpu_use: g && g.utilization_gpu != null
      ? `${g.utilization_gpu}% · ${(g.memory_used_mb / 1024).toFixed(1)}/${(g.memory_total_mb / 1024).toFixed(0)} GiB` : dash,
    power: g && g.power_draw_w != null
      ? `${g.power_draw_w.toFixed(0)}/${num(g.power_limit_w)} W ${num(g.temperature_gpu)}°C` : dash,
    host: w.system ? `${num(w.system.cpu_load, 1)} · ${num(w.system.ram_percent)}%` : dash,
  };
}

function newRow(index) {
  const tr = document.createElement("tr");
  tr.dataset.worker = index;
  for (const name of COLUMNS) {
    const td = document.createElement("td");
    td.className = name;
    tr.appendChild(td);
  }
  const actions = tr.querySelector("td.actions");
  const buttons = [["drain", "Drain", "stop sending new requests; in-flight ones finish"],
                   ["readmit", "Admit", "re-admit: send requests again"],
                   ["remove", "Remove", "drain, then remove from the pool (click twice)"]];
  for (const [action, label, help] of buttons) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.action = action;
    button.dataset.worker = index;
    button.textContent = label;
    button.title = help;
    button.addEventListener("click", () => adminAction(button, action, index));
    actions.appendChild(button);
  }
  return tr;
}

function renderWorkers(workers) {
  const body = $("#workers tbody");
  const rows = new Map([...body.querySelectorAll("tr")].map((tr) => [tr.dataset.worker, tr]));
  for (const w of workers) {
    const key = String(w.index);
    let tr = rows.get(key);
    if (!tr) { tr = newRow(key); body.appendChild(tr); }
    rows.delete(key);
    tr.className = "state-" + w.state;
    tr.dataset.state = w.state;
    const values = cells(w);
    for (const [name, text] of Object.entries(values)) {
      const td = tr.querySelector("td." + name);
      if (td.textContent !== text) td.textContent = text;
    }
    tr.querySelector("td.url").title = w.telemetry_error ? "telemetry: " + w.telemetry_error : w.url;
    const g = firstGpu(w);
    tr.querySelector("td.gpu").title = g ? `${g.name} (driver ${w.gpu.driver_version || "?"})` : (w.gpu?.reason || "");
    const state = tr.querySelector("td.state");
    state.innerHTML = "";
    const badge = document.createElement("span");
    badge.className = "badge " + w.state;
    badge.textContent = w.state;
    state.appendChild(badge);
    tr.querySelector('button[data-action="drain"]').disabled = w.draining;
    tr.querySelector('button[data-action="readmit"]').disabled = !w.draining;
  }
  for (const tr of rows.values()) tr.remove(); // removed from the pool
}

function renderSummary(doc) {
  const b = doc.balancer;
  const r = b.recent || {};
  const items = [
    ["workers", ["healthy", "draining", "down"].map((state) =>
      `${doc.workers.filter((w) => w.state === state).length} ${state}`).join(" · ")],
    ["in flight", b.in_flight], ["queued", b.queue_depth],
    ["requests/s", num(b.requests_per_s, 1)], ["tokens/s", num(b.tokens_per_s, 1)],
    ["p50", ms(r.latency_ms_p50)], ["p99", ms(r.latency_ms_p99)],
    ["errors (recent)", r.errors], ["retries", b.retries], ["rejected", b.rejected],
    ["requests", b.total_requests], ["up", duration(doc.uptime_s)], ["policy", doc.policy],
  ];
  const box = $("#summary");
  box.innerHTML = "";
  for (const [label, value] of items) {
    const span = document.createElement("span");
    span.textContent = label + " ";
    const strong = document.createElement("b");
    strong.textContent = value;
    span.appendChild(strong);
    box.appendChild(span);
  }
}

// ---- jobs -----------------------------------------------------------------------------------------------
function renderJobs(jobs) {
  const box = $("#jobs");
  const empty = box.querySelector("p.muted");
  if (!jobs || !jobs.length) {
    if (!empty) box.innerHTML = '<p class="muted">No batch or job is running.</p>';
    return;
  }
  if (empty) empty.remove();
  const rows = new Map([...box.querySelectorAll(".job")].map((row) => [row.dataset.job, row]));
  const now = Date.now() / 1000;
  for (const job of jobs) {
    const total = job.total || 0;
    const done = job.completed || 0;
    const pct = total ? Math.min(100, (100 * done) / total) : 0;
    let eta = job.eta_s;
    if (eta == null && total) {
      const first = jobRates.get(job.id) || [now, done];
      jobRates.set(job.id, first);
      const rate = (done - first[1]) / Math.max(1e-6, now - first[0]);
      eta = rate > 0 ? (total - done) / rate : null;
    }
    let row = rows.get(job.id);
    rows.delete(job.id);
    if (!row) { // rows are updated in place, so the bar's width animates instead of jumping
      row = document.createElement("div");
      row.className = "job";
      row.dataset.job = job.id;
      row.innerHTML = '<span class="name"></span><div class="bar"><div></div></div><span class="eta"></span>';
      box.appendChild(row);
    }
    row.querySelector(".name").textContent = `${job.kind || "job"} ${job.name || job.id} · ${job.status || ""}`;
    row.querySelector(".bar > div").style.width = pct.toFixed(1) + "%";
    row.querySelector(".eta").textContent = `${done}/${total || "?"} (${pct.toFixed(0)}%) · ETA ${duration(eta)}`;
  }
  for (const row of rows.values()) row.remove(); // finished
}

// ---- charts: line charts drawn on <canvas> ---------------------------------------------------------------------
const COLORS = ["#2f6fdb", "#d9622b"];

// `dual`: the second series gets its own scale, on the right (requests/s and tokens/s differ 10-100x)
function drawChart(canvas, times, series, dual = false) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== width * ratio) { canvas.width = width * ratio; canvas.height = height * ratio; }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const left = 40, right = dual ? 36 : 8, top = 8, bottom = 18;
  const plotW = width - left - right, plotH = height - top - bottom;
  const peak = (values) => niceCeil(Math.max(0, ...values.filter((v) => v != null)) || 1);
  const maxes = dual ? series.map(peak) : series.map(() => peak(series.flat()));
  const max = maxes[0];
  const t1 = times.length ? times[times.length - 1] : Date.now() / 1000;
  const span = Math.max(60, t1 - (times.length ? times[0] : t1));
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillStyle = "#6b7480";
  ctx.strokeStyle = "#e3e6ea";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + plotH - (plotH * i) / 4;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + plotW, y); ctx.stroke();
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(short((max * i) / 4), left - 4, y);
    if (dual) { ctx.textAlign = "left"; ctx.fillStyle = COLORS[1]; ctx.fillText(short((maxes[1] * i) / 4), left + plotW + 3, y); ctx.fillStyle = "#6b7480"; }
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (let i = 0; i <= 4; i++) {
    const ago = (span * (4 - i)) / 4;
    ctx.fillText(i === 4 ? "now" : ago <= 120 ? `-${Math.round(ago)} s` : `-${(ago / 60).toFixed(1)} min`, left + (plotW * i) / 4, top + plotH + 4);
  }
  series.forEach((values, k) => {
    ctx.strokeStyle = COLORS[k % COLORS.length];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let pen = false;
    values.forEach((v, i) => {
      if (v == null) { pen = false; return; }
      const x = left + plotW * (1 - (t1 - times[i]) / span);
      const y = top + plotH - (plotH * v) / maxes[k];
      if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      pen = true;
    });
    ctx.stroke();
  });
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 4, 6, 8, 10]) if (v <= m * p) return m * p; // quarters stay round
  return 10 * p;
}
function short(v) {
  return v >= 1000 ? (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "k" : v >= 10 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toFixed(2);
}

function renderCharts(h) {
  drawChart($("#chart-throughput"), h.t, [h.requests_per_s, h.tokens_per_s], true);
  drawChart($("#chart-latency"), h.t, [h.latency_ms_p50, h.latency_ms_p99]);
  drawChart($("#chart-queue"), h.t, [h.queue_depth, h.in_flight]);
}

// ---- polling ------------------------------------------------------------------------------------------------
let lastDoc = null;
async function poll() {
  try {
    const resp = await fetch("/cluster", { cache: "no-store" });
    if (!resp.ok) throw new Error(`GET /cluster answered ${resp.status}`);
    lastDoc = await resp.json();
    renderSummary(lastDoc);
    renderWorkers(lastDoc.workers);
    renderCharts(lastDoc.history);
    renderJobs(lastDoc.jobs);
    $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
    fillModels(lastDoc.workers);
  } catch (err) {
    $("#updated").textContent = "cannot reach the balancer: " + err.message;
  }
}
window.addEventListener("resize", () => lastDoc && renderCharts(lastDoc.history));

// ---- admin buttons -------------------------------------------------------------------------------------------
const ARMED_MS = 3000;
async function adminAction(button, action, index) {
  if (action === "remove" && button.dataset.armed !== "1") { // a second click within 3 s confirms
    button.dataset.armed = "1";
    button.textContent = "Confirm";
    setTimeout(() => { button.dataset.armed = ""; button.textContent = "Remove"; }, ARMED_MS);
    return;
  }
  const request = action === "remove" ? ["DELETE", `/workers/${index}`] : ["POST", `/workers/${index}/${action}`];
  const headers = {};
  if (tokenInput.value) headers.Authorization = "Bearer " + tokenInput.value;
  button.disabled = true;
  try {
    const resp = await fetch(request[1], { method: request[0], headers });
    let message = "";
    try { message = (await resp.json()).error?.message || ""; } catch (_) { /* not JSON */ }
    if (resp.status === 401 || resp.status === 403) {
      $(".admin").classList.add("wanted");
      tokenInput.focus();
      show(`${action} worker ${index} refused: ${resp.status} ${message || ""} ` +
           (adminTokenSet ? "Enter the admin token at the top right." : "The admin API answers loopback clients only."));
    } else if (!resp.ok) {
      show(`${action} worker ${index} failed: ${resp.status} ${message}`);
    } else {
      show(`worker ${index}: ${action} done`, true);
    }
  } catch (err) {
    show(`${action} worker ${index}: ${err.message}`);
  } finally {
    button.disabled = false;
    poll();
  }
}

// ---- logs (GET /logs, /logs/NAME: admin token or loopback, like the buttons) --------------------------------------
function adminHeaders() {
  return tokenInput.value ? { Authorization: "Bearer " + tokenInput.value } : {};
}

async function loadLogNames() {
  const status = $("#log-status");
  try {
    const resp = await fetch("/logs", { headers: adminHeaders(), cache: "no-store" });
    if (resp.status === 401 || resp.status === 403) {
      status.textContent = `${resp.status}: the logs need the admin token (top right)`;
      return;
    }
    const names = (await resp.json()).components || [];
    const select = $("#log-name");
    select.innerHTML = "";
    for (const name of names) {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      select.appendChild(option);
    }
    status.textContent = names.length ? "" : "the balancer was started without --log-file";
  } catch (err) {
    status.textContent = "cannot list the logs: " + err.message;
  }
}

$("#log-show").addEventListener("click", async () => {
  const name = $("#log-name").value, status = $("#log-status"), out = $("#log-output");
  if (!name) { await loadLogNames(); return; }
  const lines = Number($("#log-lines").value) || 200;
  const resp = await fetch(`/logs/${encodeURIComponent(name)}?lines=${lines}`, { headers: adminHeaders(), cache: "no-store" });
  if (!resp.ok) {
    let message = resp.statusText;
    try { message = (await resp.json()).error.message; } catch (_) { /* not JSON */ }
    status.textContent = `${resp.status}: ${message}`;
    return;
  }
  out.textContent = await resp.text();
  out.hidden = false;
  out.scrollTop = out.scrollHeight; // the newest lines
  status.textContent = `${name}: last ${lines} lines at ${new Date().toLocaleTimeString()}`;
});
tokenInput.addEventListener("change", loadLogNames);

// ---- playground -----------------------------------------------------------------------------------------------
function fillModels(workers) {
  const select = $("#pg-model");
  const models = [...new Set(workers.filter((w) => w.state === "healthy").flatMap((w) => w.models))].sort();
  const have = [...select.options].map((o) => o.value);
  if (models.join("\n") === have.join("\n")) return;
  const current = select.value;
  select.innerHTML = "";
  for (const m of models.length ? models : ["default"]) {
    const option = document.createElement("option");
    option.value = option.textContent = m;
    select.appendChild(option);
  }
  if (models.includes(current)) select.value = current;
}

$("#pg-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const out = $("#pg-output"), status = $("#pg-status"), send = $("#pg-send");
  out.textContent = "";
  status.textContent = "waiting for the first token…";
  send.disabled = true;
  const headers = { "Content-Type": "application/json" };
  const key = $("#pg-key").value;
  if (key) headers.Authorization = "Bearer " + key;
  const body = {
    model: $("#pg-model").value, stream: true, max_tokens: Number($("#pg-max-tokens").value) || 64,
    messages: [{ role: "user", content: $("#pg-prompt").value }],
  };
  const started = performance.now();
  let first = null, chunks = 0;
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body) });
    if (!resp.ok) {
      let message = resp.statusText;
      try { message = (await resp.json()).error.message; } catch (_) { /* not JSON */ }
      throw new Error(`${resp.status}: ${message}`);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) { // one SSE event
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const parsed = JSON.parse(data);
          if (parsed.error) throw new Error(parsed.error.message);
          const text = parsed.choices?.[0]?.delta?.content || "";
          if (text) {
            if (first === null) first = performance.now();
            chunks += 1;
            out.textContent += text;
            status.textContent = `streaming… ${chunks} chunks`;
          }
        }
      }
    }
    const total = (performance.now() - started) / 1000;
    status.textContent = `done: ${chunks} chunks, first after ${first ? ((first - started) / 1000).toFixed(2) : dash} s, ` +
                         `${total.toFixed(2)} s in all (worker ${resp.headers.get("X-LB-Worker") ?? "?"})`;
  } catch (err) {
    status.textContent = "failed: " + err.message;
  } finally {
    send.disabled = false;
  }
});

// ---- start ---------------------------------------------------------------------------------------------------
fetch("/config", { cache: "no-store" })
  .then((r) => r.json())
  .then((config) => {
    adminTokenSet = Boolean(config.admin_token || config.admin_token_file);
    if (adminTokenSet && !tokenInput.value) {
      $(".admin").classList.add("wanted");
      tokenInput.placeholder = "needed for the buttons";
    }
  })
  .catch(() => {});
poll();
loadLogNames();
setInterval(poll, POLL_MS);
