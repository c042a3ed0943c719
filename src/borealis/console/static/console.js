// The Borealis console: reads the console's JSON every 5 s and draws the chosen cluster
// (topology, charts, endpoints, events, top SQL). Data goes into the page as text only.
"use strict";

const REFRESH_MS = 5000;
const CHARTED = ["AuroraReplicaLag", "CommitLatency", "CommitThroughput",
                 "DatabaseConnections", "CPUUtilization", "ServerlessDatabaseCapacity"];
const COLORS = ["#f0b429", "#4fb3d9", "#3fb950", "#d2a8ff", "#ff7b72", "#79c0ff"];
const charts = {};
let current = null;
let refreshes = 0;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

async function getJson(path) {
  const answer = await fetch(path, {credentials: "same-origin"});
  if (answer.status === 401) { window.location.reload(); return null; }
  if (!answer.ok) throw new Error(`${path}: ${answer.status}`);
  return answer.json();
}

async function post(verb) {
  const result = document.getElementById("action-result");
  result.textContent = "…";
  const answer = await fetch(`/console/api/clusters/${encodeURIComponent(current)}/${verb}`, {
    method: "POST", credentials: "same-origin", headers: {"X-Borealis-Console": "1"}});
  const body = await answer.json().catch(() => ({}));
  result.textContent = answer.ok ? body.done : (body.error || `failed (${answer.status})`);
  refresh();
}

function drawClusters(clusters) {
  const nav = document.getElementById("clusters");
  nav.replaceChildren();
  if (!current && clusters.length) current = clusters[0].name;
  for (const c of clusters) {
    const b = el("button", c.name, c.name === current ? "current" : "");
    b.type = "button";
    b.addEventListener("click", () => { current = c.name; refresh(); });
    nav.append(b);
  }
}

function drawTopology(c) {
  document.getElementById("cluster-name").textContent = c.name;
  document.getElementById("cluster-state").textContent =
    `${c.status} · epoch ${c.epoch} · volume durable LSN ${c.vdl || "—"}`;
  const cards = document.getElementById("instances");
  cards.replaceChildren();
  for (const i of c.instances) {
    const up = i.state === "available";
    const card = el("div", null, `card ${i.role}${up ? "" : " down"}`);
    card.dataset.instance = i.id;
    card.append(el("div", i.role, "role"), el("strong", i.id),
                el("div", `${i.az} · ${i.host} · ${i.state}`),
                el("div", i.role === "reader" ? `lag ${i.lag_ms ?? "—"} ms` : `LSN ${i.replay_lsn || "—"}`));
    cards.append(card);
  }
  const azs = document.getElementById("storage");
  azs.replaceChildren();
  const byAz = {};
  for (const n of c.storage_nodes) (byAz[n.az] = byAz[n.az] || []).push(n);
  for (const az of Object.keys(byAz).sort()) {
    const box = el("div", null, "az");
    box.append(el("h3", az));
    for (const n of byAz[az]) {
      const line = el("div", `${n.id} ${n.state} flush ${n.flush_lsn || "—"}`,
                      `node ${n.state === "serving" ? "serving" : "other"}`);
      line.dataset.node = n.id;
      box.append(line);
    }
    azs.append(box);
  }
}

function drawEndpoints(c) {
  const body = document.querySelector("#endpoints tbody");
  body.replaceChildren();
  for (const e of c.endpoints) {
    const row = el("tr");
    const address = e.hosts && e.hosts.length ? `${e.hosts.join(",")}:${e.host_port}`
                                              : `${e.host}:${e.port}`;
    for (const v of [e.name, e.type, address, e.members.join(" "), e.metrics.active,
                     e.metrics.total]) row.append(el("td", v));
    body.append(row);
  }
}

function drawChart(metric, series) {
  const canvas = document.getElementById(`chart-${metric}`);
  if (!canvas || typeof Chart === "undefined") return;
  const times = [...new Set(series.flatMap(s => s.t))].sort((a, b) => a - b);
  const labels = times.map(t => new Date(t * 1000).toLocaleTimeString());
  const datasets = series.map((s, k) => {
    const at = new Map(s.t.map((t, j) => [t, s.v[j]]));
    return {label: s.label, data: times.map(t => at.has(t) ? at.get(t) : null),
            borderColor: COLORS[k % COLORS.length], backgroundColor: COLORS[k % COLORS.length],
            pointRadius: 0, borderWidth: 1.5, spanGaps: true, tension: 0.2};
  });
  let chart = charts[metric];
  if (!chart) {
    chart = charts[metric] = new Chart(canvas, {
      type: "line", data: {labels, datasets},
      options: {animation: false, responsive: true, maintainAspectRatio: false,
                scales: {x: {ticks: {color: "#8b98a5", maxTicksLimit: 6}},
                         y: {beginAtZero: true, ticks: {color: "#8b98a5"}}},
                plugins: {legend: {labels: {color: "#e6edf3", boxWidth: 10}}}}});
  } else {
    chart.data.labels = labels;
    chart.data.datasets = datasets;
    chart.update("none");
  }
  canvas.dataset.points = String(datasets.reduce((n, d) => n + d.data.filter(v => v !== null).length, 0));
  // The largest newest value of the series (what a test, or a glance, reads).
  const newest = datasets.map(d => d.data.filter(v => v !== null).slice(-1)[0])
                         .filter(v => v !== undefined);
  canvas.dataset.last = newest.length ? String(Math.max(...newest)) : "";
}

function drawEvents(events) {
  const list = document.getElementById("events");
  list.replaceChildren();
  for (const e of events.slice().reverse()) {
    list.append(el("li", `${new Date(e.time * 1000).toLocaleTimeString()} ${e.source}: ${e.message}`));
  }
}

function drawTop(instances) {
  const box = document.getElementById("top");
  box.replaceChildren();
  for (const i of instances) {
    box.append(el("h3", `${i.instance} (${i.role})`));
    if (i.error) box.append(el("p", i.error));
    const table = el("table");
    const head = el("tr");
    for (const h of ["total ms", "calls", "statement"]) head.append(el("th", h));
    table.append(head);
    for (const s of i.statements.slice(0, 5)) {
      const row = el("tr");
      row.append(el("td", s.total_ms.toFixed(1)), el("td", s.calls),
                 el("td", s.query.replace(/\s+/g, " ").slice(0, 160)));
      table.append(row);
    }
    box.append(table);
  }
}

async function refresh() {
  const listing = await getJson("/console/api/clusters");
  if (!listing) return;
  drawClusters(listing.clusters);
  const c = listing.clusters.find(x => x.name === current);
  if (!c) return;
  drawTopology(c);
  drawEndpoints(c);
  const name = encodeURIComponent(current);
  const [metrics, events] = await Promise.all([
    getJson(`/console/api/clusters/${name}/metrics?minutes=15`),
    getJson(`/console/api/clusters/${name}/events`)]);
  for (const metric of CHARTED) drawChart(metric, metrics.series[metric] || []);
  drawEvents(events.events);
  if (refreshes % 3 === 0) drawTop((await getJson(`/console/api/clusters/${name}/top`)).instances);
  refreshes += 1;
  document.body.dataset.refreshes = String(refreshes);
}

window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("do-failover").addEventListener("click", () => post("failover"));
  document.getElementById("do-reader").addEventListener("click", () => post("readers"));
  document.getElementById("do-snapshot").addEventListener("click", () => post("snapshots"));
  refresh();
  setInterval(() => refresh().catch(err => console.warn(err)), REFRESH_MS);
});
