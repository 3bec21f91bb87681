// The SwarmLLM UI: seven pages over the node's API (see client.js). No framework:
// each page is a function that renders into <main> and may return a cleanup.

import * as client from "./client.js";

const $ = (sel, root = document) => root.querySelector(sel);
const main = () => $("#page");

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function toast(text, bad = false) {
  const t = $("#toast");
  t.textContent = text;
  t.className = bad ? "error" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.hidden = true), 4000);
}

function duration(s) {
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

const card = (label, value, id = "") =>
  `<div class="card"><div class="label">${esc(label)}</div><div class="value"${id ? ` id="${id}"` : ""}>${esc(value)}</div></div>`;

/** Pages whose backend needs the API key say so instead of failing silently. */
function needKey() {
  if (client.hasKey()) return false;
  main().insertAdjacentHTML("afterbegin",
    `<p class="error">This page needs the node's API key: run <code>swarmllm api-key</code> and paste it in <a href="#/settings">Settings</a>.</p>`);
  return true;
}

// ---- live updates ------------------------------------------------------------------

/** One WebSocket for the whole app: it keeps the recent history the dashboard
 *  draws (also while another page is open) and shows a toast for each swarm
 *  activity (a shard fetched, pruned, a fetch that failed). */
const live = { history: [], listeners: new Set(), last: null };
const HISTORY = 150; // 5 minutes at one update every 2 s

function startLive() {
  let prev = null;
  const open = () => {
    const ws = client.socket((m) => {
      if (m.type === "activity_event") {
        toast(m.data.message, m.data.toast_level === "warning");
        return;
      }
      if (m.type === "update_available") {
        toast(`SwarmLLM ${m.data.version} is available: install it in Settings → Updates.`);
        return;
      }
      if (m.type !== "stats_update") return;
      const d = m.data, t = Date.parse(m.timestamp) / 1000;
      const tokens = d.inference?.tokens_generated ?? 0;
      const tps = prev && t > prev.t ? Math.max(0, (tokens - prev.tokens) / (t - prev.t)) : 0;
      prev = { t, tokens };
      live.history.push({ t, tps, requests: d.inference?.requests_total ?? 0, credits: d.credits?.balance ?? 0, peers: d.peer_count ?? 0 });
      if (live.history.length > HISTORY) live.history.shift();
      live.last = m;
      for (const f of live.listeners) f(m);
    });
    // The node restarted or the connection dropped: try again shortly.
    ws.onclose = () => setTimeout(open, 3000);
  };
  open();
}

/** A small line chart of `key` over the history. */
function chartHtml(id, title, key, unit) {
  const pts = live.history.map((h) => h[key]);
  const W = 300, H = 70;
  const max = Math.max(1e-9, ...pts), min = Math.min(0, ...pts);
  const xy = pts.map((v, i) => `${(pts.length < 2 ? 0 : (W * i) / (pts.length - 1)).toFixed(1)},${(H - 4 - ((H - 8) * (v - min)) / (max - min || 1)).toFixed(1)}`).join(" ");
  const now = pts.length ? pts[pts.length - 1] : 0;
  const shown = Number.isInteger(now) ? now : now.toFixed(key === "credits" ? 4 : 1);
  return `<figure class="card chart" id="${id}" data-points="${pts.length}"><figcaption class="label">${esc(title)}</figcaption>
    <div class="value">${esc(shown)}${unit ? ` <span class="muted">${esc(unit)}</span>` : ""}</div>
    <svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none" role="img" aria-label="${esc(`${title} over the last ${pts.length} updates`)}">
      <polyline points="${xy}" /></svg></figure>`;
}

function chartsHtml() {
  return chartHtml("chart-tokens", "Tokens per second", "tps", "tok/s") + chartHtml("chart-requests", "Requests", "requests", "in all")
    + chartHtml("chart-credits", "Credits", "credits", "balance") + chartHtml("chart-peers", "Peers", "peers", "connected");
}

// ---- dashboard -----------------------------------------------------------------

/** What this node serves: its whole model and the layer ranges it hosts. */
async function servingHtml(stats) {
  const layers = await client.get("/api/v1/layers");
  const ranges = (layers.ranges || []).map((r) => `${r.model_id} layers ${r.layer_start}–${r.layer_end - 1}`);
  const whole = stats.model?.id ? [`${stats.model.id} (whole)`] : [];
  const all = [...whole, ...ranges];
  return all.length ? all.map(esc).join(" · ") : "nothing yet: add a model on the Models page";
}

async function dashboard() {
  const [stats, nick] = await Promise.all([client.get("/api/admin/stats"), client.get("/api/identity/nickname")]);
  const hw = stats.hardware || {};
  const gpus = (hw.gpus || []).map((g) => g.name).join(", ") || "none";
  main().innerHTML = `<h1>Dashboard</h1>
    <div class="grid">
      ${card("Node id", stats.node_id, "node-id")}
      ${card("Nickname", nick.nickname || "—")}
      ${card("Uptime", duration(stats.uptime_seconds), "uptime")}
      ${card("Secrets", stats.secret_store === "keychain" ? "OS keychain" : "encrypted file")}
    </div>
    <h2>Serving</h2>
    <p id="serving">${await servingHtml(stats)}</p>
    <h2>Activity</h2>
    <div class="grid" id="charts">${chartsHtml()}</div>
    <h2>Responses</h2>
    <div class="row"><label>Status <select id="responses-status" aria-label="Responses by status">
      ${["", "completed", "in_progress", "queued", "incomplete", "cancelled", "failed"]
        .map((s) => `<option value="${s}">${s || "all"}</option>`).join("")}</select></label></div>
    <div id="responses"></div>
    <h2>Hardware</h2>
    <p id="hardware">${esc(hw.cpu_model)} · ${esc(hw.cpu_threads)} threads ·
      ${esc((hw.ram_total / 2 ** 30).toFixed(1))} GiB RAM · GPUs: ${esc(gpus)} · ${esc(hw.os)} ${esc(hw.arch)}</p>
    <p class="muted" id="live">Waiting for live updates…</p>`;
  const update = (m) => {
    if (!$("#charts")) return;
    $("#uptime").textContent = duration(m.data.uptime_seconds);
    $("#charts").innerHTML = chartsHtml();
    $("#live").textContent = "Live · updated " + new Date(m.timestamp).toLocaleTimeString();
  };
  live.listeners.add(update);
  if (live.last) update(live.last);
  $("#responses-status").onchange = showResponses;
  showResponses();
  return () => live.listeners.delete(update);
}

/** The Responses API's stored responses (newest 20), by the chosen status. */
async function showResponses() {
  const box = $("#responses");
  if (!box) return;
  if (!client.key()) { box.innerHTML = `<p class="muted">Needs the API key.</p>`; return; }
  const status = $("#responses-status").value;
  try {
    const r = await client.get(`/api/admin/responses?limit=20${status ? `&status=${encodeURIComponent(status)}` : ""}`);
    const text = (x) => (x.output?.[0]?.content?.[0]?.text || x.error?.message || "").slice(0, 120);
    box.innerHTML = r.responses.length ? `<table><tr><th>When</th><th>Status</th><th>Model</th><th>Tokens</th><th>Answer</th></tr>
      ${r.responses.map((x) => `<tr data-response="${esc(x.id)}"><td>${esc(new Date(x.created_at * 1000).toLocaleString())}</td>
        <td>${esc(x.status)}</td><td>${esc(x.model)}</td><td>${esc(x.usage?.total_tokens ?? "")}</td>
        <td>${esc(text(x))}</td></tr>`).join("")}</table>` : `<p class="muted">None yet.</p>`;
  } catch (e) { box.innerHTML = `<p class="error">${esc(e.message)}</p>`; }
}

// ---- codes in pictures ------------------------------------------------------------

const NETWORK_SCAN = "/api/admin/network-code/scan";
const POOL_SCAN = "/api/pool/scan-qr";

/** The code in the QR picture chosen in `input`, read by the node at `path`
 *  (null when no file was chosen). */
async function codeInPicture(input, path) {
  const file = input.files[0];
  return file ? (await client.upload(path, file)).code : null;
}

/** Joins the network a `swarm://` code (or multiaddr) names. */
const joinNetwork = (text) => client.post("/api/admin/join-network", { code: text.trim() });

// ---- welcome (first run) -----------------------------------------------------------

const WELCOMED = "swarmllm.welcomed";

/** Whether to greet: nothing to chat with here yet and no peers, on a first visit. */
async function firstRun() {
  if (localStorage.getItem(WELCOMED)) return false;
  const [stats, models] = await Promise.all([client.get("/api/admin/stats"), client.get("/v1/models")]);
  return !stats.model && !(models.data || []).length && !stats.peer_count;
}

/** The recommendations: chat models from the catalog whose recommended variant
 *  fits this machine, most downloaded first. */
async function recommendations() {
  const results = await client.get("/api/admin/hf/search?query=instruct&limit=8");
  return results.filter((r) => r.split_supported && r.recommended_file
    && (r.variants || []).some((v) => v.filename === r.recommended_file && v.fits_vram)).slice(0, 4);
}

async function welcome() {
  localStorage.setItem(WELCOMED, "1");
  let code = null;
  try { code = await client.get("/api/admin/network-code"); } catch { /* networking is off */ }
  const config = await client.get("/api/admin/config");
  main().innerHTML = `<h1>Welcome to SwarmLLM</h1>
    <p>Three steps, each optional: a model to chat with, a network to share with, your own devices.</p>
    <section class="step"><h2>1. A model for this machine</h2>
      <div id="recs"><p class="muted">Looking in the catalog…</p></div>
      <p class="muted">Or use the models the swarm already runs: join a network below and they show in Chat.</p>
      <div class="row"><div class="bar" hidden id="rec-bar"><span data-pct="0"></span></div><span class="muted" id="rec-status" role="status"></span></div></section>
    <section class="step"><h2>2. Join a network</h2>
      ${(config.bootstrap || []).length ? `<p class="muted">This node dials its configured bootstrap list at start: ${esc(config.bootstrap.length)} entr${config.bootstrap.length === 1 ? "y" : "ies"}.</p>` : ""}
      <div class="row"><input id="welcome-code" class="mono" size="50" placeholder="swarm://… from another node" aria-label="Network code">
        <button id="welcome-join" class="secondary">Join</button>
        <label class="secondary">QR picture <input type="file" id="welcome-file" accept="image/*"></label></div>
      ${code ? `<p class="muted">This node's own code (for others): <span class="mono">${esc(code.code.slice(0, 32))}…</span> (full code and QR on the Network page)</p>` : ""}
      <p id="welcome-net" role="status"></p></section>
    <section class="step"><h2>3. Your devices (optional)</h2>
      <div class="row"><input id="welcome-pool" placeholder="My Devices" aria-label="Pool name"><button id="welcome-pool-create" class="secondary">Create a pool</button>
        <a href="#/pool">or join one with a code</a></div>
      <p id="welcome-pool-note" role="status"></p></section>
    <div class="row"><button id="welcome-done">Start chatting</button><a href="#/dashboard">Skip to the dashboard</a></div>`;
  const say = (id, text, bad = false) => { const p = $(id); if (p) { p.textContent = text; p.className = bad ? "error" : "ok"; } };
  // 1: recommendations, the first is the default.
  let recs = [];
  try { recs = await recommendations(); } catch (e) { say("#rec-status", `The catalog is not reachable: ${e.message}`, true); }
  if ($("#recs")) {
    $("#recs").innerHTML = recs.length ? recs.map((r, i) => {
      const v = r.variants.find((x) => x.filename === r.recommended_file);
      return `<div class="row rec"><button ${i ? 'class="secondary"' : ""} data-rec="${i}">${i ? "Use" : "Use the recommended model"}</button>
        <b>${esc(r.repo_id)}</b> <span class="muted">${esc(v.quant || "")} · ${esc(size(v.size_bytes || 0))} · fits this machine</span></div>`;
    }).join("") : `<p class="muted">No catalog model fits this machine.</p>`;
  }
  let chosen = null;
  $("#recs").onclick = async (e) => {
    const b = e.target.closest("button[data-rec]");
    if (!b || needKey()) return;
    const r = recs[Number(b.dataset.rec)];
    for (const x of main().querySelectorAll("button[data-rec]")) x.disabled = true;
    try {
      const d = await client.post("/api/admin/hf/download-shards", { repo_id: r.repo_id, filename: r.recommended_file, peer_fair_share: false });
      chosen = d.model_id;
      $("#rec-bar").hidden = false;
      // Progress until the model is servable here.
      for (;;) {
        const [downloads, models] = await Promise.all([client.get("/api/admin/downloads"), client.get("/v1/models")]);
        const mine = (downloads.downloads || []).filter((x) => x.model_id === chosen);
        const total = mine.reduce((a, x) => a + (x.bytes_total || 0), 0), done = mine.reduce((a, x) => a + (x.bytes_done || 0), 0);
        const failed = mine.find((x) => x.status === "failed");
        if (failed) throw new Error(failed.error || "the download failed");
        const pct = total ? (100 * done) / total : 0;
        $("#rec-bar span").style.width = pct + "%";
        if ((models.data || []).some((m) => m.id === chosen)) break;
        say("#rec-status", `Downloading ${r.repo_id}: ${pct.toFixed(0)}%`);
        await new Promise((res) => setTimeout(res, 500));
        if (!$("#rec-bar")) return; // the user left the page
      }
      $("#rec-bar span").style.width = "100%";
      say("#rec-status", `${chosen} is ready.`);
    } catch (err) {
      say("#rec-status", err.message, true);
      for (const x of main().querySelectorAll("button[data-rec]")) x.disabled = false;
    }
  };
  // 2: a network by code or QR picture.
  const join = async (text) => {
    say("#welcome-net", "Connecting…");
    const r = await joinNetwork(text);
    say("#welcome-net", `Connected (${r.connected_peers} peer(s)).`);
  };
  const act = (id, f) => async () => { if (needKey()) return; try { await f(); } catch (e) { say(id, e.message, true); } };
  $("#welcome-join").onclick = act("#welcome-net", () => join($("#welcome-code").value));
  $("#welcome-file").onchange = act("#welcome-net", async () => {
    const text = await codeInPicture($("#welcome-file"), NETWORK_SCAN);
    if (!text) return;
    $("#welcome-code").value = text;
    await join(text);
  });
  // 3: a pool.
  $("#welcome-pool-create").onclick = act("#welcome-pool-note", async () => {
    const st = await client.post("/api/pool/create", { name: $("#welcome-pool").value || "My Devices" });
    say("#welcome-pool-note", `Pool ${st.name} created: invite devices from My devices.`);
  });
  $("#welcome-done").onclick = () => {
    location.hash = chosen ? `#/chat?model=${encodeURIComponent(chosen)}` : "#/chat";
  };
  return () => { main().onclick = null; };
}

// ---- network ----------------------------------------------------------------------

/** A picture of the swarm: for each model, one row per holder with the layers it
 *  holds on a bar of the model's layers (this node first). */
function swarmMapHtml(models, peers, self) {
  const byModel = new Map();
  const add = (model, holder, a, b, online) => {
    if (!byModel.has(model)) byModel.set(model, { holders: new Map(), layers: 0 });
    const m = byModel.get(model);
    if (!m.holders.has(holder.id)) m.holders.set(holder.id, { ...holder, online, ranges: [] });
    m.holders.get(holder.id).ranges.push([a, b]);
    m.layers = Math.max(m.layers, b);
  };
  for (const m of models) {
    for (const s of m.shards || []) {
      if (s.held) add(m.id, { id: self, name: "this node" }, s.layer_start, s.layer_end, true);
    }
  }
  for (const p of peers) {
    for (const m of p.models || []) {
      add(m.id, { id: p.node_id, name: p.nickname || p.node_id.slice(0, 8) }, m.layer_start, m.layer_end, p.is_active);
    }
  }
  for (const m of models) if (byModel.has(m.id) && m.n_layers) byModel.get(m.id).layers = Math.max(byModel.get(m.id).layers, m.n_layers);
  if (!byModel.size) return `<p class="muted">No model is held by this node or its peers yet.</p>`;
  const W = 640, left = 150, rowH = 22;
  return [...byModel.entries()].map(([id, m]) => {
    const rows = [...m.holders.values()];
    const h = rows.length * rowH + 24;
    const x = (layer) => left + ((W - left - 10) * layer) / Math.max(1, m.layers);
    const bars = rows.map((r, i) => {
      const y = 20 + i * rowH;
      const ranges = r.ranges.map(([a, b]) => `<rect x="${x(a).toFixed(1)}" y="${y}" width="${Math.max(2, x(b) - x(a)).toFixed(1)}" height="${rowH - 6}" rx="3"
          class="${r.id === self ? "self" : r.online ? "on" : "off"}"><title>${esc(r.name)}: layers ${a}–${b - 1}</title></rect>`).join("");
      return `<text x="4" y="${y + rowH - 10}">${esc(r.name)}</text>${ranges}`;
    }).join("");
    return `<figure class="swarm-model" data-model="${esc(id)}"><figcaption>${esc(id)} <span class="muted">· ${m.layers} layers · ${rows.length} holder(s)</span></figcaption>
      <svg role="img" aria-label="${esc(`Layers of ${id} held by ${rows.length} node(s)`)}" viewBox="0 0 ${W} ${h}" width="100%" class="swarm-map">
        <text x="${left}" y="12" class="axis">layer 0</text><text x="${W - 10}" y="12" text-anchor="end" class="axis">${m.layers}</text>
        ${bars}</svg></figure>`;
  }).join("");
}

function peerRowsHtml(list) {
  return list.map((p) => `<tr>
      <td><span class="dot ${p.is_active ? "on" : ""}" title="${p.is_active ? "connected" : "not connected"}"></span></td>
      <td class="mono">${esc(p.node_id.slice(0, 16))}…</td><td>${esc(p.nickname || "")}</td>
      <td>${esc(p.region || "")}</td><td>${p.latency_ms != null ? p.latency_ms.toFixed(1) + " ms" : "—"}</td>
      <td>${esc(p.trust_score)}</td>
      <td>${esc((p.models || []).map((m) => `${m.id} [${m.layer_start}–${m.layer_end})`).join(", "))}</td></tr>`).join("")
    || `<tr><td colspan="7" class="muted">No peers yet: join a network with a code above.</td></tr>`;
}

async function network() {
  let code = null;
  try { code = await client.get("/api/admin/network-code"); } catch { /* networking is off */ }
  main().innerHTML = `<h1>Network</h1>
    <h2>This node's code</h2>
    ${code ? `<p class="muted">Give it to another device (type it or scan the picture) to join this node's network.</p>
      <div class="row"><input id="net-code" class="mono" readonly size="60" aria-label="This node's network code" value="${esc(code.code)}">
        <button id="net-copy" class="secondary">Copy</button></div>
      <div id="net-qr">${code.qr_svg}</div>
      <p class="muted" id="net-phase">${esc(code.phase)} · ${esc(code.connected_peers)} connected peer(s)</p>`
    : `<p class="muted">Networking is off on this node (started without the mesh).</p>`}
    <h2>Join a network</h2>
    <div class="row"><input id="net-join-code" class="mono" size="60" placeholder="swarm://…" aria-label="Network code to join" autocomplete="off">
      <button id="net-join">Join</button></div>
    <div class="row"><label class="secondary">Read a QR picture <input type="file" id="net-join-file" accept="image/*"></label>
      <button id="net-join-camera" class="secondary">Scan with camera</button></div>
    <video id="camera" hidden playsinline></video>
    <p id="net-message" role="alert"></p>
    <h2>Peers</h2>
    <table id="peer-table"><thead><tr><th><span class="sr-only">Status</span></th><th>Node</th><th>Nickname</th><th>Region</th><th>Latency</th><th>Trust</th><th>Models</th></tr></thead>
      <tbody id="peer-rows"></tbody></table>
    <h2>The swarm</h2>
    <p class="muted">Which layers of which model each node holds (green: connected; blue: this node).</p>
    <div id="swarm-map"></div>
    <p class="muted" id="net-live"></p>`;
  const msg = (text, bad = false) => { const p = $("#net-message"); p.textContent = text; p.className = bad ? "error" : "ok"; };
  const self = (await client.get("/health")).node_id;
  const refresh = async () => {
    const [peers, models] = await Promise.all([client.get("/api/admin/peers"), client.get("/api/admin/models")]);
    if (!$("#peer-rows")) return;
    $("#peer-rows").innerHTML = peerRowsHtml(peers.peers || []);
    $("#swarm-map").innerHTML = swarmMapHtml(models.models || [], peers.peers || [], self);
    $("#net-live").textContent = "Updated " + new Date().toLocaleTimeString();
  };
  await refresh();
  if ($("#net-copy")) $("#net-copy").onclick = async () => { await navigator.clipboard?.writeText($("#net-code").value); toast("Copied"); };
  const join = async (text) => {
    msg("Connecting…");
    const r = await joinNetwork(text);
    msg(`Connected to ${r.node_id.slice(0, 16)}… (${r.connected_peers} peer(s) now).`);
    await refresh();
  };
  const act = (f) => async () => { if (needKey()) return; try { await f(); } catch (e) { msg(e.message, true); } };
  $("#net-join").onclick = act(() => join($("#net-join-code").value));
  $("#net-join-code").onkeydown = (e) => { if (e.key === "Enter") $("#net-join").click(); };
  const scanned = async (text) => { $("#net-join-code").value = text; await join(text); };
  $("#net-join-file").onchange = act(async () => {
    const text = await codeInPicture($("#net-join-file"), NETWORK_SCAN);
    if (!text) return;
    msg("Read a network code from the picture; joining…");
    await scanned(text);
  });
  $("#net-join-camera").onclick = act(() => scanCamera(NETWORK_SCAN, scanned, msg));
  // Live: a changed peer set redraws at once; latencies and holdings every 5 s.
  const ws = client.socket((m) => { if (m.type === "peer_list") refresh().catch(() => {}); });
  const timer = setInterval(() => refresh().catch(() => {}), 5000);
  return () => { ws.close(); clearInterval(timer); stopCamera(); };
}

// ---- models --------------------------------------------------------------------------

const size = (b) => (b >= 1e9 ? `${(b / 1e9).toFixed(1)} GB` : `${(b / 1e6).toFixed(1)} MB`);

/** The Hub catalog: repositories, their variants with a fit badge, and download
 *  buttons for the whole model or this node's fair share of its shards. */
function catalogHtml(results) {
  if (!results.length) return `<p class="muted">No GGUF repositories found.</p>`;
  return results.map((r) => {
    const variants = (r.variants || []).map((v) => `<tr data-file="${esc(v.filename)}">
        <td>${v.filename === r.recommended_file ? "★ " : ""}${esc(v.quant || "—")}</td>
        <td>${esc(size(v.size_bytes || 0))}${v.parts > 1 ? ` <span class="muted">(${esc(v.parts)} parts)</span>` : ""}</td>
        <td><span class="badge ${v.fits_vram ? "ok" : "warn"}">${v.fits_vram ? "fits" : "too big"}</span></td>
        <td class="muted">${esc(v.filename)}</td>
        <td><button class="secondary" data-hf="whole" data-repo="${esc(r.repo_id)}" data-file="${esc(v.filename)}">Download</button>
          ${r.split_supported ? `<button class="secondary" data-hf="share" data-repo="${esc(r.repo_id)}" data-file="${esc(v.filename)}">My share</button>` : ""}</td></tr>`);
    return `<div class="hf-repo" data-repo="${esc(r.repo_id)}"><h3>${esc(r.repo_id)}
        <span class="muted">${esc(r.architecture || "")} · ${esc(r.downloads)} downloads · ${esc(r.likes)} likes${r.gated ? " · gated" : ""}</span></h3>
      ${r.split_supported ? "" : `<p class="muted">This architecture is served whole (it cannot be split across peers yet).</p>`}
      <table><tr><th>Quant</th><th>Size</th><th>Here</th><th>File</th><th></th></tr>${variants.join("")}</table></div>`;
  }).join("");
}

function downloadsHtml(list) {
  const rows = list.map((d) => {
    const pct = (100 * (d.bytes_done || 0)) / (d.bytes_total || 1);
    const active = d.status === "queued" || d.status === "downloading" || d.status === "verifying";
    return `<tr data-download="${esc(d.id)}"><td>${esc(d.model_id)} #${esc(d.shard_index)}</td>
      <td><div class="bar"><span data-pct="${pct}"></span></div></td>
      <td>${pct.toFixed(0)}%</td><td>${esc(((d.speed_bps || 0) / 1e6).toFixed(1))} MB/s</td>
      <td>${esc(d.source)}</td><td title="${esc(d.error || "")}">${esc(d.status)}</td>
      <td>${active ? `<button class="secondary" data-cancel="${esc(d.id)}">Cancel</button>` : ""}</td></tr>`;
  });
  return rows.join("") || `<tr><td class="muted">None.</td></tr>`;
}

function widths(root) {
  for (const s of root.querySelectorAll("[data-pct]")) s.style.width = Math.min(100, +s.dataset.pct) + "%";
}

/** The models held here and by peers, each with its shards and where they live. */
async function modelListHtml() {
  const [list, coverage] = await Promise.all([client.get("/api/admin/models"), client.get("/api/pool/coverage")]);
  const cov = Object.fromEntries((coverage.models || []).map((m) => [m.model_id, m]));
  const items = (list.models || []).map((m) => {
    const c = cov[m.id];
    const shards = (m.shards || []).map((s) => `<tr>
        <td>${s.index}</td><td>[${s.layer_start}–${s.layer_end})</td>
        <td>${s.held ? (s.loaded ? "loaded" : "on disk") : "—"}</td>
        <td title="${esc((s.holder_ids || []).join("\n"))}">${esc(s.holders ?? 0)}${(s.holder_ids || []).length ? ` <span class="muted">${(s.holder_ids || []).slice(0, 3).map((h) => esc(h.slice(0, 8))).join(", ")}</span>` : ""}</td>
        <td>${s.held ? `<button class="secondary" data-act="${s.loaded ? "unload" : "load"}" data-model="${esc(m.id)}" data-shard="${s.index}">${s.loaded ? "Unload" : "Load"}</button>`
                     : `<button class="secondary" data-act="download" data-model="${esc(m.id)}" data-shard="${s.index}">Download</button>`}</td></tr>`);
    const add = m.local ? "" : `<button data-add="${esc(m.id)}">Add from the network</button>
        <span class="muted">held by ${esc(m.holders)} peer(s)</span>`;
    // What the swarm makes of it: trust level, demand, target, auto-manage.
    const swarm = `<div class="row"><span class="badge trust" data-trust="${esc(m.trust_level)}">${esc(m.trust_level)}</span>
        <span class="muted">${esc(m.demand?.requesters ?? 0)} requester(s) · target ${esc(m.replication_target ?? 0)} holder(s)</span>
        <label><input type="checkbox" data-auto="${esc(m.id)}" ${m.auto_manage?.enabled ? "checked" : ""}> Auto-manage</label></div>`;
    return `<div class="model" data-model="${esc(m.id)}"><h2>${esc(m.id)} <span class="muted">${esc(m.architecture || "")} · ${esc(m.n_layers ?? "?")} layers</span></h2>
      ${swarm}
      <div class="row">${add}<div class="bar"><span data-pct="${c ? c.coverage_pct : 0}"></span></div>
        <span class="muted">pool coverage ${c ? c.coverage_pct.toFixed(0) : 0}%</span></div>
      ${shards.length ? `<table><tr><th>Shard</th><th>Layers</th><th>Here</th><th>Holders</th><th></th></tr>${shards.join("")}</table>` : ""}</div>`;
  });
  return items.join("") || `<p class="muted">No models yet: search the catalog above, or add one a peer holds.</p>`;
}

async function models() {
  const downloads = await client.get("/api/admin/downloads");
  main().innerHTML = `<h1>Models</h1>
    <h2>Catalog</h2>
    <div class="row"><input id="hf-query" placeholder="Search the Hugging Face Hub: qwen, llama, smollm2…">
      <button id="hf-search">Search</button><span class="muted" id="hf-status"></span></div>
    <div id="hf-results"></div>
    <h2>Your models and the swarm's</h2>
    <div id="model-list">${await modelListHtml()}</div>
    <h2>Downloads</h2><table id="downloads">${downloadsHtml(downloads.downloads || [])}</table>`;
  widths(main());

  const search = async () => {
    const q = $("#hf-query").value.trim();
    if (!q) return;
    $("#hf-status").textContent = "Searching…";
    try {
      const results = await client.get(`/api/admin/hf/search?query=${encodeURIComponent(q)}`);
      $("#hf-results").innerHTML = catalogHtml(results);
      $("#hf-status").textContent = `${results.length} repositories`;
    } catch (err) {
      $("#hf-status").textContent = "";
      $("#hf-results").innerHTML = `<p class="error" id="hf-error">${esc(err.message)}</p>`;
    }
  };
  $("#hf-search").onclick = search;
  $("#hf-query").onkeydown = (e) => { if (e.key === "Enter") search(); };

  // Downloads update live while the page is open; the model list when one ends.
  let finished = (downloads.downloads || []).filter((d) => d.status === "done").length;
  const refresh = async () => {
    try {
      const d = await client.get("/api/admin/downloads");
      const table = $("#downloads");
      if (!table) return;
      table.innerHTML = downloadsHtml(d.downloads || []);
      widths(table);
      const done = (d.downloads || []).filter((x) => x.status === "done").length;
      if (done !== finished) {
        finished = done;
        $("#model-list").innerHTML = await modelListHtml();
        widths($("#model-list"));
      }
    } catch { /* the next tick tries again */ }
  };
  const timer = setInterval(refresh, 1000);

  // One handler for the page (assigned, not added: the page renders again on
  // every visit and must not answer a click twice).
  main().onclick = async (e) => {
    const auto = e.target.closest("input[data-auto]");
    if (auto) {
      if (needKey()) { auto.checked = !auto.checked; return; }
      try {
        const r = await client.put(`/api/admin/models/${encodeURIComponent(auto.dataset.auto)}/auto-manage`, { enabled: auto.checked });
        toast(`${r.model_id}: auto-manage ${r.enabled ? "on" : "off"}`);
      } catch (err) {
        auto.checked = !auto.checked;
        toast(err.message, true);
      }
      return;
    }
    const hf = e.target.closest("button[data-hf]");
    const cancel = e.target.closest("button[data-cancel]");
    const addBtn = e.target.closest("button[data-add]");
    const b = e.target.closest("button[data-act]");
    const btn = hf || cancel || addBtn || b;
    if (!btn || needKey()) return;
    btn.disabled = true;
    try {
      if (hf) {
        const share = hf.dataset.hf === "share";
        const r = await client.post("/api/admin/hf/download-shards",
          { repo_id: hf.dataset.repo, filename: hf.dataset.file, peer_fair_share: share });
        toast(`${r.model_id}: downloading shard(s) ${r.shard_indices.join(", ") || "none (already here)"}`);
      } else if (cancel) {
        await client.post(`/api/admin/downloads/${encodeURIComponent(cancel.dataset.cancel)}/cancel`);
        toast("Download cancelled");
      } else if (addBtn) {
        await client.post(`/api/admin/models/${encodeURIComponent(addBtn.dataset.add)}/add`);
        toast(`${addBtn.dataset.add}: acquiring from peers`);
      } else {
        const r = await client.post(`/api/admin/models/${encodeURIComponent(b.dataset.model)}/shards/${b.dataset.shard}/${b.dataset.act}`);
        toast(r.status === "use_hf" ? `No peer holds it: download it from ${r.repo_id}` : `${b.dataset.act}: shard ${b.dataset.shard}`);
        $("#model-list").innerHTML = await modelListHtml();
        widths($("#model-list"));
      }
      await refresh();
    } catch (err) {
      toast(err.message, true);
    }
    btn.disabled = false;
  };
  return () => { clearInterval(timer); main().onclick = null; };
}

// ---- chat ------------------------------------------------------------------------------

async function chat() {
  const list = await client.get("/v1/models");
  const wanted = new URLSearchParams(location.hash.split("?")[1] || "").get("model");
  const options = (list.data || []).map((m) => `<option ${m.id === wanted ? "selected" : ""}>${esc(m.id)}</option>`).join("");
  main().innerHTML = `<h1>Chat</h1>
    <div class="row"><label>Model <select id="chat-model">${options}</select></label></div>
    <div id="chat-log"></div>
    <textarea id="chat-input" placeholder="Ask something…"></textarea>
    <div class="row"><button id="chat-send">Send</button><button id="chat-stop" class="secondary" disabled>Stop</button>
      <span class="muted" id="chat-status"></span></div>`;
  if (!options) $("#chat-status").textContent = "No model is available yet.";
  const history = [];
  let controller = null;
  const send = async () => {
    const text = $("#chat-input").value.trim();
    if (!text || controller || needKey()) return;
    $("#chat-input").value = "";
    history.push({ role: "user", content: text });
    $("#chat-log").insertAdjacentHTML("beforeend", `<div class="msg user">${esc(text)}</div>`);
    const out = document.createElement("div");
    out.className = "msg assistant";
    out.id = "chat-output";
    $("#chat-output")?.removeAttribute("id");
    $("#chat-log").append(out);
    controller = new AbortController();
    $("#chat-send").disabled = true;
    $("#chat-stop").disabled = false;
    $("#chat-status").textContent = "Generating…";
    const started = performance.now();
    let tokens = 0;
    try {
      await client.stream("/v1/chat/completions",
        { model: $("#chat-model").value, messages: history, max_tokens: 256 },
        (ev) => {
          const delta = ev.choices?.[0]?.delta?.content;
          if (delta) { out.textContent += delta; tokens++; }
        }, controller.signal);
      $("#chat-status").textContent = `${tokens} chunks in ${((performance.now() - started) / 1000).toFixed(1)} s`;
      out.dataset.done = "true";
    } catch (err) {
      $("#chat-status").textContent = err.name === "AbortError" ? "Stopped." : err.message;
      out.dataset.done = "true";
    }
    history.push({ role: "assistant", content: out.textContent });
    controller = null;
    $("#chat-send").disabled = false;
    $("#chat-stop").disabled = true;
  };
  $("#chat-send").onclick = send;
  $("#chat-stop").onclick = () => controller?.abort();
  $("#chat-input").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } };
  return () => controller?.abort();
}

// ---- pool ------------------------------------------------------------------------------

const uptime = (s) => (s ? duration(s) : "—");

/** One device of the pool: status, name (this device's is editable), stats and,
 *  for the owner, its contribution level and a remove button. */
function memberRowHtml(m, me, owner) {
  const st = m.stats || {};
  const self = m.node_id === me;
  const name = self
    ? `<input id="rename" value="${esc(m.device_name || "")}" size="16" maxlength="64" aria-label="This device's name">
       <button id="rename-save" class="secondary">Rename</button>`
    : esc(m.device_name || "—");
  const level = owner
    ? `<input type="number" min="0" max="100" step="1" size="4" data-level="${esc(m.node_id)}" value="${esc(m.contribution ?? 100)}"
         aria-label="Contribution level of ${esc(m.device_name || m.node_id.slice(0, 8))} (percent)">
       <button class="secondary" data-set-level="${esc(m.node_id)}">Set</button>`
    : `${esc(m.contribution ?? 100)}%`;
  return `<tr data-member="${esc(m.node_id)}">
    <td><span class="dot ${m.online ? "on" : ""}"></span> ${m.online ? "online" : "offline"}${m.accepted ? "" : ' <span class="muted">(invited)</span>'}</td>
    <td>${name}${self ? ' <span class="muted">(this device)</span>' : ""}</td>
    <td class="mono" title="${esc(m.node_id)}">${esc(m.node_id.slice(0, 12))}…</td><td>${esc(m.role)}</td>
    <td>${esc(st.vram_gb ?? 0)} GB</td><td>${esc(st.shards_hosted ?? st.layers_hosted ?? 0)}${st.shards_hosted != null ? " shards" : " layers"}</td>
    <td>${esc(st.forwards_served ?? 0)}</td><td>${esc(uptime(st.uptime_secs))}</td>
    <td>${level}</td>
    <td>${owner && !self ? `<button class="secondary" data-remove="${esc(m.node_id)}">Remove</button>` : ""}</td></tr>`;
}

function pinsHtml(pins, members, owner) {
  const name = (id) => members.find((m) => m.node_id === id)?.device_name || id.slice(0, 12) + "…";
  const rows = pins.map((p, i) => `<tr><td>${esc(p.model_id)}</td><td>${esc(name(p.target_node_id))}</td>
      <td>${p.shard_indices.length ? esc(p.shard_indices.join(", ")) : "all"}</td>
      <td>${owner ? `<button class="secondary" data-unpin="${i}">Unpin</button>` : ""}</td></tr>`).join("");
  return `<table id="pins"><thead><tr><th>Model</th><th>Device</th><th>Shards</th><th></th></tr></thead>
    <tbody>${rows || `<tr><td colspan="4" class="muted">No pins: devices hold what the swarm needs.</td></tr>`}</tbody></table>`;
}

async function pool() {
  const [s, invitations, pm, pinList, health] = await Promise.all([client.get("/api/pool/state"),
    client.get("/api/pool/invitations"), client.get("/api/pool/private-mode"), client.get("/api/pool/pins"),
    client.get("/health")]);
  const me = health.node_id;
  const owner = s.role === "owner";
  const members = s.members || [];
  const pins = pinList.pins || [];
  const invites = (invitations.invitations || []).map((v) => `<tr><td>${esc(v.pool_name)}</td>
      <td class="mono">${esc(v.owner_node_id.slice(0, 12))}…</td>
      <td><button data-accept="${esc(v.invitation_id)}">Accept</button></td></tr>`).join("");
  main().innerHTML = `<h1>My devices</h1>
    ${s.in_pool ? `<p>Pool <b>${esc(s.name)}</b> · this device is the <b>${esc(s.role)}</b> · ${members.length} of ${esc(s.max_devices)} devices ·
        <span id="combined-vram">${esc(s.combined_vram_gb ?? 0)} GB VRAM in all</span></p>
      <table id="members"><thead><tr><th>Status</th><th>Device</th><th>Node</th><th>Role</th><th>VRAM</th><th>Hosts</th><th>Forwards</th><th>Uptime</th><th>Contribution</th><th></th></tr></thead>
        <tbody>${members.map((m) => memberRowHtml(m, me, owner)).join("")}</tbody></table>
      ${owner ? `<h2>Invite a device</h2>
        <div class="row"><button id="gen-code">New invite code</button></div>
        <div id="invite" hidden><div class="code" id="pool-code"></div><div id="pool-qr"></div>
          <p class="muted">One use, valid 24 hours. Type it on the other device or scan the QR code.</p></div>
        <div class="row"><input id="invite-node" class="mono" size="40" placeholder="a node id (64 hex)" aria-label="Node id to invite">
          <button id="invite-send" class="secondary">Invite by node id</button></div>` : ""}
      <h2>Credits</h2>
      ${owner ? `<div class="row"><label for="split">Members keep</label>
          <input id="split" type="number" min="0" max="50" step="1" value="${esc(s.credit_split_pct ?? 0)}"> %
          <button id="split-save" class="secondary">Save</button><span class="muted">0–50 % of what each device earns; the rest goes to the owner.</span></div>`
        : `<p>Members keep ${esc(s.credit_split_pct ?? 0)}% of their credits.</p>`}
      <h2>Pins</h2>
      <p class="muted">A pinned model (or some of its shards) is fetched by that device and never deleted while pinned.</p>
      ${pinsHtml(pins, members, owner)}
      ${owner ? `<div class="row"><input id="pin-model" placeholder="model id" aria-label="Model to pin">
          <select id="pin-device" aria-label="Device to hold it">${members.map((m) => `<option value="${esc(m.node_id)}">${esc(m.device_name || m.node_id.slice(0, 12))}</option>`).join("")}</select>
          <input id="pin-shards" size="10" placeholder="all, or 0, 2" aria-label="Shards to pin">
          <button id="pin-add" class="secondary">Pin</button></div>` : ""}
      <div class="row"><button id="leave" class="secondary">Leave pool</button></div>`
    : `<h2>Create a pool</h2><div class="row"><input id="pool-name" placeholder="My Devices" aria-label="Pool name"><button id="pool-create">Create</button></div>
       <h2>Join a pool</h2>
       <div class="row"><input id="join-code" placeholder="8-character code" maxlength="12" autocomplete="off" aria-label="Invite code">
         <button id="join-btn">Join</button></div>
       <div class="row"><label class="secondary">Read a QR picture <input type="file" id="join-file" accept="image/*"></label>
         <button id="join-camera" class="secondary">Scan with camera</button></div>
       <video id="camera" hidden playsinline></video>
       <h2>Invitations</h2>
       <table id="invitations"><thead><tr><th>Pool</th><th>Owner</th><th></th></tr></thead>
         <tbody>${invites || `<tr><td colspan="3" class="muted">None: an owner can invite this device by its node id.</td></tr>`}</tbody></table>
       <p class="muted">This device's node id: <span class="mono" id="my-node-id">${esc(me)}</span></p>`}
    <p id="pool-message" role="alert"></p>
    <h2>Private mode</h2>
    <div class="row"><label><input type="checkbox" id="pm-enabled" ${pm.enabled ? "checked" : ""}> Prompts stay on my devices</label>
      <label><input type="checkbox" id="pm-lan" ${pm.allow_lan ? "checked" : ""}> Also devices on this LAN</label>
      <label><input type="checkbox" id="pm-offline" ${pm.offline_mode ? "checked" : ""}> Offline: no bootstrap, LAN discovery only</label></div>
    <p class="muted" id="coverage">${esc((pm.coverage?.models || []).map((m) => `${m.model_id}: ${m.coverage_pct.toFixed(0)}% of shards on your devices`).join("; ") || "No model is on your devices yet.")}</p>`;
  const msg = (text, bad = false) => { const p = $("#pool-message"); p.textContent = text; p.className = bad ? "error" : "ok"; };
  const act = (f) => async () => { if (needKey()) return; try { await f(); } catch (e) { msg(e.message, true); } };
  const on = (sel, f) => { if ($(sel)) $(sel).onclick = act(f); };
  // Shows the page again with the change, then says what happened.
  const done = async (text) => { await route(); if ($("#pool-message")) msg(text); };
  on("#pool-create", async () => {
    await client.post("/api/pool/create", { name: $("#pool-name").value || "My Devices" });
    route();
  });
  on("#gen-code", async () => {
    const { code } = await client.post("/api/pool/generate-code");
    const { svg } = await client.post("/api/pool/qr", { code });
    $("#pool-code").textContent = code;
    $("#pool-qr").innerHTML = svg;
    $("#invite").hidden = false;
  });
  on("#leave", async () => { await client.post("/api/pool/leave"); route(); });
  on("#rename-save", async () => {
    await client.post("/api/pool/device-name", { name: $("#rename").value });
    await done("Renamed; the other devices see the new name once the owner has it.");
  });
  on("#split-save", async () => {
    const r = await client.put("/api/pool/credit-split", { pct: Number($("#split").value) });
    await done(`Members now keep ${r.credit_split_pct}% of their credits.`);
  });
  on("#invite-send", async () => {
    await client.post("/api/pool/invite", { node_id: $("#invite-node").value.trim() });
    msg("Invitation sent: the device lists it until it accepts.");
  });
  on("#pin-add", async () => {
    const text = $("#pin-shards").value.trim();
    const shard_indices = !text || text === "all" ? [] : text.split(",").map((t) => {
      const n = Number(t.trim());
      if (!Number.isInteger(n) || n < 0) throw new Error(`"${t.trim()}" is not a shard number`);
      return n;
    });
    await client.post("/api/pool/pin", { model_id: $("#pin-model").value.trim(), target_node_id: $("#pin-device").value, shard_indices });
    await done("Pinned: that device fetches the shards and keeps them.");
  });
  const join = async (code) => {
    msg("Asking the pool's owner…");
    const st = await client.post("/api/pool/join", { code });
    msg(`Joined ${st.name}.`);
    setTimeout(route, 800);
  };
  if ($("#join-btn")) {
    $("#join-btn").onclick = act(() => join($("#join-code").value));
    $("#join-code").onkeydown = (e) => { if (e.key === "Enter") $("#join-btn").click(); };
    $("#join-file").onchange = act(async () => {
      const code = await codeInPicture($("#join-file"), POOL_SCAN);
      if (!code) return;
      $("#join-code").value = code;
      msg(`Read ${code} from the picture; joining…`);
      await join(code);
    });
    $("#join-camera").onclick = act(() => scanCamera(POOL_SCAN, async (code) => {
      $("#join-code").value = code;
      await join(code);
    }, msg));
  }
  // Buttons inside tables: one handler for the page.
  main().onclick = async (e) => {
    const b = e.target.closest("button[data-accept], button[data-remove], button[data-set-level], button[data-unpin]");
    if (!b || needKey()) return;
    b.disabled = true;
    try {
      if (b.dataset.accept) {
        const st = await client.post("/api/pool/accept", { invitation_id: b.dataset.accept });
        await done(`Joined ${st.name}.`);
      } else if (b.dataset.remove) {
        await client.post("/api/pool/remove", { node_id: b.dataset.remove });
        await done("Removed; the device leaves the pool on the owner's signed notice.");
      } else if (b.dataset.setLevel) {
        const input = main().querySelector(`input[data-level="${b.dataset.setLevel}"]`);
        await client.put("/api/pool/contribution", { node_id: b.dataset.setLevel, level: Number(input.value) });
        await done(`Contribution level set to ${input.value}%.`);
      } else if (b.dataset.unpin) {
        await client.del("/api/pool/pin", pins[Number(b.dataset.unpin)]);
        await done("Unpinned.");
      }
    } catch (err) {
      msg(err.message, true);
      b.disabled = false;
    }
  };
  // Private mode: the switches send all three; offline mode waits for a restart.
  const savePm = act(async () => {
    const r = await client.put("/api/pool/private-mode",
      { enabled: $("#pm-enabled").checked, allow_lan: $("#pm-lan").checked, offline_mode: $("#pm-offline").checked });
    $("#private-mode").checked = r.enabled;
    msg((r.restart_required || []).includes("offline_mode") ? "Saved; offline mode takes effect after a restart." : "Private mode saved.");
  });
  for (const id of ["#pm-enabled", "#pm-lan", "#pm-offline"]) $(id).onchange = savePm;
  return () => { stopCamera(); main().onclick = null; };
}

let cameraStream = null;
function stopCamera() {
  cameraStream?.getTracks().forEach((t) => t.stop());
  cameraStream = null;
}

/** Reads QR codes from the camera until `path` (a scan endpoint) finds one,
 *  then hands its code to `onCode`. */
async function scanCamera(path, onCode, msg) {
  if (!navigator.mediaDevices?.getUserMedia) {
    msg("This window cannot use a camera; type the code or read a picture of it.", true);
    return;
  }
  cameraStream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
  const video = $("#camera");
  video.srcObject = cameraStream;
  video.hidden = false;
  await video.play();
  msg("Point the camera at the QR code…");
  const canvas = document.createElement("canvas");
  while (cameraStream) {
    await new Promise((r) => setTimeout(r, 500));
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    const blob = await new Promise((r) => canvas.toBlob(r, "image/jpeg", 0.85));
    try {
      const { code } = await client.upload(path, blob);
      stopCamera();
      video.hidden = true;
      await onCode(code);
      return;
    } catch (e) {
      if (e.code !== "NO_QR_CODE") throw e;
    }
  }
}

// ---- credits ---------------------------------------------------------------------------

async function credits() {
  const c = await client.get("/api/admin/credits");
  const board = await client.get("/api/identity/leaderboard?limit=20");
  let txs = null;
  try { txs = await client.get("/api/v1/wallet/transactions?limit=20"); } catch { /* needs the key */ }
  const rows = (txs?.transactions || []).map((t) => `<tr><td>${esc(new Date(t.timestamp).toLocaleString())}</td>
    <td>${esc(t.type)}</td><td>${t.amount.toFixed(6)}</td><td class="mono">${esc((t.to || t.from || "").slice(0, 16))}…</td></tr>`).join("");
  const lb = (board.leaderboard || []).map((r) => `<tr><td>${r.rank}</td><td class="mono">${esc(r.node_id.slice(0, 16))}…${r.is_self ? " (you)" : ""}</td>
    <td>${esc(r.nickname || "")}</td><td>${r.balance.toFixed(4)}</td><td>${esc(r.tier)}</td></tr>`).join("");
  main().innerHTML = `<h1>Credits</h1>
    <div class="grid">${card("Balance", c.balance.toFixed(6), "balance")}${card("Earned", c.earned.toFixed(6))}
      ${card("Spent", c.spent.toFixed(6))}${card("Tier", c.tier)}</div>
    <p class="muted">You earn for layers and tokens you run for others and spend for what others run for you
      (${c.rates.per_layer_token} per layer × token, ${c.rates.per_token} per generated token). Every entry is signed by both sides.</p>
    <h2>Transactions</h2>${txs ? `<table><tr><th>When</th><th>Type</th><th>Amount</th><th>With</th></tr>${rows || `<tr><td class="muted" colspan="4">None yet.</td></tr>`}</table>` : `<p class="muted">Needs the API key (Settings).</p>`}
    <h2>Network leaderboard</h2><table><tr><th>#</th><th>Node</th><th>Nickname</th><th>Balance</th><th>Tier</th></tr>${lb}</table>`;
}

// ---- settings --------------------------------------------------------------------------

const DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const DAY_NAMES = { mon: "Monday", tue: "Tuesday", wed: "Wednesday", thu: "Thursday", fri: "Friday", sat: "Saturday", sun: "Sunday" };

/** "9-17, 20-24" → [{start: 9, end: 17}, {start: 20, end: 24}]; the node checks the ranges. */
function parseHours(text, day) {
  return text.split(",").map((t) => t.trim()).filter(Boolean).map((t) => {
    const m = t.match(/^(\d{1,2})\s*-\s*(\d{1,2})$/);
    if (!m) throw new Error(`${DAY_NAMES[day]}: "${t}" is not a range of hours like 9-17`);
    return { start: Number(m[1]), end: Number(m[2]) };
  });
}

const showHours = (ranges) => (ranges || []).map((r) => `${r.start}-${r.end}`).join(", ");

function scheduleStatus(s) {
  return s.enabled
    ? `${s.contributing_now ? "Contributing now" : "Not contributing now: serving only this device and its pool"} (local time ${s.local_time}).`
    : `Off: contributing at all hours (local time ${s.local_time}).`;
}

/** The settings a person changes, grouped, with their ranges (the node checks
 *  them again and its message shows next to the field). */
const SETTINGS = [
  { group: "Model", fields: [
    { key: "model", label: "Model file (GGUF)", type: "text", help: "Served whole by this node; empty serves none (split models come from peers)." },
    { key: "context_size", label: "Context size", type: "number", min: 64, max: 131072, unit: "tokens" },
    { key: "max_parallel", label: "Requests decoded together", type: "number", min: 0, max: 64, help: "0 picks from the context size." },
    { key: "default_max_tokens", label: "Default answer length", type: "number", min: 1, unit: "tokens" },
  ] },
  { group: "Hardware", fields: [
    { key: "gpu_layers", label: "GPU offload", type: "layers", unit: "layers",
      help: "auto: as many as fit in free GPU memory; 0 runs on the CPU." },
    { key: "threads", label: "Inference threads", type: "number", min: 0, max: 256, help: "0: one per core." },
    { key: "batch_size", label: "Prompt batch", type: "number", min: 1, max: 8192, unit: "tokens" },
  ] },
  { group: "Storage and sharing", fields: [
    { key: "disk_budget_mb", label: "Disk budget", type: "number", min: 0, unit: "MiB", help: "0: no limit." },
    { key: "auto_manage", label: "Fetch shards the swarm lacks", type: "bool" },
    { key: "auto_prune", label: "Delete shards no longer needed", type: "bool" },
    { key: "serve_shards", label: "Serve held shards to the network", type: "bool" },
  ] },
  { group: "Network", fields: [
    { key: "api_port", label: "API port", type: "number", min: 1, max: 65535 },
    { key: "p2p_port", label: "Peer port", type: "number", min: 0, max: 65535, help: "0 picks a free one." },
    { key: "p2p_enabled", label: "Join the peer-to-peer network", type: "bool" },
    { key: "mdns", label: "Find peers on this LAN", type: "bool" },
    { key: "bootstrap", label: "Bootstrap codes", type: "list", help: "swarm:// codes or multiaddrs, comma-separated." },
    { key: "region", label: "Region", type: "text", help: "EU, NA, …; empty guesses from the time zone." },
    { key: "update_endpoint", label: "Update server", type: "text", help: "Empty: the one the app was built with. Only updates signed by the app's key install." },
    { key: "update_check_interval_hours", label: "Check for updates every", type: "number", min: 0, max: 8760, unit: "hours", help: "0: only when asked." },
  ] },
  { group: "Privacy", fields: [
    { key: "encrypted_pipeline", label: "Encrypted pipeline: embed and sample here", type: "bool",
      help: "Prompts and answers never leave this node (it needs the model's first and last shard)." },
    { key: "approximate_answers", label: "Allow approximate answers on slow links", type: "bool",
      help: "Off: a split model answers exactly as the whole model. On: hidden states shrink on links slower than the threshold." },
    { key: "activation_dtype", label: "Hidden states on a slow link", type: "select", options: ["f16", "q8", "f32"],
      help: "Used only when approximate answers are allowed; f16 halves the bytes, q8 quarters them." },
    { key: "slow_link_mbps", label: "Slow link below", type: "number", unit: "Mbit/s", min: 0 },
  ] },
];

const showSetting = (f, v) => (f.type === "list" ? (v || []).join(", ") : f.type === "bool" ? (v ? "on" : "off") : String(v ?? ""));

function settingHtml(f, value, def, restart) {
  const id = `set-${f.key}`;
  const hint = [`default ${showSetting(f, def) || "empty"}`, f.unit, f.min != null ? `${f.min}–${f.max ?? "…"}` : null,
    restart ? "applies after a restart" : null, f.help].filter(Boolean).join(" · ");
  let input;
  if (f.type === "bool") {
    input = `<input type="checkbox" id="${id}" data-setting="${f.key}" ${value ? "checked" : ""}>`;
  } else if (f.type === "select") {
    input = `<select id="${id}" data-setting="${f.key}">${f.options.map((o) => `<option ${o === value ? "selected" : ""}>${esc(o)}</option>`).join("")}</select>`;
  } else {
    const range = f.type === "number" ? ` min="${f.min}"${f.max != null ? ` max="${f.max}"` : ""} step="1"` : "";
    input = `<input type="${f.type === "number" ? "number" : "text"}" id="${id}" data-setting="${f.key}"${range}
      value="${esc(showSetting(f, value))}" aria-describedby="hint-${f.key} err-${f.key}">`;
  }
  return `<div class="field"><label for="${id}">${esc(f.label)}</label>${input}
    <span class="hint muted" id="hint-${f.key}">${esc(hint)}</span><span class="field-error" id="err-${f.key}" role="alert"></span></div>`;
}

/** The form's value of one setting, in the config's JSON type. */
function settingValue(f) {
  const el = $(`#set-${f.key}`);
  if (f.type === "bool") return el.checked;
  if (f.type === "number") return el.value.trim() === "" ? NaN : Number(el.value);
  if (f.type === "list") return el.value.split(",").map((t) => t.trim()).filter(Boolean);
  if (f.type === "layers") return /^\d+$/.test(el.value.trim()) ? Number(el.value.trim()) : el.value.trim();
  return el.value.trim();
}

/** The Updates section: this version, a check, and installing what it found. */
function updatesHtml(version) {
  const u = version.updates || {};
  const status = u.applied
    ? `SwarmLLM ${u.applied.version} is installed: restart to run it.`
    : u.available ? `SwarmLLM ${u.available.version} is available.`
    : u.supported ? (u.last_check ? `Up to date (checked ${u.last_check}).` : "Not checked yet.")
    : "This build does not update itself: update it with the package manager or installer it came from.";
  return `<h2>Updates</h2>
    <p>Version <span id="app-version" class="mono">${esc(version.version)}</span></p>
    <p id="update-status" role="status">${esc(status)}</p>
    <pre id="update-notes" class="muted"${u.available?.notes ? "" : " hidden"}>${esc(u.available?.notes || "")}</pre>
    <div class="row"><button id="update-check" class="secondary">Check for updates</button>
      <button id="update-apply"${u.available ? "" : " hidden"}>Install update</button>
      <button id="update-restart"${u.applied && client.app ? "" : " hidden"}>Restart now</button></div>`;
}

function wireUpdates() {
  const status = $("#update-status"), notes = $("#update-notes");
  const fail = (e) => { status.className = "error"; status.textContent = e.message; };
  $("#update-check").onclick = async () => {
    status.className = ""; status.textContent = "Checking…";
    try {
      const r = await client.post("/api/admin/update/check");
      status.className = "ok";
      status.textContent = r.update_available ? `SwarmLLM ${r.version} is available (you have ${r.current_version}).`
        : `Up to date: ${r.current_version} is the newest.`;
      notes.textContent = r.changelog || "";
      notes.hidden = !r.changelog;
      $("#update-apply").hidden = !r.update_available;
    } catch (e) { fail(e); }
  };
  $("#update-apply").onclick = async () => {
    if (needKey()) return;
    status.className = ""; status.textContent = "Downloading and checking the signature…";
    try {
      const r = await client.post("/api/admin/update/apply");
      status.className = "ok";
      status.textContent = `SwarmLLM ${r.version} is installed: restart to run it.`;
      $("#update-apply").hidden = true;
      $("#update-restart").hidden = !client.app;
    } catch (e) { fail(e); }
  };
  $("#update-restart").onclick = () => client.app?.restart();
}

async function showClientKeys() {
  const box = $("#client-keys");
  if (!box) return;
  if (!client.key()) { box.innerHTML = `<p class="muted">Needs the API key.</p>`; return; }
  try {
    const r = await client.get("/api/admin/api-keys");
    box.innerHTML = r.keys.length ? `<table><tr><th>Name</th><th>Id</th><th>Created</th><th>Waiting</th><th></th></tr>
      ${r.keys.map((k) => `<tr data-client-key="${esc(k.id)}"><td>${esc(k.name)}</td><td class="mono">${esc(k.id)}</td>
        <td>${esc(new Date(k.created_at * 1000).toLocaleString())}</td><td>${esc(k.waiting)}</td>
        <td><button class="secondary" data-revoke="${esc(k.id)}">Revoke</button></td></tr>`).join("")}</table>`
      : `<p class="muted">None yet.</p>`;
    for (const b of box.querySelectorAll("button[data-revoke]")) {
      b.onclick = async () => {
        try { await client.del(`/api/admin/api-keys/${encodeURIComponent(b.dataset.revoke)}`); toast("Key revoked"); }
        catch (e) { toast(e.message, true); }
        showClientKeys();
      };
    }
  } catch (e) { box.innerHTML = `<p class="error">${esc(e.message)}</p>`; }
}

function wireClientKeys() {
  showClientKeys();
  $("#client-key-create").onclick = async () => {
    if (needKey()) return;
    try {
      const r = await client.post("/api/admin/api-keys", { name: $("#client-key-name").value });
      $("#client-key-value").value = r.key;
      $("#client-key-new").hidden = false;
      $("#client-key-name").value = "";
      showClientKeys();
    } catch (e) { toast(e.message, true); }
  };
  $("#client-key-copy").onclick = async () => { await navigator.clipboard?.writeText($("#client-key-value").value); toast("Copied"); };
}

async function settings() {
  const [config, stats, schedule, defaults, version] = await Promise.all([client.get("/api/admin/config"), client.get("/api/admin/stats"),
    client.get("/api/admin/schedule"), client.get("/api/admin/config/defaults"), client.get("/api/admin/version")]);
  const restart = new Set(defaults.restart_required || []);
  const groups = SETTINGS.map((g, i) => `<fieldset class="settings-group" data-group="${i}"><legend>${esc(g.group)}</legend>
      ${g.fields.map((f) => settingHtml(f, config[f.key], defaults.defaults[f.key], restart.has(f.key))).join("")}
      <div class="row"><button data-save-group="${i}">Save ${esc(g.group.toLowerCase())}</button>
        <span class="muted" id="group-note-${i}" role="status"></span></div></fieldset>`).join("");
  const file = stats.secret_store !== "keychain";
  main().innerHTML = `<h1>Settings</h1>
    ${groups}
    <h2>API key</h2>
    <div class="row"><input id="api-key" class="mono" type="password" size="50" aria-label="API key" value="${esc(client.key())}" ${client.inApp ? "readonly" : ""}>
      <button id="key-reveal" class="secondary">Reveal</button><button id="key-copy" class="secondary">Copy</button>
      ${client.inApp ? "" : `<button id="key-save">Save</button>`}</div>
    <p class="muted">Scripts use it as <code>Authorization: Bearer …</code>. ${client.inApp ? "" : "Print it with <code>swarmllm api-key</code>."}</p>
    <h2>Client keys</h2>
    <p class="muted">Keys for other apps and people: they run models through the OpenAI API and nothing else, and each
      has its own share of the queue, so one busy app cannot hold up another.</p>
    <div id="client-keys"></div>
    <div class="row"><input id="client-key-name" size="30" maxlength="64" placeholder="What it is for" aria-label="New client key's name">
      <button id="client-key-create">Create key</button></div>
    <div class="row" id="client-key-new" hidden><input id="client-key-value" class="mono" size="60" readonly aria-label="The new client key">
      <button id="client-key-copy" class="secondary">Copy</button><span class="muted">Shown this once.</span></div>
    <h2>Secrets</h2>
    <p id="secret-store" class="${file ? "error" : "ok"}">${file
      ? "No OS keychain (Secret Service) was found: the identity and API key are kept in the encrypted file secrets.enc in the data dir."
      : "The identity and API key are kept in the OS keychain."}</p>
    <h2>Contribution schedule</h2>
    <p class="muted">The hours this node serves the swarm, in local time (end exclusive, 0–24). Outside them it serves
      only its own and its pool's requests and fetches no shards. A day left empty has no hours.</p>
    <label class="row"><input type="checkbox" id="schedule-enabled" ${schedule.enabled ? "checked" : ""}> Contribute only in these hours</label>
    <table id="schedule">${DAYS.map((d) => `<tr><td>${DAY_NAMES[d]}</td>
      <td><input id="schedule-${d}" data-day="${d}" size="24" placeholder="e.g. 9-17, 20-24" value="${esc(showHours(schedule.weekdays?.[d]))}"></td></tr>`).join("")}</table>
    <div class="row"><button id="schedule-save">Save schedule</button></div>
    <p class="muted" id="schedule-status">${esc(scheduleStatus(schedule))}</p>
    ${updatesHtml(version)}
    <details id="advanced"><summary>Advanced: every setting as the config file has it</summary>
    <div class="row"><select id="cfg-key" aria-label="Setting">${Object.keys(config).sort().map((k) => `<option>${esc(k)}</option>`).join("")}</select>
      <input id="cfg-value" size="40" aria-label="Value (JSON)"><button id="cfg-save">Set</button></div>
    <p class="muted" id="cfg-note"></p>
    <table>${Object.entries(config).sort().map(([k, v]) => `<tr><td class="mono">${esc(k)}</td><td class="mono">${esc(JSON.stringify(v))}</td></tr>`).join("")}</table></details>`;
  // Each group saves the fields that changed; the node's refusal shows at its field.
  for (const b of main().querySelectorAll("button[data-save-group]")) {
    b.onclick = async () => {
      if (needKey()) return;
      const i = Number(b.dataset.saveGroup);
      const note = $(`#group-note-${i}`);
      const changes = {};
      for (const f of SETTINGS[i].fields) {
        $(`#err-${f.key}`).textContent = "";
        const v = settingValue(f);
        if (JSON.stringify(v) !== JSON.stringify(config[f.key])) changes[f.key] = v;
      }
      if (!Object.keys(changes).length) { note.textContent = "Nothing changed."; return; }
      try {
        const r = await client.put("/api/admin/config", changes);
        // Restart-only fields keep their running value in `r.config` until then.
        Object.assign(config, r.config, changes);
        note.className = "ok";
        note.textContent = (r.restart_required || []).length
          ? `Saved; ${r.restart_required.join(", ")} take${r.restart_required.length === 1 ? "s" : ""} effect after a restart.`
          : "Saved and applied.";
      } catch (e) {
        const field = e.body?.error?.details?.field;
        note.className = "error";
        note.textContent = "Not saved.";
        if (field && $(`#err-${field}`)) $(`#err-${field}`).textContent = e.message;
        else note.textContent = `Not saved: ${e.message}`;
      }
    };
  }
  wireUpdates();
  wireClientKeys();
  $("#key-reveal").onclick = () => { const i = $("#api-key"); i.type = i.type === "password" ? "text" : "password"; };
  $("#key-copy").onclick = async () => { await navigator.clipboard?.writeText($("#api-key").value); toast("Copied"); };
  if ($("#key-save")) $("#key-save").onclick = () => { client.setKey($("#api-key").value); toast("Saved in this browser"); };
  $("#schedule-save").onclick = async () => {
    if (needKey()) return;
    const note = $("#schedule-status");
    try {
      const weekdays = {};
      for (const d of DAYS) {
        const hours = parseHours($(`#schedule-${d}`).value, d);
        if (hours.length) weekdays[d] = hours;
      }
      const saved = await client.put("/api/admin/schedule", { enabled: $("#schedule-enabled").checked, weekdays });
      for (const d of DAYS) $(`#schedule-${d}`).value = showHours(saved.weekdays?.[d]);
      note.className = "ok";
      note.textContent = "Saved. " + scheduleStatus(saved);
    } catch (e) {
      note.className = "error";
      note.textContent = e.message;
    }
  };
  const showValue = () => { $("#cfg-value").value = JSON.stringify(config[$("#cfg-key").value]); };
  $("#cfg-key").onchange = showValue;
  showValue();
  $("#cfg-save").onclick = async () => {
    if (needKey()) return;
    let value;
    try { value = JSON.parse($("#cfg-value").value); } catch { value = $("#cfg-value").value; }
    try {
      const r = await client.put("/api/admin/config", { [$("#cfg-key").value]: value });
      $("#cfg-note").textContent = (r.restart_required || []).length ? "Saved; takes effect after a restart." : "Saved and applied.";
    } catch (e) { $("#cfg-note").textContent = e.message; }
  };
}

// ---- shell -------------------------------------------------------------------------------

// "peers" is the old name of the network page (kept for links people saved).
const pages = { welcome, dashboard, network, peers: network, models, chat, pool, credits, settings };
let cleanup = null;

async function route() {
  const name = (location.hash.match(/^#\/(\w+)/) || [])[1] || "dashboard";
  const page = pages[name] || dashboard;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === name);
  if (typeof cleanup === "function") cleanup();
  cleanup = null;
  try {
    cleanup = await page();
  } catch (e) {
    main().innerHTML = `<h1>${esc(name)}</h1><p class="error" id="page-error">${esc(e.message)}</p>`;
  }
  document.body.dataset.page = name;
}

async function syncPrivateMode() {
  const box = $("#private-mode");
  const show = (on) => { box.checked = on; };
  show((await client.get("/api/pool/private-mode")).enabled);
  client.app?.onPrivateMode((mode) => show(mode.enabled));
  box.onchange = async () => {
    try {
      if (client.app) await client.app.setPrivateMode(box.checked);
      else if (!needKey()) await client.put("/api/pool/private-mode", { enabled: box.checked });
      toast(box.checked ? "Private mode on: prompts stay on your devices" : "Private mode off");
    } catch (e) {
      toast(e.message, true);
      show(!box.checked);
    }
  };
}

window.addEventListener("hashchange", route);
client.init().then(async () => {
  startLive();
  // replaceState: no hashchange, so the page renders once.
  if (!location.hash.startsWith("#/welcome") && await firstRun().catch(() => false)) history.replaceState(null, "", "#/welcome");
  await route();
  await syncPrivateMode().catch(() => {});
  document.body.dataset.ready = "true";
}, (e) => { main().innerHTML = `<p class="error">Cannot reach the node: ${esc(e.message)}</p>`; });
