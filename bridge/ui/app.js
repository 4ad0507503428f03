// The operator's page (docs/API.md, "Operator's page"): one EventSource on /ui/events renders
// every snapshot; the forms call the page's /ui/... routes. The session is an HttpOnly cookie the
// script never sees; text from the worker is always set with textContent, never as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
let source = null;
let jobTypesShown = false;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "style") node.style.cssText = value;  // CSSOM: allowed by the page's CSP, unlike a style attribute
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const short = (id) => (id ? String(id).slice(0, 8) : "?");
const secs = (s) => (s === null || s === undefined ? "—" : s < 60 ? `${Number(s).toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`);
const gb = (v) => (v === null || v === undefined ? "—" : Number(v).toFixed(1));
const clock = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "—");

async function call(method, path, body) {
  const options = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = {};
  try { data = await response.json(); } catch (_) { /* not JSON */ }
  if (response.status === 401) showLogin("Your session ended; enter the key again.");
  if (!response.ok) {
    const message = (data.error && (data.error.message || data.error)) || `HTTP ${response.status}`;
    throw new Error(message);
  }
  return data;
}

// ------------------------------------------------------------------ session
function showLogin(message) {
  if (source) { source.close(); source = null; }
  $("#dashboard").hidden = true;
  $("#logout").hidden = true;
  $("#login-panel").hidden = false;
  $("#login-error").textContent = message || "";
  setLink("logged out", "off");
  $("#key").focus();
}

function showDashboard(keyRequired) {
  $("#login-panel").hidden = true;
  $("#dashboard").hidden = false;
  $("#logout").hidden = !keyRequired;
  connect();
}

async function start() {
  const state = await call("GET", "/ui/session");
  if (state.authenticated) showDashboard(state.key_required);
  else showLogin();
}

$("#login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("#key");
  try {
    await call("POST", "/ui/session", { key: input.value });
    input.value = "";
    showDashboard(true);
  } catch (error) {
    $("#login-error").textContent = error.message;
  }
});

$("#logout").addEventListener("click", async () => {
  await call("DELETE", "/ui/session");
  showLogin();
});

// ------------------------------------------------------------------ live view
function setLink(text, kind) {
  const link = $("#link");
  link.textContent = text;
  link.className = `pill ${kind}`;
}

function connect() {
  if (source) source.close();
  source = new EventSource("/ui/events");
  source.addEventListener("open", () => setLink("live", "ok"));
  source.addEventListener("snapshot", (event) => render(JSON.parse(event.data)));
  source.addEventListener("error", async () => {
    setLink("reconnecting…", "warn");
    if (source && source.readyState === EventSource.CLOSED) {
      // Refused (a 401 after the session ended) or the worker went away: ask which.
      try {
        const state = await call("GET", "/ui/session");
        if (state.authenticated) setTimeout(connect, 2000);
        else showLogin("Your session ended; enter the key again.");
      } catch (_) { setTimeout(connect, 2000); }
    }
  });
}

function fill(tbody, rows, empty) {
  tbody.replaceChildren(...rows);
  if (empty) $(empty).hidden = rows.length > 0;
}

function cancelButton(id) {
  return el("button", { type: "button", class: "cancel small", "data-job-id": id, title: "cancel this job",
    onclick: async (event) => {
      event.target.disabled = true;
      try { await call("POST", `/ui/jobs/${encodeURIComponent(id)}/cancel`); }
      catch (error) { event.target.title = error.message; event.target.disabled = false; }
    } }, "Cancel");
}

function render(s) {
  $("#worker").textContent = `${s.worker_id} · ${s.mode} mode · redis ${s.redis}`;
  if (!jobTypesShown && s.job_types) {
    const select = $("#job-type");
    select.replaceChildren(...s.job_types.map((t) => el("option", { value: t }, t)));
    select.value = "sdxl_image_fast";
    jobTypesShown = true;
  }

  fill($("#queues tbody"), (s.queues || []).map((q) => el("tr", { "data-queue": q.name },
    el("td", {}, q.name), el("td", { class: "num depth" }, q.depth), el("td", { class: "num" }, secs(q.oldest_wait_s)),
    el("td", { class: "next" }, q.jobs.length ? q.jobs.map((j) => el("span", { class: "chip", "data-job-id": j.id },
      `${j.type} ${short(j.id)} `, j.id ? cancelButton(j.id) : null)) : el("span", { class: "muted" }, "—")))));

  const gpu = s.gpu;
  $("#lanes").textContent = `· lanes ${gpu.lanes_in_use}/${gpu.lanes} · chat ${gpu.interactive_in_use} · waiting ${gpu.waiting_for_gpu}`;
  fill($("#running tbody"), (s.running || []).map((j) => el("tr", { "data-job-id": j.id, class: "job" },
    el("td", { class: "mono", title: j.id }, short(j.id)), el("td", {}, j.type), el("td", {}, j.model),
    el("td", { class: `stage stage-${j.stage.replace(/ /g, "-")}` }, j.stage),
    el("td", { class: "bar-col" }, el("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
      "aria-valuenow": j.progress, "data-progress": j.progress },
      el("div", { class: "fill", style: `width:${Math.max(0, Math.min(100, j.progress))}%` }), el("span", {}, `${j.progress}%`))),
    el("td", { class: "num" }, secs(j.running_s)),
    el("td", {}, j.cancel_requested ? el("span", { class: "muted" }, "cancelling…") : cancelButton(j.id)))), "#running-empty");

  $("#budget").textContent = `· ${gb(gpu.accounted_gb)} of ${gb(gpu.budget_gb)} GB budget` +
    (gpu.gpu_total_gb ? ` · card ${gb(gpu.gpu_used_gb)}/${gb(gpu.gpu_total_gb)} GB` : "");
  const held = gpu.models.filter((m) => ["ready", "loading", "draining", "unloading"].includes(m.state));
  $("#budget-bar").replaceChildren(...held.map((m) => el("div", {
    class: `seg seg-${m.state}`, title: `${m.name}: ${m.vram_gb} GB (${m.state})`,
    style: `width:${Math.min(100, (100 * m.vram_gb) / Math.max(gpu.budget_gb, 0.001))}%` }, m.name)));
  fill($("#models tbody"), gpu.models.map((m) => el("tr", { "data-model": m.name },
    el("td", {}, m.name), el("td", { class: `state state-${m.state}`, title: m.last_error || "" }, m.state),
    el("td", { class: "muted" }, m.policy), el("td", { class: "num" }, gb(m.measured_gb ?? m.vram_gb)),
    el("td", { class: "num" }, m.in_flight), el("td", { class: "num" }, m.loads), el("td", { class: "num" }, m.unloads))));
  $("#model-ops").replaceChildren(...(gpu.operations.length ? gpu.operations.slice(0, 8).map((o) => el("li",
    { class: `op op-${o.phase}`, "data-model": o.model, "data-op": o.op, "data-phase": o.phase },
    el("span", { class: "muted" }, clock(o.at)), ` ${o.op} ${o.model} `,
    o.phase === "started" ? "…" : o.phase === "done" ? `in ${secs(o.seconds)}` : `failed: ${o.error || ""}`))
    : [el("li", { class: "muted" }, "none since start")]));

  fill($("#finished tbody"), (s.finished || []).map((j) => el("tr", { "data-job-id": j.id, class: "job" },
    el("td", { class: "thumb-col" }, j.thumbnail ? el("img", { class: "thumb", src: j.thumbnail, alt: `${j.type} ${short(j.id)}`, loading: "lazy" }) : ""),
    el("td", { class: "mono", title: j.id }, short(j.id)), el("td", {}, j.type),
    el("td", { class: `status status-${j.status}` }, j.status),
    el("td", { class: "num" }, secs(j.generation_s)), el("td", {}, clock(j.ended)),
    el("td", { class: "error-text", title: j.error || "" }, j.error || ""))), "#finished-empty");

  fill($("#dead tbody"), (s.dead_letters || []).map((d) => el("tr", {},
    el("td", { class: "mono", title: d.job_id || "" }, d.job_id ? short(d.job_id) : "(no id)"), el("td", {}, d.queue || ""),
    el("td", { class: "error-text" }, d.reason), el("td", {}, d.time ? clock(d.time) : ""))), "#dead-empty");

  const c = s.chat;
  $("#chat").replaceChildren(
    el("dt", {}, "turns / min"), el("dd", { id: "chat-rate" }, c.turns_per_minute),
    el("dt", {}, "mean latency"), el("dd", {}, secs(c.mean_s)),
    el("dt", {}, "worst latency"), el("dd", {}, secs(c.max_s)),
    el("dt", {}, "failed (1 min)"), el("dd", {}, c.failed),
    el("dt", {}, "since start"), el("dd", {}, c.total));
}

// ------------------------------------------------------------------ actions
$("#submit").addEventListener("submit", async (event) => {
  event.preventDefault();
  const number = (id) => ($(id).value === "" ? null : Number($(id).value));
  const body = { type: $("#job-type").value, prompt: $("#prompt").value, width: number("#width"),
    height: number("#height"), steps: number("#steps"), frames: number("#frames") };
  const result = $("#submit-result");
  delete result.dataset.jobId;
  result.textContent = "submitting…";
  try {
    const job = await call("POST", "/ui/jobs", body);
    result.textContent = `queued ${job.type} ${short(job.id)} on ${job.queue} (position ${job.position})`;
    result.dataset.jobId = job.id;
    result.className = "muted";
  } catch (error) {
    result.textContent = error.message;
    result.className = "error";
  }
});

async function memory(action) {
  const which = $("#memory-which").value;
  const result = $("#memory-result");
  result.textContent = `${action}ing ${which}…`;
  try {
    const answer = await call("POST", `/ui/memory/${action}?which=${encodeURIComponent(which)}`);
    result.textContent = answer.message;
  } catch (error) {
    result.textContent = error.message;
  }
}
$("#load").addEventListener("click", () => memory("load"));
$("#unload").addEventListener("click", () => memory("unload"));

start().catch((error) => showLogin(error.message));
