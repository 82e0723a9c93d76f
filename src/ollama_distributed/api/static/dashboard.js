// ollama-distributed dashboard: polls the server's JSON endpoints and redraws. No framework, no build step.
// Every string from the server is inserted with textContent (model names come from clients).
"use strict";

const POLL_MS = 2000;
const STAGE_COLORS = ["#2f5fd0", "#d2691e", "#2a9d5b", "#8e44ad", "#c0392b", "#16a2b8", "#b58900", "#6c7a89"];
const state = { status: null, ps: null, strategies: null, history: null, events: null, live: null };

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") el.setAttribute("style", v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function fmtBytes(n) {
  if (n === null || n === undefined || isNaN(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0; let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(v >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}
function fmtNum(v, digits = 2) { return (v === null || v === undefined || isNaN(v)) ? "–" : Number(v).toFixed(digits); }
function fmtBw(v) { return !v ? "–" : v >= 1e12 ? `${(v / 1e12).toFixed(2)} TB/s` : `${(v / 1e9).toFixed(1)} GB/s`; }
function fmtFlops(v) { return !v ? "–" : v >= 1e12 ? `${(v / 1e12).toFixed(1)} TFLOP/s` : `${(v / 1e9).toFixed(1)} GFLOP/s`; }
function range(r) { return Array.isArray(r) ? `[${r[0]}, ${r[1]})` : "–"; }
function fmtTime(t) { return t ? new Date(t * 1000).toLocaleTimeString() : ""; }

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

function showError(id, err) {
  const el = document.getElementById(id);
  if (!el) return;
  if (err) { el.hidden = false; el.textContent = String(err.message || err); } else { el.hidden = true; }
}

function replace(id, ...nodes) {
  const el = document.getElementById(id);
  el.replaceChildren(...nodes);
}

// --- nodes -------------------------------------------------------------------------------------------------------
function nodeLabel(n) { return n.name || n.id; }

function shardNodeKey(shard, nodes) {
  // a plan names scheduler nodes ("node-1"); Ray node ids come as node_id. Match either to a status node.
  for (const n of nodes) {
    if (n.name && n.name === shard.node) return nodeLabel(n);
    if (shard.node_id && n.id === shard.node_id) return nodeLabel(n);
    if (n.id === shard.node) return nodeLabel(n);
  }
  return shard.node;
}

function placedBytes(nodes, models) {
  const out = {};
  for (const m of models || []) for (const p of m.plans || []) for (const st of p.stages || [])
    for (const sh of st.shards || []) {
      const k = shardNodeKey(sh, nodes);
      out[k] = (out[k] || 0) + (sh.memory_bytes || 0);
    }
  return out;
}

function renderNodes() {
  const st = state.status;
  if (!st) return;
  const nodes = st.nodes || [];
  document.getElementById("node-count").textContent = nodes.length;
  const cal = (state.strategies && state.strategies.calibration && state.strategies.calibration.nodes) || {};
  const placed = placedBytes(nodes, st.models);
  if (!nodes.length) { replace("nodes", h("p", { class: "empty" }, "no nodes reported")); return; }
  replace("nodes", ...nodes.map((n) => {
    const m = n.measured || {}; const r = n.resources || {};
    const label = nodeLabel(n);
    const dead = n.state && n.state !== "alive";
    const total = r.memory_budget || m.usable_memory || r.memory_bytes || m.memory_total;
    const avail = m.memory_available !== undefined ? m.memory_available : m.memory_available_bytes;
    const used = placed[label] || 0;
    const factor = cal[label] ? cal[label].factor : null;
    return h("div", { class: `node${dead ? " dead" : ""}`, "data-node": label },
      h("div", { class: "node-head" }, h("span", { class: "node-name" }, label),
        h("span", { class: `badge${dead ? " dead" : ""}` }, n.state || "alive")),
      n.name && n.id ? h("div", { class: "node-id", title: "Ray node id" }, n.id) : null,
      h("dl", { class: "kv" },
        h("dt", {}, "address"), h("dd", {}, n.address || "–"),
        h("dt", {}, "memory"), h("dd", {}, `${fmtBytes(total)} budget`, avail !== undefined ? ` · ${fmtBytes(avail)} free` : ""),
        h("dt", {}, "placed"), h("dd", {}, fmtBytes(used),
          total ? h("div", { class: "bar", title: "weights + KV cache placed by plans / budget" },
            h("span", { style: `width:${Math.min(100, (100 * used) / total).toFixed(1)}%` })) : null),
        h("dt", {}, "bandwidth"), h("dd", {}, fmtBw(m.memory_bandwidth)),
        h("dt", {}, "compute"), h("dd", {}, fmtFlops(m.flops)),
        h("dt", {}, "cpus"), h("dd", {}, r.CPU || r.cpu || m.threads || "–"),
        h("dt", {}, "calibration"), h("dd", { class: factor && factor > 1.5 ? "slow" : "" },
          factor ? `× ${factor.toFixed(2)}${factor > 1.5 ? " slower than declared" : ""}` : "–")));
  }));
}

// --- models ------------------------------------------------------------------------------------------------------
function placementGrid(plan, nodes) {
  const stages = plan.stages || [];
  const L = stages.length ? stages[stages.length - 1].layers[1] : 0;
  const rows = [];
  const seen = new Set();
  stages.forEach((s) => s.shards.forEach((sh) => {
    const k = shardNodeKey(sh, nodes);
    if (!seen.has(k)) { seen.add(k); rows.push(k); }
  }));
  const idle = nodes.map(nodeLabel).filter((k) => !seen.has(k));
  const cellOf = {};  // node -> layer -> {stage, shard, frac}
  stages.forEach((s, si) => {
    const totalHeads = Math.max(...s.shards.map((x) => x.heads[1]));
    s.shards.forEach((sh, j) => {
      const k = shardNodeKey(sh, nodes);
      cellOf[k] = cellOf[k] || {};
      for (let l = s.layers[0]; l < s.layers[1]; l++)
        cellOf[k][l] = { si, sh, frac: (sh.heads[1] - sh.heads[0]) / totalHeads, first: si === 0,
          head: si === stages.length - 1 && j === 0 };
    });
  });
  const step = L > 64 ? 8 : L > 24 ? 5 : 1;
  // wide cells for short models, narrow (scrolling) ones for deep models
  const cellStyle = `width:${Math.max(10, Math.min(44, Math.floor(900 / Math.max(1, L))))}px`;
  const header = h("tr", {}, h("th", {}, "node \\ layer"),
    ...Array.from({ length: L }, (_, l) => h("th", {}, l % step === 0 ? l : "")), h("th", {}, ""));
  const body = [...rows, ...idle].map((k) => {
    const cells = cellOf[k] || {};
    const tags = [];
    const any = Object.values(cells)[0];
    if (any && any.first) tags.push(h("span", { class: "tag tag-e", title: "embedding" }, "E"));
    if (Object.values(cells).some((c) => c.head)) tags.push(" ", h("span", { class: "tag tag-h", title: "output head" }, "H"));
    return h("tr", { "data-node": k },
      h("th", { class: "row" }, k, cells && Object.keys(cells).length ? "" : " (idle)"),
      ...Array.from({ length: L }, (_, l) => {
        const c = cells[l];
        if (!c) return h("td", { class: "cell", style: cellStyle, title: `layer ${l}: not on ${k}` });
        const color = STAGE_COLORS[c.si % STAGE_COLORS.length];
        return h("td", { class: "cell", "data-layer": l, "data-stage": c.si, style: cellStyle,
          title: `layer ${l} on ${k} · stage ${c.si} · heads ${range(c.sh.heads)} · kv heads ${range(c.sh.kv_heads)} · ffn ${range(c.sh.ffn)}` +
            (c.sh.experts ? ` · experts ${range(c.sh.experts)}` : "") },
          h("span", { style: `height:${(100 * c.frac).toFixed(0)}%;background:${color}` }));
      }),
      h("td", { class: "tags" }, ...tags));
  });
  return h("div", { class: "grid-wrap" }, h("table", { class: "grid" }, h("thead", {}, header), h("tbody", {}, ...body)));
}

// Which experts of every MoE layer of its stage a shard holds (expert parallelism): a bar over all the experts,
// the held range filled in the stage's colour.
function expertBar(sh, total, color) {
  const [a, b] = sh.experts;
  return h("td", { class: "experts", "data-experts": `${a}-${b}`, title: `experts ${range(sh.experts)} of ${total}` },
    h("span", { style: "display:inline-block;position:relative;width:120px;height:10px;background:#eee;vertical-align:middle;margin-right:6px" },
      h("span", { style: `position:absolute;left:${(100 * a / total).toFixed(1)}%;width:${(100 * (b - a) / total).toFixed(1)}%;height:100%;background:${color}` })),
    `${b - a} experts ${range(sh.experts)}`);
}

function shardTable(plan, nodes) {
  const rows = [];
  const stages = plan.stages || [];
  const moe = stages.some((s) => s.shards.some((sh) => sh.experts));
  const nExpert = Math.max(1, ...stages.flatMap((s) => s.shards.map((sh) => (sh.experts ? sh.experts[1] : 0))));
  stages.forEach((s, si) => s.shards.forEach((sh) => {
    const k = shardNodeKey(sh, nodes);
    const color = STAGE_COLORS[si % STAGE_COLORS.length];
    rows.push(h("tr", { class: "shard-row", "data-node": k, "data-layers": `${s.layers[0]}-${s.layers[1]}` },
      h("td", {}, h("span", { class: "swatch", style: `background:${color}` }), `stage ${si}`),
      h("td", {}, k), h("td", {}, `layers ${range(s.layers)}`), h("td", {}, `heads ${range(sh.heads)}`),
      h("td", {}, `kv ${range(sh.kv_heads)}`), h("td", {}, `ffn ${range(sh.ffn)}`),
      ...(moe ? [sh.experts ? expertBar(sh, nExpert, color) : h("td", {}, "all")] : []),
      h("td", { class: "num" }, fmtBytes(sh.memory_bytes)), h("td", { class: "num" }, sh.pid ? `pid ${sh.pid}` : "")));
  }));
  const cols = ["stage", "node", "layers", "query heads", "KV heads", "FFN columns", ...(moe ? ["experts"] : []),
    "memory", "process"];
  return h("table", { class: "data shards" },
    h("thead", {}, h("tr", {}, ...cols.map((t) => h("th", {}, t)))),
    h("tbody", {}, ...rows));
}

function renderModels() {
  const st = state.status;
  if (!st) return;
  const nodes = st.nodes || [];
  const models = st.models || [];
  const ps = {};
  for (const m of (state.ps && state.ps.models) || []) ps[m.name] = m;
  const live = (state.live && state.live.models) || {};
  document.getElementById("model-count").textContent = models.length;
  if (!models.length) { replace("models", h("p", { class: "empty" }, "no model loaded — run a request to load one")); return; }
  replace("models", ...models.map((m) => {
    const lv = live[m.name] || {}; const eng = m.engine || {}; const p = ps[m.name] || {};
    const plans = m.plans || [];
    return h("div", { class: "model", "data-model": m.name },
      h("div", { class: "model-head" },
        h("span", { class: "model-name" }, m.name),
        ...plans.map((pl) => h("span", { class: "pill" }, `${pl.strategy} · ${(pl.stages || []).length} stage(s)`)),
        h("span", { class: "metric" }, "tokens/s ", h("b", {}, fmtNum(lv.tokens_per_s, 1))),
        h("span", { class: "metric" }, "running ", h("b", {}, eng.running ?? lv.running ?? 0),
          " · waiting ", h("b", {}, eng.waiting ?? lv.waiting ?? 0)),
        h("span", { class: "metric" }, "ms/token measured ", h("b", {}, fmtNum(lv.measured_ms)),
          " · predicted ", h("b", {}, fmtNum(lv.predicted_ms ?? (plans[0] && plans[0].predicted && plans[0].predicted.decode_ms_per_token)))),
        p.size ? h("span", { class: "metric" }, "size ", h("b", {}, fmtBytes(p.size))) : null,
        p.context_length ? h("span", { class: "metric" }, "context ", h("b", {}, p.context_length)) : null),
      lv.pending_replan ? h("div", { class: "section-error" }, `re-plan proposed: ${lv.pending_replan}`) : null,
      ...plans.map((pl, i) => h("div", { class: "replica" },
        plans.length > 1 ? h("h3", {}, `replica ${i + 1}`) : null,
        h("div", { class: "reason" }, `plan ${pl.plan_id || ""}: ${pl.reason || ""}`),
        placementGrid(pl, nodes), shardTable(pl, nodes))));
  }));
}

// --- strategies, calibration -------------------------------------------------------------------------------------
function renderStrategies() {
  const s = state.strategies;
  if (!s) return;
  const rows = Object.entries(s.strategies || {}).map(([name, d]) => {
    const st = d.stats || {};
    return h("tr", { "data-strategy": name },
      h("td", {}, name, d.enabled ? "" : " (off)"),
      h("td", { class: "nowrap" }, h("span", { class: "wbar", style: `width:${Math.round(80 * d.weight)}px` }), fmtNum(d.weight)),
      h("td", { class: "num" }, st.executions), h("td", { class: "num" }, st.failures),
      h("td", { class: "num" }, st.executions ? `${(100 * st.success_rate).toFixed(0)}%` : "–"),
      h("td", { class: "num" }, fmtNum(st.ema_latency_ms)), h("td", { class: "num" }, fmtNum(st.ema_tokens_per_s, 1)),
      h("td", { class: "num" }, st.measured_over_predicted ? `× ${fmtNum(st.measured_over_predicted)}` : "–"));
  });
  replace("strategies", h("table", { class: "data" },
    h("thead", {}, h("tr", {}, ...["strategy", "weight", "runs", "failures", "success", "EMA ms/token", "EMA tokens/s", "measured ÷ predicted"].map((t) => h("th", {}, t)))),
    h("tbody", {}, ...rows)));
  const cal = s.calibration;
  if (!cal || !cal.reports) { replace("calibration", h("p", { class: "empty" }, "no measurements yet")); return; }
  replace("calibration", h("table", { class: "data" },
    h("thead", {}, h("tr", {}, ...["node", "factor", "reports", "bandwidth (declared → calibrated)", "compute (declared → calibrated)"].map((t) => h("th", {}, t)))),
    h("tbody", {}, ...Object.entries(cal.nodes).map(([n, d]) => h("tr", {},
      h("td", {}, n), h("td", { class: `num${d.factor > 1.5 ? " slow" : ""}` }, `× ${d.factor.toFixed(2)}`),
      h("td", { class: "num" }, d.reports),
      h("td", { class: "num" }, `${fmtBw(d.declared_memory_bandwidth)} → ${fmtBw(d.memory_bandwidth)}`),
      h("td", { class: "num" }, `${fmtFlops(d.declared_flops)} → ${fmtFlops(d.flops)}`))))));
}

// --- events ------------------------------------------------------------------------------------------------------
function renderEvents() {
  const ev = (state.events && state.events.events) || [];
  if (!ev.length) { replace("events", h("li", { class: "empty" }, "no events yet")); return; }
  replace("events", ...ev.slice().reverse().map((e) => h("li", { "data-kind": e.kind },
    h("time", {}, fmtTime(e.time)), h("span", { class: `kind kind-${e.kind}` }, e.kind), e.message)));
}

// --- history -----------------------------------------------------------------------------------------------------
function renderHistory() {
  const hist = state.history;
  if (!hist) return;
  const cal = hist.calibration || [];
  const sel = (hist.selections || []).filter((x) => x.measured_ms);
  const points = cal.length ? cal.map((c) => ({ p: c.predicted_before_ms, m: c.measured_ms, label: `#${c.report} ${c.strategy} ${c.plan_id}` }))
    : sel.map((c) => ({ p: c.predicted_ms, m: c.measured_ms, label: `${c.choice} ${c.plan_id}` }));
  if (!points.length) {
    replace("history-chart");
    replace("history", h("p", { class: "empty" }, "no reports yet"));
    return;
  }
  const W = 1000; const H = 170; const pad = 30;
  const max = Math.max(...points.map((x) => Math.max(x.p || 0, x.m || 0))) * 1.1 || 1;
  const xs = (i) => pad + (points.length === 1 ? 0 : (i * (W - 2 * pad)) / (points.length - 1));
  const ys = (v) => H - pad / 2 - ((v || 0) / max) * (H - pad);
  const line = (key, color) => {
    const pl = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    pl.setAttribute("points", points.map((x, i) => `${xs(i).toFixed(1)},${ys(x[key]).toFixed(1)}`).join(" "));
    pl.setAttribute("fill", "none"); pl.setAttribute("stroke", color); pl.setAttribute("stroke-width", "2.5");
    return pl;
  };
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("preserveAspectRatio", "none");
  const axis = document.createElementNS("http://www.w3.org/2000/svg", "text");
  axis.setAttribute("x", "2"); axis.setAttribute("y", "12"); axis.setAttribute("font-size", "12"); axis.setAttribute("fill", "#5d6677");
  axis.textContent = `${max.toFixed(2)} ms`;
  svg.append(axis, line("m", "#c62f2f"), line("p", "#2f5fd0"));
  replace("history-chart", svg, h("div", { class: "legend" },
    h("span", { class: "swatch", style: "background:#2f5fd0" }), "predicted ms/token (calibrated cost model)  ",
    h("span", { class: "swatch", style: "background:#c62f2f" }), "measured ms/token"));
  const last = points.slice(-10).reverse();
  replace("history", h("table", { class: "data" },
    h("thead", {}, h("tr", {}, ...["report", "predicted ms/token", "measured ms/token", "error"].map((t) => h("th", {}, t)))),
    h("tbody", {}, ...last.map((x) => h("tr", {}, h("td", {}, x.label), h("td", { class: "num" }, fmtNum(x.p, 3)),
      h("td", { class: "num" }, fmtNum(x.m, 3)),
      h("td", { class: "num" }, x.p && x.m ? `${(100 * (x.p - x.m) / x.m).toFixed(0)}%` : "–"))))));
}

// --- weight transfers (nodes fetching slices of a model file they lack) ----------------------------------------------
function renderTransfers() {
  const rows = (state.status && state.status.weight_transfers) || [];
  // what each plan said its nodes would fetch when it was made (scheduler/load_cost.py), for nodes without the file
  const planned = [];
  for (const m of (state.status && state.status.models) || []) {
    for (const p of m.plans || []) {
      for (const l of p.load || []) { if (l.holds !== "file") planned.push({ model: m.name, ...l }); }
    }
  }
  const plannedTable = planned.length ? h("table", { class: "data", id: "planned-load" },
    h("thead", {}, h("tr", {}, ...["node", "model", "held before the load", "planned fetch", "estimated"].map((t) => h("th", {}, t)))),
    h("tbody", {}, ...planned.map((l) => h("tr", {}, h("td", {}, l.node), h("td", {}, l.model),
      h("td", {}, l.holds === "slice" ? "part of its slice (cached)" : "nothing"),
      h("td", { class: "num" }, fmtBytes(l.fetch_bytes)), h("td", { class: "num" }, `${fmtNum(l.fetch_s, 1)} s`))))) : null;
  if (!rows.length) {
    replace("transfers", h("div", {}, h("p", { class: "empty" }, "no node has needed to fetch weights"),
      ...(plannedTable ? [plannedTable] : [])));
    return;
  }
  replace("transfers", h("div", {}, ...(plannedTable ? [plannedTable] : []), h("table", { class: "data" },
    h("thead", {}, h("tr", {}, ...["node", "model file", "fetched", "of", "rate", "ETA", "state"].map((t) => h("th", {}, t)))),
    h("tbody", {}, ...rows.map((r) => h("tr", { "data-state": r.state },
      h("td", {}, r.node), h("td", {}, r.model), h("td", { class: "num" }, fmtBytes(r.bytes_done)),
      h("td", { class: "num" }, fmtBytes(r.bytes_total)),
      h("td", { class: "num" }, r.bytes_per_s ? `${(r.bytes_per_s / 1e6).toFixed(0)} MB/s` : "–"),
      h("td", { class: "num" }, r.state === "fetching" ? `${fmtNum(r.eta_s, 0)} s` : "–"), h("td", {}, r.state)))))));
}

// --- polling -----------------------------------------------------------------------------------------------------
const SOURCES = [
  ["status", "/api/distributed/status", "nodes-error"],
  ["ps", "/api/ps", "models-error"],
  ["strategies", "/api/distributed/strategies", "strategies-error"],
  ["history", "/api/distributed/history?limit=200", "history-error"],
  ["events", "/api/distributed/events?limit=50", "events-error"],
  ["live", "/api/distributed/live", null],
];

async function poll() {
  const results = await Promise.allSettled(SOURCES.map(([, url]) => getJSON(url)));
  let failed = 0;
  results.forEach((r, i) => {
    const [key, , errId] = SOURCES[i];
    if (r.status === "fulfilled") { state[key] = r.value; if (errId) showError(errId, null); }
    else { failed++; if (errId) showError(errId, r.reason); }
  });
  const render = [renderNodes, renderModels, renderTransfers, renderStrategies, renderEvents, renderHistory];
  for (const fn of render) {
    try { fn(); } catch (e) { console.error(fn.name, e); }
  }
  const tps = state.live ? state.live.tokens_per_s : null;
  document.getElementById("total-tps").textContent = fmtNum(tps, 1);
  const conn = document.getElementById("conn");
  conn.className = `conn ${failed === SOURCES.length ? "conn-bad" : "conn-ok"}`;
  conn.textContent = failed === SOURCES.length ? "server unreachable" : `updated ${new Date().toLocaleTimeString()}`;
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
}

document.getElementById("interval").textContent = String(POLL_MS / 1000);
poll();
setInterval(poll, POLL_MS);
