"use strict";
const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;
// The charts' window, kept in the page: one sample per poll, 450 at most.
const WINDOW_MS = 15 * 60 * 1000;
const KEPT = WINDOW_MS / POLL_MS;
// A page opened a moment ago draws what it has across at least this span, not as a
// sliver at the right edge of 15 minutes.
const MIN_SPAN_MS = 60 * 1000;
// Values longer than this (a dead letter's message, an error) are cut; the whole value
// opens below them.
const LONG = 120;

function cell(content, cls) {
  const td = document.createElement("td");
  td.append(content instanceof Node ? content : String(content));
  if (cls) td.className = cls;
  return td;
}
// Long values opened by the operator stay open across refreshes (the rows are redrawn).
const opened = new Set();
function long(text) {
  text = String(text ?? "");
  if (text.length <= LONG) return text;
  const details = document.createElement("details");
  details.open = opened.has(text);
  details.addEventListener("toggle", () => (details.open ? opened.add(text) : opened.delete(text)));
  const summary = document.createElement("summary");
  summary.textContent = text.slice(0, LONG) + "…";
  const whole = document.createElement("pre");
  whole.textContent = text;
  details.append(summary, whole);
  return details;
}
function rows(id, items, make, emptyText) {
  const body = $(id); body.replaceChildren();
  if (!items.length) { const tr = document.createElement("tr"); const td = cell(emptyText, "empty"); td.colSpan = 5; tr.append(td); body.append(tr); return; }
  for (const item of items) { const tr = document.createElement("tr"); tr.append(...make(item)); body.append(tr); }
}
function ms_(x) { return x == null ? "–" : x < 1 ? (x * 1000).toFixed(0) + " ms" : x.toFixed(2) + " s"; }
// Prometheus text format → [{name, labels, value}].
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m || line.startsWith("#")) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}
const sum = (ms, name, pred = () => true) => ms.filter((m) => m.name === name && pred(m.labels)).reduce((n, m) => n + m.value, 0);
// The buckets of a histogram, summed over the series `pred` picks: [[le, count]] by le.
function buckets(ms, pred) {
  const by = new Map();
  for (const m of ms) {
    if (m.name !== "tessera_build_duration_seconds_bucket" || !pred(m.labels)) continue;
    const le = m.labels.le === "+Inf" ? Infinity : Number(m.labels.le);
    by.set(le, (by.get(le) ?? 0) + m.value);
  }
  return [...by].sort((a, b) => a[0] - b[0]);
}
// Upper bound of the bucket holding quantile q; null without observations.
function quantile(bs, q) {
  const total = bs.length ? bs[bs.length - 1][1] : 0;
  const hit = total > 0 && bs.find(([, c]) => c >= q * total);
  return hit && isFinite(hit[0]) ? hit[0] : null;
}

// What one poll read, cumulative as the counters are.
function reading(ms, s) {
  const by = (c) => sum(ms, "tessera_requests_total", (l) => l.cache === c);
  const req = { hit: by("hit"), stale: by("stale"), waited: by("waited"), pending: by("pending"), error: by("error") };
  return {
    t: Date.now(),
    req,
    all: req.hit + req.stale + req.waited + req.pending + req.error,
    failed: sum(ms, "tessera_builds_failed_total"),
    builds: buckets(ms, () => true),
    queued: s.queues.reduce((n, q) => n + (q.messages ?? 0), 0),
  };
}
// Rates and the hit ratio are taken over the last 10 s, the build p99 over the last
// minute: per poll they would be mostly noise.
const RATE_MS = 10 * 1000;
const P99_MS = 60 * 1000;
// The reading kept from at least `ago` ms before `now` (the oldest when none is as old).
function before(now, ago) {
  for (let i = samples.length - 1; i >= 0; i--) if (samples[i].r.t <= now.t - ago) return samples[i].r;
  return samples.length ? samples[0].r : null;
}
// One chart sample. No rate before a second reading, nor across a restarted gateway
// (its counters went back to zero).
function sample(now) {
  const prev = before(now, RATE_MS);
  const dt = prev ? (now.t - prev.t) / 1000 : 0;
  const delta = (f) => (dt > 0 && f(now) >= f(prev) ? f(now) - f(prev) : null);
  const all = delta((r) => r.all);
  const good = delta((r) => r.req.hit + r.req.stale);
  const errors = delta((r) => r.req.error + r.failed);
  const old = before(now, P99_MS);
  const earlier = new Map(old ? old.builds : []);
  const builds = now.builds.map(([le, c]) => [le, c - (earlier.get(le) ?? 0)]);
  return {
    t: now.t,
    r: now,
    rate: all == null ? null : all / dt,
    ratio: all ? good / all : null,
    queued: now.queued,
    p99: old ? quantile(builds, 0.99) : null,
    errors: errors == null ? null : errors / dt,
  };
}
const rate = (v) => (v < 10 ? v.toFixed(1) : v.toFixed(0)) + " /s";
const CHARTS = [
  { key: "rate", title: "Lookups", fmt: rate, hint: "fragment lookups per second, over 10 s" },
  { key: "ratio", title: "Hit ratio", fmt: (v) => Math.round(v * 100) + " %", max: 1, hint: "hit + stale of all lookups, over 10 s" },
  { key: "queued", title: "Queue depth", fmt: String, hint: "build requests waiting in every queue" },
  { key: "p99", title: "Build p99 ≤", fmt: ms_, hint: "99th percentile of build durations (bucket bound), over 1 min" },
  { key: "errors", title: "Errors", fmt: rate, bad: true, hint: "lookups answered with an error and builds failed for good, per second over 10 s" },
];
const W = 300, H = 60, SVG = "http://www.w3.org/2000/svg";
const samples = [];
function svgPath(svg, cls) {
  const p = document.createElementNS(SVG, "path");
  p.setAttribute("class", cls);
  p.setAttribute("vector-effect", "non-scaling-stroke");
  svg.append(p);
  return p;
}
function initCharts() {
  for (const c of CHARTS) {
    const fig = document.createElement("figure");
    fig.className = c.bad ? "chart bad" : "chart";
    fig.dataset.chart = c.key;
    const caption = document.createElement("figcaption");
    const title = document.createElement("span");
    title.textContent = c.title;
    if (c.hint) fig.title = c.hint;
    c.now = document.createElement("b");
    caption.append(title, c.now);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", c.title + ", last 15 minutes");
    c.area = svgPath(svg, "area");
    c.line = svgPath(svg, "line");
    const scale = document.createElement("div");
    scale.className = "scale";
    c.from = document.createElement("span");
    c.top = document.createElement("span");
    const to = document.createElement("span");
    to.textContent = "now";
    scale.append(c.from, c.top, to);
    fig.append(caption, svg, scale);
    $("charts").append(fig);
  }
}
// Draws one series: a line broken where there is no value, over a light area.
function draw(c, now) {
  const values = samples.map((s) => s[c.key]).filter((v) => v != null);
  const max = c.max ?? (Math.max(0, ...values) || 1);
  const span = Math.min(WINDOW_MS, Math.max(MIN_SPAN_MS, samples.length ? now - samples[0].t : 0));
  const x = (t) => (W * (t - (now - span))) / span;
  // 3 units of room above and below, so a line at zero or at the top stays visible.
  const y = (v) => H - 3 - ((H - 6) * Math.min(v, max)) / max;
  let line = "", area = "", run = [];
  const flush = () => {
    if (!run.length) return;
    const pts = run.map(([a, b]) => a.toFixed(1) + " " + b.toFixed(1)).join("L");
    line += "M" + pts + (run.length === 1 ? "h1" : "");
    area += `M${run[0][0].toFixed(1)} ${H}L${pts}L${run[run.length - 1][0].toFixed(1)} ${H}Z`;
    run = [];
  };
  for (const s of samples) {
    if (s[c.key] == null) flush(); else run.push([x(s.t), y(s[c.key])]);
  }
  flush();
  c.line.setAttribute("d", line);
  c.area.setAttribute("d", area);
  const latest = samples.length ? samples[samples.length - 1][c.key] : null;
  c.now.textContent = latest == null ? "–" : c.fmt(latest);
  c.top.textContent = values.length ? "top " + c.fmt(max) : "no data yet";
  c.from.textContent = span < MIN_SPAN_MS * 2 ? Math.round(span / 1000) + " s ago" : Math.round(span / 60000) + " min ago";
}
function record(now) {
  samples.push(sample(now));
  while (samples.length > KEPT || samples[0].t < now.t - WINDOW_MS) samples.shift();
  for (const c of CHARTS) draw(c, now.t);
}

function showWorkers(w) {
  $("workers").textContent = w.count ?? "?";
  if (w.kind === "embedded") {
    $("workers-label").textContent = "Workers (embedded)";
    $("workers-detail").textContent = "build tasks in this gateway";
  } else {
    $("workers-label").textContent = "Workers (broker consumers)";
    $("workers-detail").textContent = "worker pools consuming the build queues";
  }
}
async function refresh() {
  try {
    const [mr, sr] = await Promise.all([
      fetch("metrics", { credentials: "same-origin" }),
      fetch("api/status", { headers: { Accept: "application/json" }, credentials: "same-origin" }),
    ]);
    if (!mr.ok || !sr.ok) throw new Error("HTTP " + (mr.ok ? sr.status : mr.status));
    const ms = parseMetrics(await mr.text());
    const s = await sr.json();
    const now = reading(ms, s);
    const { hit, stale, waited, pending, error } = now.req;
    $("hit-ratio").textContent = now.all ? Math.round(100 * (hit + stale) / now.all) + " %" : "–";
    $("hit-detail").textContent = `${hit} hit · ${stale} stale · ${waited} waited · ${pending} pending · ${error} error`;
    $("requests").textContent = now.all;
    $("queued").textContent = now.queued;
    showWorkers(s.workers);
    $("published").textContent = sum(ms, "tessera_builds_published_total");
    const streams = sum(ms, "tessera_streams"), polls = sum(ms, "tessera_long_polls");
    $("waiting").textContent = streams + polls;
    $("waiting-detail").textContent = `${streams} push streams · ${polls} long-polled fragments`;
    $("tag-purges").textContent = sum(ms, "tessera_tag_purges_total");
    $("tag-detail").textContent = `${sum(ms, "tessera_tag_retired_total")} fragments retired and rebuilt`;
    const servers = s.store_servers || [];
    const down = servers.filter((v) => !v.up).length;
    const healthy = s.ready.store === "ok" && s.ready.bus === "ok" && down === 0;
    $("health").textContent = healthy ? "ok" : "degraded"; $("health").className = healthy ? "ok" : "bad";
    $("servers-detail").textContent = servers.length ? `${servers.length - down} of ${servers.length} memcached up` : "";
    $("servers-section").hidden = servers.length === 0;
    rows("servers", servers, (v) => [cell(v.server), cell(v.up ? "up" : "down (probed)", v.up ? "ok" : "bad"), cell(v.ejections, "num"), cell(v.readmissions, "num"), cell(v.flushes, "num")], "no servers");
    const routes = [...new Set(ms.filter((m) => m.name === "tessera_build_duration_seconds_count").map((m) => m.labels.route))];
    const latency = routes.map((route) => {
      const count = sum(ms, "tessera_build_duration_seconds_count", (l) => l.route === route);
      const secs = sum(ms, "tessera_build_duration_seconds_sum", (l) => l.route === route);
      const bs = buckets(ms, (l) => l.route === route);
      return { route, count, mean: count ? secs / count : null, p50: quantile(bs, 0.5), p99: quantile(bs, 0.99) };
    }).filter((l) => l.count > 0);
    rows("queues", s.queues, (q) => [cell(q.name), cell(q.messages ?? "?", "num"), cell(q.consumers ?? "?", "num")], "no queues");
    const limits = s.limits ?? [];
    $("limits-section").hidden = !limits.length;
    const limit = (n) => n ? n : "–";
    rows("limits", limits, (l) => [cell(l.route), cell(l.rendering ?? "–", "num"), cell(limit(l.max_renders), "num"), cell(limit(l.renders_per_second), "num")], "no limited routes");
    rows("latency", latency, (l) => [cell(l.route), cell(l.count, "num"), cell(ms_(l.mean), "num"), cell(ms_(l.p50), "num"), cell(ms_(l.p99), "num")], "no builds yet");
    rows("failures", s.recent_failures, (f) => [cell(new Date(f.at).toLocaleTimeString()), cell(f.route), cell(long(f.error), "bad")], "no failures");
    deadLetters(s.dead_letters);
    record(now);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("updated").textContent = "cannot reach the gateway: " + e.message;
  }
}
function button(label, cls, action) {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = label; b.className = cls;
  b.addEventListener("click", action);
  return b;
}
// A dead-letter action through the admin API, then a fresh look.
async function deadAction(method, path, what) {
  const r = await fetch(path, { method, credentials: "same-origin" });
  $("requeued").textContent = r.ok ? `${what}: ${Object.values(await r.json())[0]}` : `${what} failed: HTTP ${r.status}`;
  refresh();
}
// Dead letters grouped by route, with counts; each can be retried or discarded, one or
// all of a route. Never their message: it may hold `vary` values (redacted, but noise).
function deadLetters(letters) {
  const body = $("dead"); body.replaceChildren();
  if (!letters.length) { const tr = document.createElement("tr"); const td = cell("no dead letters", "empty"); td.colSpan = 6; tr.append(td); body.append(tr); return; }
  const byRoute = new Map();
  for (const d of letters) { if (!byRoute.has(d.route)) byRoute.set(d.route, []); byRoute.get(d.route).push(d); }
  for (const [route, items] of byRoute) {
    const tr = document.createElement("tr"); tr.className = "group"; tr.dataset.route = route;
    const name = cell(`${route || "(no route)"} · ${items.length}`); name.colSpan = 5;
    const actions = cell("");
    const q = "route=" + encodeURIComponent(route);
    if (route) actions.append(
      button("Retry all", "retry-route", () => deadAction("POST", "dead-letters/retry?" + q, `retried ${route}`)),
      button("Discard all", "discard-route", () => deadAction("DELETE", "dead-letters?" + q, `discarded ${route}`)));
    tr.append(name, actions); body.append(tr);
    for (const d of items) {
      const row = document.createElement("tr"); row.dataset.id = d.id;
      const acts = cell("");
      const id = encodeURIComponent(d.id);
      acts.append(
        button("Retry", "retry", () => deadAction("POST", `dead-letters/${id}/retry`, "retried")),
        button("Discard", "discard", () => deadAction("DELETE", `dead-letters/${id}`, "discarded")));
      row.append(cell(d.id, "mono"), cell(d.fragment ?? "–", "mono"), cell(d.attempts ?? "–", "num"),
        cell(d.time ? new Date(d.time).toLocaleString() : "–"), cell(long(d.error), "bad"), acts);
      body.append(row);
    }
  }
}
$("requeue").addEventListener("click", async () => {
  const r = await fetch("dead-letters/requeue?limit=1000", { method: "POST", credentials: "same-origin" });
  $("requeued").textContent = r.ok ? `re-queued ${(await r.json()).requeued}` : "re-queue failed: HTTP " + r.status;
  refresh();
});
initCharts();
refresh();
setInterval(refresh, POLL_MS);
