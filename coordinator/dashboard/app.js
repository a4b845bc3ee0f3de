// The dashboard's script: reads the cluster view every second, the per-tenant
// stats every two, follows the invalidation stream (fetch, reading the
// text/event-stream body, so that the token travels as a header), and runs the
// guarded invalidation (dry run first, then confirm). Every call carries the
// token the operator typed, when the coordinator asks for one.
"use strict";

const HEALTH_EVERY_MS = 1000;
const STATS_EVERY_MS = 2000;
const CHART_SECONDS = 120;
const FEED_LENGTH = 50;
const TOKEN_KEY = "dcc-dashboard-token";

const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  samples: [], // {t, seq}: the cluster's seq as read, for the rate
  rates: [],   // {t, rate}: invalidations per second
  lastEventId: null,
  stream: null, // the AbortController of the stream's fetch
  pending: null, // the invalidation body previewed, waiting for confirm
  needToken: false, // a call was answered 401: wait for the operator (each 401 is audited)
};

// ---------- calls ----------

function headers(extra) {
  const h = Object.assign({ Accept: "application/json" }, extra || {});
  if (state.token) h.Authorization = "Bearer " + state.token;
  return h;
}

class Unauthorized extends Error {}

async function call(method, path, body) {
  if (state.needToken) throw new Unauthorized("waiting for a token");
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const resp = await fetch(path, init);
  if (resp.status === 401) {
    state.needToken = true;
    askForToken(state.token ? "that token is not known to this coordinator" : "");
    throw new Unauthorized("401");
  }
  let json = null;
  try { json = await resp.json(); } catch (_) { json = null; }
  return { status: resp.status, json };
}

// ---------- token ----------

function askForToken(message) {
  $("token-panel").hidden = false;
  $("token-button").hidden = false;
  $("token-error").textContent = message || "";
  setStatus("unknown", "token needed");
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.token = $("token-input").value.trim();
  state.needToken = false;
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $("token-input").value = "";
  $("token-panel").hidden = true;
  restartStream();
  refreshHealth();
  refreshStats();
  checkAdmin();
});
$("token-button").addEventListener("click", () => { $("token-panel").hidden = !$("token-panel").hidden; });

// ---------- formatting ----------

function fmtInt(n) { return typeof n === "number" ? n.toLocaleString("en-US") : "–"; }
function fmtBytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0; let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return (i === 0 ? v : v.toFixed(1)) + " " + units[i];
}
function fmtRatio(r) { return typeof r === "number" ? (r * 100).toFixed(1) + " %" : "–"; }
function fmtAgo(ms) {
  if (typeof ms !== "number") return "–";
  if (ms < 1000) return ms + " ms ago";
  if (ms < 120000) return (ms / 1000).toFixed(1) + " s ago";
  return Math.round(ms / 60000) + " min ago";
}
function fmtTime(ms) {
  const d = new Date(ms);
  return d.toLocaleTimeString("en-GB", { hour12: false });
}
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
function pill(status) { return el("span", { class: "pill pill-" + status, "data-status": status }, status); }

function setStatus(status, words) {
  const p = $("cluster-status");
  p.className = "pill pill-" + status;
  p.dataset.status = status;
  p.textContent = words || status;
}

// ---------- cluster view ----------

async function refreshHealth() {
  let r;
  try { r = await call("GET", "/v1/cluster/health"); } catch (e) {
    if (!(e instanceof Unauthorized)) setStatus("down", "coordinator unreachable");
    return;
  }
  const h = r.json || {};
  if (r.status === 403) { setStatus("unknown", "token lacks read"); return; }
  if (r.status !== 200 && r.status !== 503) { setStatus("unknown", "error " + r.status); return; }
  $("token-button").hidden = !state.token;
  const nodes = Array.isArray(h.nodes) ? h.nodes : [];
  const count = (s) => nodes.filter((n) => n.status === s).length;
  if (h.status === "down") {
    setStatus("down", "Redis down");
  } else {
    setStatus(h.status === "ok" ? "ok" : "degraded", h.status === "ok" ? "ok: all nodes synced" : "degraded");
  }
  $("seq").textContent = typeof h.seq === "number" ? h.seq : "–";
  $("epoch").textContent = h.epoch || "–";
  $("epoch").title = h.epoch || "";
  $("node-count").textContent = nodes.length;
  const parts = ["synced", "lagging", "unsynced", "dead"].filter((s) => count(s) > 0).map((s) => count(s) + " " + s);
  $("node-breakdown").textContent = parts.join(", ") || "none reporting";
  const troubled = nodes.filter((n) => n.status !== "synced").map((n) => n.node_id + " " + n.status);
  $("summary").textContent = troubled.length ? troubled.join(" · ") : (nodes.length ? nodes.length + " nodes synced" : "");
  if (h.coordinator) $("origin").textContent = h.coordinator.origin + " · v" + h.coordinator.version;
  $("updated").textContent = "updated " + fmtTime(Date.now());
  renderNodes(nodes);
  renderSources(Array.isArray(h.sources) ? h.sources : []);
  if (typeof h.seq === "number") sample(h.seq);
}

function renderSources(sources) {
  $("sources-card").hidden = sources.length === 0;
  const rows = sources.map((s) => {
    const state = s.connected ? "synced" : (s.active ? "lagging" : "unsynced");
    const label = s.connected ? "streaming" : (s.active ? "connecting" : "standby");
    return el("tr", { "data-slot": s.slot },
      el("td", { class: "mono" }, s.slot),
      el("td", {}, s.kind),
      el("td", {}, el("span", { class: "pill pill-" + state }, label)),
      el("td", { class: "mono" }, s.confirmed_lsn || "–"),
      // Confirmations go out once a second: only a backlog is bad.
      el("td", { class: "num" + (s.lag_bytes > 16 * 1024 * 1024 ? " lag-bad" : "") }, s.lag_bytes == null ? "–" : fmtBytes(s.lag_bytes)),
      el("td", { class: "num" }, s.lag_ms == null ? "–" : fmtInt(s.lag_ms)),
      el("td", { class: "num" }, fmtInt(s.transactions)),
      el("td", { class: "small muted" }, s.error || ""));
  });
  $("sources").tBodies[0].replaceChildren(...rows);
}

function renderNodes(nodes) {
  const body = $("nodes").tBodies[0];
  const rows = [];
  const order = { dead: 0, unsynced: 1, lagging: 2, synced: 3 };
  const sorted = nodes.slice().sort((a, b) => (order[a.status] ?? 9) - (order[b.status] ?? 9) || a.node_id.localeCompare(b.node_id));
  for (const n of sorted) {
    const lag = el("td", { class: "num" + (n.lag > 0 ? " lag-bad" : "") }, fmtInt(n.lag));
    rows.push(el("tr", { class: "state-" + n.status, "data-node": n.node_id },
      el("td", { class: "mono" }, n.node_id),
      el("td", {}, pill(n.status)),
      lag,
      el("td", { class: "num" }, fmtInt(n.l1_entries)),
      el("td", { class: "num" }, fmtBytes(n.l1_bytes)),
      el("td", { class: "num" }, fmtRatio(n.hit_ratio)),
      el("td", { class: "num" }, fmtAgo(n.last_seen_ms)),
      el("td", { class: "mono small muted" }, n.addr || "")));
  }
  if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: "8" }, "no node has reported yet")));
  body.replaceChildren(...rows);
}

// ---------- rate and chart ----------

function sample(seq) {
  const t = Date.now();
  const prev = state.samples[state.samples.length - 1];
  state.samples.push({ t, seq });
  if (state.samples.length > 5) state.samples.shift();
  if (prev && t > prev.t) {
    // A new epoch restarts seqs: no negative rates.
    const rate = Math.max(0, (seq - prev.seq) / ((t - prev.t) / 1000));
    state.rates.push({ t, rate });
    while (state.rates.length && state.rates[0].t < t - CHART_SECONDS * 1000) state.rates.shift();
    $("rate").textContent = rate < 10 ? rate.toFixed(1) : Math.round(rate).toLocaleString("en-US");
  }
  drawChart();
}

function drawChart() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 640;
  const h = canvas.clientHeight || 180;
  if (canvas.width !== Math.round(w * ratio)) { canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio); }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const css = getComputedStyle(document.documentElement);
  const line = css.getPropertyValue("--line").trim();
  const muted = css.getPropertyValue("--muted").trim();
  const accent = css.getPropertyValue("--accent").trim();
  const left = 44; const bottom = h - 20; const top = 10; const right = w - 8;
  const max = Math.max(1, ...state.rates.map((r) => r.rate));
  const nice = niceCeil(max);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = muted; ctx.strokeStyle = line; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i += 1) {
    const y = bottom - ((bottom - top) * i) / 4;
    ctx.beginPath(); ctx.moveTo(left, y + 0.5); ctx.lineTo(right, y + 0.5); ctx.stroke();
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(formatAxis((nice * i) / 4), left - 6, y);
  }
  ctx.textAlign = "left"; ctx.textBaseline = "top";
  ctx.fillText("-" + CHART_SECONDS + " s", left, bottom + 5);
  ctx.textAlign = "right"; ctx.fillText("now", right, bottom + 5);
  const now = Date.now();
  const x = (t) => left + ((right - left) * (t - (now - CHART_SECONDS * 1000))) / (CHART_SECONDS * 1000);
  const y = (v) => bottom - ((bottom - top) * v) / nice;
  if (state.rates.length < 2) return;
  ctx.beginPath();
  state.rates.forEach((r, i) => { if (i === 0) ctx.moveTo(x(r.t), y(r.rate)); else ctx.lineTo(x(r.t), y(r.rate)); });
  ctx.strokeStyle = accent; ctx.lineWidth = 2; ctx.stroke();
  ctx.lineTo(x(state.rates[state.rates.length - 1].t), bottom);
  ctx.lineTo(x(state.rates[0].t), bottom);
  ctx.closePath(); ctx.globalAlpha = 0.15; ctx.fillStyle = accent; ctx.fill(); ctx.globalAlpha = 1;
}
function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 4, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
function formatAxis(v) { return v >= 1000 ? (v / 1000).toFixed(1) + "k" : String(Math.round(v * 100) / 100); }
window.addEventListener("resize", drawChart);

// ---------- the invalidation stream ----------

function restartStream() {
  if (state.stream) state.stream.abort();
  state.stream = new AbortController();
  follow(state.stream.signal);
}

async function follow(signal) {
  while (!signal.aborted) {
    try {
      const extra = { Accept: "text/event-stream" };
      if (state.lastEventId) extra["Last-Event-ID"] = state.lastEventId;
      const resp = await fetch("/v1/invalidations/stream", { headers: headers(extra), signal });
      if (resp.status === 401) { state.needToken = true; askForToken(""); $("stream-state").textContent = "(needs a token)"; return; }
      if (!resp.ok || !resp.body) throw new Error("status " + resp.status);
      $("stream-state").textContent = "(live)";
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          onFrame(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (e) {
      if (signal.aborted) return;
    }
    $("stream-state").textContent = "(reconnecting…)";
    await new Promise((r) => setTimeout(r, 2000));
  }
}

function onFrame(frame) {
  let id = null; let event = "message"; const data = [];
  for (const line of frame.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") id = value; else if (field === "event") event = value; else if (field === "data") data.push(value);
  }
  if (id !== null) state.lastEventId = id;
  if (event !== "invalidation" || !data.length) return;
  try { addToFeed(JSON.parse(data.join("\n"))); } catch (_) { /* not one of ours */ }
}

function describe(sel) {
  const parts = [];
  for (const k of sel.keys || []) parts.push("key " + k);
  for (const t of sel.tags || []) parts.push("tag " + t);
  for (const p of sel.patterns || []) parts.push("pattern " + p);
  return parts.join(", ") || "(nothing)";
}

function addToFeed(inv) {
  const feed = $("feed");
  const empty = feed.querySelector(".empty");
  if (empty) empty.remove();
  for (const sel of inv.invalidations || []) {
    const item = el("li", { class: "fresh", "data-seq": String(inv.seq) },
      el("span", { class: "mono muted" }, fmtTime(inv.ts_ms)),
      el("span", { class: "what" }, el("span", { class: "tenant" }, sel.tenant), " · ", describe(sel)),
      el("span", { class: "mono muted small", title: inv.origin }, "p" + inv.partition + " #" + inv.seq));
    feed.prepend(item);
  }
  while (feed.children.length > FEED_LENGTH) feed.lastElementChild.remove();
}

// ---------- per-tenant stats ----------

async function refreshStats() {
  let r;
  try { r = await call("GET", "/v1/stats"); } catch (_) { return; }
  const box = $("stats");
  const recs = $("recommendations");
  if (r.status === 404 || r.status === 405) {
    box.replaceChildren(el("p", { class: "muted" }, "stats not available (this coordinator has no /v1/stats)"));
    recs.replaceChildren(el("li", { class: "muted" }, "none"));
    return;
  }
  if (r.status !== 200 || !r.json) {
    box.replaceChildren(el("p", { class: "muted" }, "stats not available (" + r.status + ")"));
    return;
  }
  const tenants = Array.isArray(r.json.tenants) ? r.json.tenants : [];
  if (!tenants.length) {
    box.replaceChildren(el("p", { class: "muted" }, "no tenant has traffic yet"));
  } else {
    const head = el("tr", {}, ...["Tenant", "L1 hits", "L2 hits", "Misses", "Hit ratio", "Entries", "Bytes", "Invalidations", "Fills refused", "Top keys"]
      .map((t, i) => el("th", { class: i > 0 && i < 9 ? "num" : "" }, t)));
    const rows = tenants.map((t) => el("tr", {},
      el("td", { class: "mono" }, t.tenant),
      el("td", { class: "num" }, fmtInt(t.l1_hits)),
      el("td", { class: "num" }, fmtInt(t.l2_hits)),
      el("td", { class: "num" }, fmtInt(t.misses)),
      el("td", { class: "num" }, fmtRatio(t.hit_ratio)),
      el("td", { class: "num" }, fmtInt(t.entries)),
      el("td", { class: "num" }, fmtBytes(t.bytes)),
      el("td", { class: "num" }, fmtInt(t.invalidations)),
      el("td", { class: "num" }, fmtInt(t.fills_refused)),
      el("td", { class: "mono small" }, (t.top_keys || []).slice(0, 5).map((k) => (typeof k === "string" ? k : (k.key || JSON.stringify(k)))).join(", "))));
    box.replaceChildren(el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows))));
  }
  const list = Array.isArray(r.json.recommendations) ? r.json.recommendations : [];
  recs.replaceChildren(...(list.length
    ? list.map((x) => el("li", {}, el("span", { class: "kind" }, x.kind || "note"), el("strong", {}, x.tenant || ""), x.tenant ? ": " : "", x.message || ""))
    : [el("li", { class: "muted" }, "none")]));
}

// ---------- guarded invalidation (admin) ----------

async function checkAdmin() {
  try {
    const r = await call("GET", "/v1/audit?limit=1");
    $("actions").hidden = r.status !== 200;
  } catch (_) { $("actions").hidden = true; }
}

$("invalidate-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const tenant = $("inv-tenant").value.trim();
  const kind = $("inv-kind").value;
  const value = $("inv-value").value.trim();
  const body = { tenant, keys: [], tags: [], patterns: [] };
  body[kind] = [value];
  $("action-result").textContent = "";
  try {
    const r = await call("POST", "/v1/invalidate", Object.assign({ dry_run: true, confirm: true }, body));
    if (r.status !== 200) { showError(r); return; }
    state.pending = body;
    const count = r.json.count ?? 0;
    $("preview-text").textContent = "Would delete " + count + " L2 entr" + (count === 1 ? "y" : "ies") + " of " + tenant +
      " (" + describe(body) + "), and the same in every node's L1.";
    $("preview-keys").replaceChildren(...(r.json.would_delete || []).slice(0, 20).map((k) => el("li", {}, k)));
    $("preview").hidden = false;
  } catch (_) { /* asked for a token */ }
});

$("confirm").addEventListener("click", async () => {
  if (!state.pending) return;
  const body = Object.assign({ confirm: true }, state.pending);
  state.pending = null;
  $("preview").hidden = true;
  try {
    const r = await call("POST", "/v1/invalidate", body);
    if (r.status !== 200) { showError(r); return; }
    $("action-result").textContent = "Invalidated: seq " + (r.json.seq ?? "?") + ".";
  } catch (_) { /* asked for a token */ }
});
$("cancel").addEventListener("click", () => { state.pending = null; $("preview").hidden = true; });

function showError(r) {
  const j = r.json || {};
  $("action-result").textContent = "Refused (" + r.status + (j.error ? " " + j.error : "") + "): " + (j.message || "");
}

// ---------- start ----------

function every(ms, f) { f(); setInterval(f, ms); }
every(HEALTH_EVERY_MS, refreshHealth);
every(STATS_EVERY_MS, refreshStats);
checkAdmin();
restartStream();
