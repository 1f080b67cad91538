// bprr operator dashboard: polls the coordinator's public GET routes every 2 s and redraws.
// No framework, no build step. Every value from the API is inserted as text, never as HTML.
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function fmt(value, digits = 1) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (response.status === 404 || response.status === 409) return null;
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function serverState(server) {
  return server.lease === "expired" ? "expired" : server.state;
}

function renderCards(overview, model, placement) {
  $("model").replaceChildren();
  if (model) {
    $("model").append(
      el("b", {}, model.name), ` · ${model.num_blocks} blocks · ${fmt(model.block_memory_gb, 2)} GB/block` +
        ` · ≤ ${model.max_input_tokens} in / ${model.max_output_tokens} out tokens`);
  } else {
    $("model").textContent = "no model yet (PUT /v1/model or POST /v1/scenario)";
  }
  if (placement) {
    $("generation").textContent = placement.generation;
    $("algorithm").textContent =
      `${placement.algorithm} · |R| = ${placement.concurrency} · ${placement.status} · ` +
      `${fmt(placement.solve_seconds, 2)} s`;
    $("objective").textContent = fmt(placement.objective_ms_per_token, 1);
    const bound = placement.bound_ms_per_token;
    $("bound").textContent = "model prediction, not measured · " +
      (bound === null ? "no bound" : `bound ${fmt(bound, 1)} ms`);
  } else {
    $("generation").textContent = "0";
    $("algorithm").textContent = "no placement published";
    $("objective").textContent = "–";
    $("bound").textContent = "–";
  }
  $("coverage").textContent = `${Math.round(overview.coverage * 100)}%`;
  $("servers-live").textContent =
    `${overview.live_servers} live · ${overview.routable_servers} routable servers`;
  $("sessions").textContent = overview.active_sessions;
  $("slots").textContent = `${overview.reserved_slots} cache units reserved`;
  $("bookings").textContent = `${overview.sessions_booked} / ${overview.sessions_rejected}`;
}

function renderSites(overview, servers) {
  const root = $("sites");
  root.replaceChildren();
  const sites = overview.sites;
  if (!sites.length) {
    root.append(svg("text", { x: 20, y: 30, class: "muted" }, "no sites yet"));
    return;
  }
  // Sites as boxes on an ellipse, their servers inside as chips (two columns), RTT lines between.
  const W = 560, H = 380, boxW = 170, chipH = 17, cols = 2;
  const height = (site) => 44 + chipH * Math.max(1, Math.ceil(site.servers.length / cols));
  const rx = sites.length > 1 ? (W - boxW) / 2 - 10 : 0;
  const ry = sites.length > 1 ? (H - 150) / 2 : 0;
  const pos = new Map();
  sites.forEach((site, i) => {
    const angle = -Math.PI / 2 + (2 * Math.PI * i) / sites.length;
    pos.set(site.name, [W / 2 + rx * Math.cos(angle), H / 2 + 4 + ry * Math.sin(angle)]);
  });
  for (const link of overview.site_rtts) {
    const [x1, y1] = pos.get(link.a), [x2, y2] = pos.get(link.b);
    root.append(svg("line", {
      x1, y1, x2, y2, class: `rtt-line${link.measured ? "" : " default"}`,
      "data-a": link.a, "data-b": link.b,
    }));
  }
  const byId = new Map(servers.map((s) => [s.id, s]));
  for (const site of sites) {
    const [cx, cy] = pos.get(site.name);
    const h = height(site), x = cx - boxW / 2, y = cy - h / 2;
    const group = svg("g", { class: "site", "data-site": site.name });
    group.append(svg("rect", {
      x, y, width: boxW, height: h, rx: 8,
      class: `site-box${site.client_share > 0 ? " clients" : ""}`,
    }));
    group.append(svg("text", { x: x + 10, y: y + 17, "font-weight": 600 }, site.name));
    group.append(svg("text", { x: x + boxW - 10, y: y + 17, "text-anchor": "end", class: "muted" },
      `${fmt(site.internal_rtt_ms, 0)} ms inside`));
    const clients = site.client_share > 0 ? ` · clients ${Math.round(site.client_share * 100)}%` : "";
    group.append(svg("text", { x: x + 10, y: y + 32, class: site.client_share > 0 ? "client-text" : "muted" },
      `${site.servers.length} server${site.servers.length === 1 ? "" : "s"}${clients}`));
    site.servers.forEach((id, i) => {
      const server = byId.get(id);
      const state = server ? serverState(server) : "expired";
      const chipX = x + 14 + (i % cols) * (boxW / cols - 4), chipY = y + 46 + Math.floor(i / cols) * chipH;
      group.append(svg("circle", { cx: chipX, cy: chipY - 4, r: 4.5, class: `dot ${state}` }));
      group.append(svg("text", { x: chipX + 9, y: chipY, "font-size": 11 }, id));
    });
    root.append(group);
  }
  for (const link of overview.site_rtts) {  // labels last, above the boxes' edges
    const [x1, y1] = pos.get(link.a), [x2, y2] = pos.get(link.b);
    const mx = (x1 + x2) / 2, my = (y1 + y2) / 2;
    root.append(svg("rect", { x: mx - 28, y: my - 10, width: 56, height: 18, rx: 4, class: "rtt-box" }));
    root.append(svg("text", { x: mx, y: my + 3, "text-anchor": "middle", class: "rtt-label" },
      `${fmt(link.rtt_ms, 0)} ms`));
  }
}

function renderBlocks(overview, servers, placement) {
  const root = $("blocks");
  root.replaceChildren();
  const L = overview.num_blocks || 0;
  const labelW = 90, rowH = 18, top = 34, W = 760, plotW = W - labelW - 16;
  const H = top + rowH * Math.max(1, servers.length) + 26;
  root.setAttribute("viewBox", `0 0 ${W} ${H}`);
  if (!L) {
    root.append(svg("text", { x: 10, y: 24, class: "muted" }, "no model yet"));
    return;
  }
  const bx = (block) => labelW + (plotW * block) / L;
  const marks = overview.bottleneck ? overview.bottleneck.blocks : [];
  // Live coverage strip: how many routable servers hold each block (red: none).
  const maxCount = Math.max(1, ...overview.block_servers);
  root.append(svg("text", { x: 0, y: 16, class: "muted" }, "live copies"));
  overview.block_servers.forEach((count, block) => {
    const shade = count === 0 ? "#ff6b6b" : `rgba(60, 207, 145, ${0.25 + 0.75 * (count / maxCount)})`;
    const cell = svg("rect", { x: bx(block), y: 6, width: Math.max(1, bx(block + 1) - bx(block) - 0.5),
      height: 14, fill: shade, class: "cover", "data-block": block, "data-count": count });
    cell.append(svg("title", {}, `block ${block}: ${count} live server(s)`));
    root.append(cell);
  });
  for (const [start, end] of marks) {  // the bottleneck blocks, outlined
    root.append(svg("rect", { x: bx(start) - 1, y: 4, width: bx(end) - bx(start) + 1.5, height: 18,
      rx: 2, class: "cover-mark", "data-start": start, "data-end": end }));
  }
  const step = L > 40 ? 10 : 5;
  for (let block = 0; block <= L; block += step) {
    root.append(svg("line", { x1: bx(block), x2: bx(block), y1: top - 4, y2: H - 20, class: "grid-line" }));
    root.append(svg("text", { x: bx(block), y: H - 6, "text-anchor": "middle", class: "muted" }, block));
  }
  const assigned = new Map((placement ? placement.spans : []).map((s) => [s.server_id, s]));
  servers.forEach((server, i) => {
    const y = top + i * rowH;
    const state = serverState(server);
    root.append(svg("text", { x: 0, y: y + 12 }, server.id));
    const loaded = server.loaded_span;
    if (loaded) {
      const bar = svg("rect", { x: bx(loaded.start), y: y + 2, width: bx(loaded.end) - bx(loaded.start),
        height: rowH - 5, rx: 2, class: `span loaded ${state}`, "data-server": server.id,
        "data-start": loaded.start, "data-end": loaded.end });
      bar.append(svg("title", {}, `${server.id} loaded [${loaded.start}, ${loaded.end}) · ${state}`));
      root.append(bar);
    }
    const span = server.assigned_span || assigned.get(server.id);
    if (span) {
      root.append(svg("rect", { x: bx(span.start), y: y + 1, width: bx(span.end) - bx(span.start),
        height: rowH - 3, rx: 2, class: "span assigned", "data-server": server.id,
        "data-start": span.start, "data-end": span.end }));
    }
  });
}

function renderServers(servers, model) {
  const body = $("servers").tBodies[0];
  body.replaceChildren();
  // One cache unit is the attention cache of one token on one block (token-granular units).
  const unitGb = model ? model.kv_bytes_per_token_per_block / 1e9 : 0;
  for (const server of servers) {
    const state = serverState(server);
    const loaded = server.loaded_span, assigned = server.assigned_span;
    const spanText = loaded ? `[${loaded.start}, ${loaded.end})` : "–";
    const spanCell = el("td", {}, spanText);
    if (assigned && (!loaded || loaded.start !== assigned.start || loaded.end !== assigned.end)) {
      spanCell.append(el("span", { class: "mismatch" }, ` → [${assigned.start}, ${assigned.end})`));
    }
    const span = assigned || loaded;
    const weights = model && span ? (span.end - span.start) * model.block_memory_gb : 0;
    const inUse = server.reserved_slots * unitGb;
    const weightPct = Math.min(100, (100 * weights) / server.memory_gb);
    const usePct = Math.min(100 - weightPct, (100 * inUse) / server.memory_gb);
    const cachePct = server.cache_slots ? Math.min(100, (100 * server.reserved_slots) / server.cache_slots) : 0;
    body.append(el("tr", { "data-server": server.id },
      el("td", {}, server.id),
      el("td", {}, server.site),
      el("td", {}, server.gpu || "–"),
      el("td", {}, el("span", { class: `pill ${state}` }, state)),
      spanCell,
      el("td", { title: `weights ${fmt(weights)} GB, cache in use ${fmt(inUse, 2)} GB` },
        el("span", { class: "meter mem" },
          el("i", { style: `width:${weightPct.toFixed(1)}%` }),
          el("i", { class: "use", style: `left:${weightPct.toFixed(1)}%;width:${usePct.toFixed(1)}%` })),
        el("span", { class: "meter-label" }, `${fmt(weights + inUse)} / ${fmt(server.memory_gb)} GB`)),
      el("td", { class: "cache" },
        el("span", { class: "meter" }, el("i", { style: `width:${cachePct.toFixed(1)}%` })),
        el("span", { class: "meter-label" }, `${server.reserved_slots} / ${server.cache_slots}`)),
      el("td", {}, server.lease === "live" ? `${fmt(server.lease_expires_in_s, 0)} s` : "expired"),
    ));
  }
  if (!servers.length) body.append(el("tr", {}, el("td", { colspan: 8 }, "no servers registered")));
}

function renderRoutes(recent) {
  const body = $("routes").tBodies[0];
  body.replaceChildren();
  for (const item of recent) {
    const time = new Date(item.at * 1000).toLocaleTimeString();
    const path = item.hops.length
      ? item.hops.map((h) => `${h.server_id}[${h.start}:${h.end}]`).join(" → ")
      : item.detail;
    body.append(el("tr", { "data-kind": item.kind },
      el("td", {}, time),
      el("td", {}, el("span", { class: `pill ${item.kind}` }, item.kind)),
      el("td", {}, item.client_site),
      el("td", { class: "path" }, path),
      el("td", {}, item.first_token_ms === null ? "–" : `${fmt(item.first_token_ms, 0)} ms`),
      el("td", {}, item.per_token_ms === null ? "–" : `${fmt(item.per_token_ms, 1)} ms`),
      el("td", {}, item.wait_ms === null ? "–" : `${fmt(item.wait_ms / 1000, 1)} s`),
    ));
  }
  if (!recent.length) body.append(el("tr", {}, el("td", { colspan: 7 }, "no routes yet")));
  const waits = recent.filter((r) => r.kind === "rejected");
  $("waiting").textContent = waits.length
    ? `${waits.length} of the last ${recent.length} decisions refused`
    : "no recent refusals";
}

function renderBottleneck(overview) {
  const panel = $("bottleneck-panel"), neck = overview.bottleneck;
  panel.className = "bottleneck";
  if (!neck) {
    $("bottleneck").textContent = "no model yet";
  } else {
    $("bottleneck").textContent = neck.text;
    if (neck.live_copies > 1 && (neck.cache_used === null || neck.cache_used < 0.8)) {
      panel.className = "bottleneck clear";
    }
  }
  panel.dataset.copies = neck ? neck.live_copies : "";
}

// --- charts (uPlot, shipped with the page) ----------------------------------------------------

const charts = new Map();  // element id -> { plot, replans }
const REPLAN_COLOR = "#ffa94d";

function replanHook(state) {
  // Re-plans as dashed vertical lines, labelled "gen N" (and the reason when recorded);
  // labels are staggered so that close re-plans stay readable, and kept inside the plot.
  return (u) => {
    const { ctx } = u, { left, top, width, height } = u.bbox, px = devicePixelRatio;
    ctx.save();
    ctx.strokeStyle = REPLAN_COLOR;
    ctx.fillStyle = REPLAN_COLOR;
    ctx.setLineDash([5 * px, 4 * px]);
    ctx.lineWidth = 1.5 * px;
    ctx.font = `${11 * px}px system-ui, sans-serif`;
    state.replans.forEach((mark, i) => {
      const x = u.valToPos(mark.at, "x", true);
      if (x < left || x > left + width) return;
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, top + height);
      ctx.stroke();
      const label = mark.reason === "not recorded" ? `gen ${mark.generation}`
        : `gen ${mark.generation}: ${mark.reason}`;
      const textWidth = ctx.measureText(label).width;
      const tx = x + 4 * px + textWidth > left + width ? x - 4 * px - textWidth : x + 4 * px;
      ctx.fillText(label, Math.max(left, tx), top + (12 + 13 * (i % 3)) * px);
    });
    ctx.restore();
  };
}

function drawChart(id, series, data, replans, empty, allZero = empty) {
  // ``empty``: the note when no series has a value; ``allZero``: when every value is 0.
  const target = $(id);
  const values = data.slice(1).flat().filter((y) => y !== null);
  $(`${id}-note`).textContent = !values.length ? empty : values.every((y) => y === 0) ? allZero : "";
  target.dataset.points = data[0].length;
  target.dataset.replans = replans.length;
  let entry = charts.get(id);
  if (!entry) {
    target.replaceChildren();
    const state = { replans };
    const axis = { stroke: "#8d99b0", grid: { stroke: "#2a3448", width: 1 }, ticks: { stroke: "#2a3448" } };
    const plot = new uPlot({
      width: Math.max(240, target.clientWidth),
      height: 190,
      series: [{}, ...series.map((s) => ({ ...s, width: 1.5, points: { show: false } }))],
      axes: [axis, { ...axis, size: 44 }],
      scales: { x: { time: true } },
      legend: { live: false },
      hooks: { draw: [replanHook(state)] },
    }, data, target);
    entry = { plot, state };
    charts.set(id, entry);
  } else {
    entry.state.replans = replans;
    entry.plot.setData(data);
  }
}

function renderHistory(history) {
  document.querySelectorAll(".interval").forEach((node) => { node.textContent = history.interval_s; });
  const points = history.points, replans = history.replans;
  const xs = points.map((p) => p.at);
  const pick = (key) => points.map((p) => p[key]);
  drawChart("chart-sessions", [
    { label: "active sessions", stroke: "#5aa9ff" },
    { label: "queue depth", stroke: "#ffd166" },
  ], [xs, pick("active_sessions"), pick("queue_depth")], replans,
  "no session and no queue in this window");
  drawChart("chart-bookings", [
    { label: "booked", stroke: "#3ccf91", paths: uPlot.paths.stepped({ align: 1 }) },
    { label: "refused", stroke: "#ff6b6b", paths: uPlot.paths.stepped({ align: 1 }) },
  ], [xs, pick("booked"), pick("refused")], replans, "no booking decision in this window");
  drawChart("chart-waits", [
    { label: "mean queue wait (s)", stroke: "#b384f5", spanGaps: false },
  ], [xs, pick("mean_wait_s")], replans, "no booking ended in this window",
  "no booking waited in the queue in this window");

  const gens = $("generations").tBodies[0];
  gens.replaceChildren();
  for (const g of history.generations.slice().reverse()) {
    const measured = g.measured_ms_per_token;
    gens.append(el("tr", { "data-generation": g.generation },
      el("td", {}, g.generation),
      el("td", {}, g.predicted_ms_per_token === null ? "–" : `${fmt(g.predicted_ms_per_token, 1)} (predicted)`),
      measured === null
        ? el("td", { class: "measured-none" }, "not measured yet")
        : el("td", {}, `${fmt(measured, 1)} (measured)`),
    ));
  }
  if (!history.generations.length) gens.append(el("tr", {}, el("td", { colspan: 3 }, "no placement yet")));
  const marks = $("replans").tBodies[0];
  marks.replaceChildren();
  for (const mark of replans.slice().reverse()) {
    marks.append(el("tr", { "data-generation": mark.generation },
      el("td", {}, new Date(mark.at * 1000).toLocaleTimeString()),
      el("td", {}, mark.generation),
      el("td", {}, mark.reason),
    ));
  }
  if (!replans.length) marks.append(el("tr", {}, el("td", { colspan: 3 }, "no re-plan in this window")));
}

async function refresh() {
  try {
    const [overview, servers, model, placement, recent, history] = await Promise.all([
      getJSON("/v1/overview"),
      getJSON("/v1/servers"),
      getJSON("/v1/model"),
      getJSON("/v1/placements/current"),
      getJSON("/v1/routes/recent?limit=25"),
      getJSON("/v1/history?limit=900"),
    ]);
    renderCards(overview, model, placement);
    renderBottleneck(overview);
    renderHistory(history);
    renderSites(overview, servers);
    renderBlocks(overview, servers, placement);
    renderServers(servers, model);
    renderRoutes(recent || []);
    $("status").className = "status ok";
    $("status").textContent = `live · updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = "true";
  } catch (error) {
    $("status").className = "status stale";
    $("status").textContent = `stale: ${error.message}`;
  }
}

refresh();
setInterval(refresh, POLL_MS);
window.addEventListener("resize", () => {
  for (const [id, entry] of charts) {
    entry.plot.setSize({ width: Math.max(240, $(id).clientWidth), height: 190 });
  }
});
