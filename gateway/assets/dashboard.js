"use strict";
const $ = (id) => document.getElementById(id);
function cell(text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; return td; }
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
// Upper bound of the bucket holding quantile q of one route's histogram.
function quantile(ms, route, q) {
  const buckets = ms.filter((m) => m.name === "tessera_build_duration_seconds_bucket" && m.labels.route === route)
    .map((m) => [m.labels.le === "+Inf" ? Infinity : Number(m.labels.le), m.value]).sort((a, b) => a[0] - b[0]);
  const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
  const hit = buckets.find(([, c]) => c >= q * total);
  return hit && isFinite(hit[0]) ? hit[0] : null;
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
    const by = (c) => sum(ms, "tessera_requests_total", (l) => l.cache === c);
    const req = { hit: by("hit"), stale: by("stale"), waited: by("waited"), pending: by("pending"), error: by("error") };
    const total = req.hit + req.stale + req.waited + req.pending + req.error;
    $("hit-ratio").textContent = total ? Math.round(100 * (req.hit + req.stale) / total) + " %" : "–";
    $("hit-detail").textContent = `${req.hit} hit · ${req.stale} stale · ${req.waited} waited · ${req.pending} pending · ${req.error} error`;
    $("requests").textContent = total;
    $("queued").textContent = s.queues.reduce((n, q) => n + (q.messages ?? 0), 0);
    $("consumers").textContent = s.queues.reduce((n, q) => n + (q.consumers ?? 0), 0);
    $("published").textContent = sum(ms, "tessera_builds_published_total");
    const healthy = s.ready.store === "ok" && s.ready.bus === "ok";
    $("health").textContent = healthy ? "ok" : "degraded"; $("health").className = healthy ? "ok" : "bad";
    const routes = [...new Set(ms.filter((m) => m.name === "tessera_build_duration_seconds_count").map((m) => m.labels.route))];
    const latency = routes.map((route) => {
      const count = sum(ms, "tessera_build_duration_seconds_count", (l) => l.route === route);
      const secs = sum(ms, "tessera_build_duration_seconds_sum", (l) => l.route === route);
      return { route, count, mean: count ? secs / count : null, p50: quantile(ms, route, 0.5), p99: quantile(ms, route, 0.99) };
    }).filter((l) => l.count > 0);
    rows("queues", s.queues, (q) => [cell(q.name), cell(q.messages ?? "?", "num"), cell(q.consumers ?? "?", "num")], "no queues");
    rows("latency", latency, (l) => [cell(l.route), cell(l.count, "num"), cell(ms_(l.mean), "num"), cell(ms_(l.p50), "num"), cell(ms_(l.p99), "num")], "no builds yet");
    rows("failures", s.recent_failures, (f) => [cell(new Date(f.at).toLocaleTimeString()), cell(f.route), cell(f.error, "bad")], "no failures");
    rows("dead", s.dead_letters, (d) => [cell(d.queue), cell(d.reason, "bad"), cell(d.body)], "no dead letters");
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("updated").textContent = "cannot reach the gateway: " + e.message;
  }
}
$("requeue").addEventListener("click", async () => {
  const r = await fetch("dead-letters/requeue?limit=1000", { method: "POST", credentials: "same-origin" });
  $("requeued").textContent = r.ok ? `re-queued ${(await r.json()).requeued}` : "re-queue failed: HTTP " + r.status;
  refresh();
});
refresh();
setInterval(refresh, 2000);
