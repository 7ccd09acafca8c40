// Relay's run dashboard: one server-sent event per poll of the buffer. The first event
// carries the learner's whole history, later ones only the steps that are new.
"use strict";

const MAX_POINTS = 5000;
const COLORS = {
  blue: "#2f6fde", orange: "#e8833a", green: "#2e9e5b", red: "#c0392b",
  purple: "#7b52c7", grey: "#8a93a6",
};
const state = { history: [], series: [], charts: {}, last: null };
window.relayDashboard = state;  // for tests and for poking at in the console

Chart.defaults.animation = false;
Chart.defaults.maintainAspectRatio = false;
Chart.defaults.elements.point.radius = 0;
Chart.defaults.elements.line.borderWidth = 1.5;
Chart.defaults.plugins.legend.labels.boxWidth = 12;

function line(id, datasets, { x = "step", y = {}, y1 = null } = {}) {
  const scales = { x: { type: "linear", title: { display: true, text: x } }, y };
  if (y1) scales.y1 = { position: "right", grid: { drawOnChartArea: false }, ...y1 };
  return new Chart(document.getElementById(id), {
    type: "line",
    data: { datasets: datasets.map(d => ({ data: [], borderColor: d.color,
      backgroundColor: d.color, fill: false, ...d })) },
    options: { parsing: false, normalized: true, scales, interaction: { mode: "nearest",
      intersect: false, axis: "x" } },
  });
}

function histogram(id, label, color) {
  return new Chart(document.getElementById(id), {
    type: "bar",
    data: { labels: [], datasets: [{ label, data: [], backgroundColor: color }] },
    options: { scales: { x: { title: { display: true, text: "staleness (versions)" } },
      y: { beginAtZero: true, title: { display: true, text: "groups" } } },
      plugins: { legend: { display: false } } },
  });
}

function makeCharts() {
  state.charts.staleness = histogram("chart-staleness", "in the buffer", COLORS.blue);
  state.charts.sampledStaleness = histogram("chart-sampled-staleness", "trained on", COLORS.orange);
  // Claimed groups (trained, held until the learner's next checkpoint) can outnumber the
  // rest a hundredfold: they get the right-hand axis.
  state.charts.depth = line("chart-depth", [
    { label: "ready", color: COLORS.blue },
    { label: "being generated", color: COLORS.green },
    { label: "claimed (right axis)", color: COLORS.orange, yAxisID: "y1", borderDash: [4, 3] },
  ], { x: "seconds", y: { beginAtZero: true, title: { display: true, text: "groups" } },
       y1: { beginAtZero: true, title: { display: true, text: "claimed groups" } } });
  state.charts.time = line("chart-time", [
    { label: "waiting", color: COLORS.red, fill: "origin", backgroundColor: "rgba(192,57,43,0.35)" },
    { label: "forward/backward", color: COLORS.blue, fill: "-1",
      backgroundColor: "rgba(47,111,222,0.35)" },
    { label: "publishing", color: COLORS.purple, fill: "-1",
      backgroundColor: "rgba(123,82,199,0.35)" },
  ], { y: { stacked: true, beginAtZero: true, title: { display: true, text: "seconds" } } });
  state.charts.reward = line("chart-reward", [
    { label: "reward (batch mean)", color: COLORS.blue },
    { label: "held-out accuracy", color: COLORS.green, borderWidth: 2.5, pointRadius: 3 },
  ], { y: { beginAtZero: true } });
  state.charts.is = line("chart-is", [
    { label: "mean", color: COLORS.blue },
    { label: "max", color: COLORS.red, yAxisID: "y1" },
    { label: "ESS", color: COLORS.green },
    { label: "clip fraction", color: COLORS.orange },
  ], { y: { beginAtZero: true }, y1: { beginAtZero: true, title: { display: true, text: "max" } } });
}

const fmt = {
  int: v => (v === null || v === undefined) ? "–" : Math.round(v).toLocaleString("en"),
  num: (v, d = 2) => (v === null || v === undefined) ? "–" : Number(v).toFixed(d),
  pct: v => (v === null || v === undefined) ? "–" : (100 * v).toFixed(1) + "%",
  mib: v => (v / 1048576).toFixed(2) + " MiB",
  age: v => (v === null || v === undefined) ? "never" : v < 1 ? "now" : Math.round(v) + " s ago",
};

function percentileOf(values, q) {
  if (!values.length) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

function setText(id, text) { document.getElementById(id).textContent = text; }

function setHistogram(chart, figures, statsId) {
  chart.data.labels = figures.counts.map(([staleness]) => String(staleness));
  chart.data.datasets[0].data = figures.counts.map(([, count]) => count);
  chart.update();
  setText(statsId, figures.total
    ? `p50 ${figures.p50} · p99 ${figures.p99} · max ${figures.max} · ${fmt.int(figures.total)} groups`
    : "empty");
}

function series(records, field, scale = 1) {
  return records.filter(r => r[field] !== undefined && r[field] !== null)
    .map(r => ({ x: r.step, y: r[field] * scale }));
}

function renderLearner(snapshot) {
  const learner = snapshot.learner;
  setText("learner-version", fmt.int(snapshot.buffer.learner_version));
  setText("learner-step", fmt.int(learner.step));
  setText("learner-reward", fmt.num(learner.reward_mean));
  setText("learner-accuracy", learner.accuracy === null || learner.accuracy === undefined
    ? "–" : `${fmt.pct(learner.accuracy)} @${learner.accuracy_step}`);
  setText("learner-idle", learner.idle_fraction === undefined ? "–" : fmt.pct(learner.idle_fraction));
  const h = state.history;
  const c = state.charts;
  c.time.data.datasets[0].data = series(h, "wait_s");
  c.time.data.datasets[1].data = series(h, "compute_s");
  c.time.data.datasets[2].data = series(h, "publish_s");
  c.reward.data.datasets[0].data = series(h, "reward_mean");
  c.reward.data.datasets[1].data = series(h, "accuracy");
  c.is.data.datasets[0].data = series(h, "is_weight_mean");
  c.is.data.datasets[1].data = series(h, "is_weight_max");
  c.is.data.datasets[2].data = series(h, "is_ess");
  c.is.data.datasets[3].data = series(h, "clip_fraction");
  // The first steps wait for the actors' engines to start: keep them from flattening the
  // rest of the chart.
  c.time.options.scales.y.max = percentileOf(
    h.map(r => (r.wait_s || 0) + (r.compute_s || 0) + (r.publish_s || 0)), 0.98) * 1.25 || undefined;
  for (const name of ["time", "reward", "is"]) c[name].update();
}

function renderBuffer(snapshot) {
  const b = snapshot.buffer;
  setText("buffer-depth", fmt.int(b.depth));
  setText("buffer-claimed", fmt.int(b.claimed));
  setText("buffer-in-flight", fmt.int(b.in_flight));
  setText("buffer-bytes", fmt.mib(b.bytes));
  setText("buffer-replay-depth", fmt.int(b.replay_depth));
  setText("buffer-replayed-share",
    `${fmt.pct(b.replayed_share)} / ${fmt.pct(snapshot.learner.replayed_fraction)}`);
  for (const [name, value] of Object.entries(b.lost_work)) setText(`lost-${name}`, fmt.int(value));
  setHistogram(state.charts.staleness, b.staleness, "staleness-stats");
  setHistogram(state.charts.sampledStaleness, b.sampled_staleness, "sampled-staleness-stats");
  const start = state.series.length ? state.series[0].t : 0;
  const d = state.charts.depth.data.datasets;
  d[0].data = state.series.map(p => ({ x: p.t - start, y: p.depth }));
  d[1].data = state.series.map(p => ({ x: p.t - start, y: p.in_flight }));
  d[2].data = state.series.map(p => ({ x: p.t - start, y: p.claimed }));
  state.charts.depth.update();
}

function renderActors(actors) {
  const body = document.querySelector("#actors tbody");
  body.replaceChildren(...actors.map(a => {
    const row = document.createElement("tr");
    row.dataset.actor = a.actor_id;
    if (a.silent) row.className = "silent";
    const cells = [
      a.actor_id, fmt.int(a.version), fmt.int(a.version_lag), fmt.num(a.tokens_per_s, 0),
      fmt.num(a.groups_per_s), fmt.pct(a.idle_fraction),
      a.weight_bytes_per_s == null ? "–" : fmt.num(a.weight_bytes_per_s / 1e6, 1),
      fmt.num(a.last_weight_fetch_s),
      fmt.int(a.in_flight_groups),
      fmt.int(a.groups_put), fmt.int(a.refused), fmt.int(a.quarantined),
      a.revoked ? "revoked" : "", fmt.int(a.weight_loads), fmt.int(a.restarts),
      fmt.int(a.errors), fmt.age(a.health_age_s), a.last_error,
    ];
    const names = ["actor", "version", "lag", "tokens_per_s", "groups_per_s", "idle",
      "link_mb_per_s", "last_fetch_s", "in_flight", "groups_put", "refused", "quarantined", "credential", "weight_loads",
      "restarts", "errors", "age", "error"];
    cells.forEach((text, i) => {
      const cell = document.createElement("td");
      cell.textContent = text;
      cell.dataset.field = names[i];
      if (names[i] === "error") { cell.className = "error"; cell.title = text; }
      row.appendChild(cell);
    });
    return row;
  }));
}

function render(snapshot) {
  const banner = document.getElementById("error");
  banner.hidden = !snapshot.error;
  banner.textContent = snapshot.error || "";
  if (!snapshot.buffer) return;
  state.last = snapshot;
  // A reconnected stream starts again with the whole history: keep only what is new.
  const newest = state.history.length ? state.history[state.history.length - 1].time : -Infinity;
  state.history.push(...snapshot.learner_history.filter(r => r.time > newest));
  if (state.history.length > MAX_POINTS) state.history.splice(0, state.history.length - MAX_POINTS);
  for (const point of snapshot.series) {
    if (!state.series.length || point.t > state.series[state.series.length - 1].t) {
      state.series.push(point);
    }
  }
  if (state.series.length > MAX_POINTS) state.series.splice(0, state.series.length - MAX_POINTS);
  setText("prefix", snapshot.prefix);
  renderBuffer(snapshot);
  renderLearner(snapshot);
  renderActors(snapshot.actors);
  setText("connection", `updated ${new Date(snapshot.taken_at * 1000).toLocaleTimeString()}`);
}

makeCharts();
const events = new EventSource("api/events");
events.onmessage = message => render(JSON.parse(message.data));
events.onerror = () => setText("connection", "disconnected; retrying…");
