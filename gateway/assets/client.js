/*! Tessera client: fills fragment placeholders (elements with
 * data-tessera-src="/fragments/…") as soon as their fragments are built. No dependencies.
 * A page's placeholders share one push stream (/_tessera/stream, 32 fragments each); where
 * streams are unavailable (no EventSource, 503, <html data-tessera-stream="off">) each
 * long-polls its fragment. The fragment replaces the placeholder, or with
 * data-tessera-mode="inner" fills it and keeps it. Events (bubbling): tessera:load {src},
 * tessera:error {src, reason}. window.Tessera.scan(root) picks up placeholders added later
 * (a MutationObserver does this by itself). See the README, "The browser client". */
(function () {
  "use strict";
  if (window.Tessera) return;
  var SELECTOR = "[data-tessera-src]";
  var WAIT = 20; // seconds per long-poll; the gateway caps it at gateway.max_wait
  var DEADLINE = 60000; // ms before giving up; data-tessera-deadline overrides
  var MAX_BACKOFF = 10000;
  var STREAM = "/_tessera/stream";
  var PER_STREAM = 32; // the gateway's cap
  var STREAM_TRIES = 3; // failed stream connections in a row before long-polling
  var started = typeof WeakSet === "function" ? new WeakSet() : null;
  var streams = typeof EventSource === "function" &&
    document.documentElement.getAttribute("data-tessera-stream") !== "off";
  var queued = [];

  function emit(target, name, detail) {
    target.dispatchEvent(new CustomEvent(name, { bubbles: true, detail: detail }));
  }
  function sleep(ms) {
    return new Promise(function (done) { setTimeout(done, ms); });
  }
  // Honour Retry-After; otherwise exponential. Jitter spreads a page's retries out.
  function backoff(res, attempt) {
    var after = res ? Number(res.headers.get("Retry-After")) : NaN;
    var base = after > 0 ? after * 1000 : Math.min(500 * Math.pow(2, attempt), MAX_BACKOFF);
    return base / 2 + Math.random() * (base / 2);
  }
  function loading(el) {
    return el.getAttribute("data-tessera-state") === "loading";
  }
  function giveUp(el, src, reason) {
    if (!loading(el)) return;
    var fallback = el.querySelector("template.tessera-fallback");
    if (fallback) el.innerHTML = fallback.innerHTML;
    el.setAttribute("data-tessera-state", "failed");
    emit(el, "tessera:error", { src: src, reason: reason });
  }
  // "replace" (the default): the fragment takes the placeholder's place. "inner": the
  // element stays (its id, classes, attributes) and the fragment becomes its content.
  function swap(el, src, html) {
    if (!loading(el)) return;
    var t = document.createElement("template");
    t.innerHTML = html;
    var nodes = Array.prototype.slice.call(t.content.childNodes);
    if (el.getAttribute("data-tessera-mode") === "inner") {
      el.replaceChildren.apply(el, nodes);
      el.setAttribute("data-tessera-state", "loaded");
      emit(el, "tessera:load", { src: src });
      return;
    }
    var parent = el.parentNode;
    el.setAttribute("data-tessera-state", "loaded");
    if (!parent) return;
    el.replaceWith.apply(el, nodes);
    var first = nodes.filter(function (n) { return n.nodeType === 1; })[0];
    emit(first || parent, "tessera:load", { src: src });
  }
  function claim(el) {
    if (started) { if (started.has(el)) return false; started.add(el); }
    else if (el.__tessera) return false; else el.__tessera = true;
    el.setAttribute("data-tessera-state", "loading");
    var ms = Number(el.getAttribute("data-tessera-deadline")) || DEADLINE;
    el.__tesseraDeadline = Date.now() + ms;
    setTimeout(function () { giveUp(el, el.getAttribute("data-tessera-src"), "deadline"); }, ms);
    return true;
  }
  // One placeholder, on its own: long-polls its fragment.
  function fill(el) {
    if (claim(el)) poll(el);
  }
  async function poll(el) {
    var src = el.getAttribute("data-tessera-src");
    var deadline = el.__tesseraDeadline;
    for (var attempt = 0; Date.now() < deadline && loading(el); attempt++) {
      var res = null;
      var asked = Date.now();
      try {
        var wait = Math.max(1, Math.min(WAIT, Math.floor((deadline - asked) / 1000)));
        res = await fetch(src, {
          headers: { Prefer: "wait=" + wait, Accept: "text/html" },
          credentials: "same-origin",
        });
        if (res.status === 200) { swap(el, src, await res.text()); return; }
        if (res.status !== 202 && res.status !== 503) {
          giveUp(el, src, "HTTP " + res.status);
          return;
        }
      } catch (e) {
        res = null; // network error: retry like a 503
      }
      // A long-poll that ran its course may be renewed at once; a quick answer backs off.
      if (res && res.status === 202 && Date.now() - asked >= 1000) continue;
      await sleep(Math.min(backoff(res, attempt), Math.max(0, deadline - Date.now())));
    }
    giveUp(el, src, "deadline");
  }
  // Placeholders found together go out together: one stream per PER_STREAM fragments.
  function enqueue(el) {
    if (!claim(el)) return;
    if (!streams) { poll(el); return; }
    if (queued.length === 0) setTimeout(flush, 0);
    queued.push(el);
  }
  function flush() {
    var bySrc = {}, srcs = [];
    queued.forEach(function (el) {
      var src = el.getAttribute("data-tessera-src");
      if (!bySrc[src]) { bySrc[src] = []; srcs.push(src); }
      bySrc[src].push(el);
    });
    queued = [];
    for (var i = 0; i < srcs.length; i += PER_STREAM) stream(srcs.slice(i, i + PER_STREAM), bySrc, 0);
  }
  // Sources whose placeholders still wait.
  function waiting(srcs, bySrc) {
    return srcs.filter(function (src) { return bySrc[src].some(loading); });
  }
  function stream(srcs, bySrc, failures) {
    if (!srcs.length) return;
    var url = STREAM + "?" + srcs.map(function (s) { return "src=" + encodeURIComponent(s); }).join("&");
    var es = new EventSource(url);
    var opened = false, over = false;
    es.onopen = function () { opened = true; };
    es.addEventListener("fragment", function (e) {
      var d = JSON.parse(e.data);
      (bySrc[d.src] || []).forEach(function (el) {
        if (d.status === 200) swap(el, d.src, d.html);
        else giveUp(el, d.src, "HTTP " + d.status);
      });
    });
    function next(failed) {
      if (over) return;
      over = true;
      es.close();
      var rest = waiting(srcs, bySrc);
      if (!rest.length) return;
      if (!failed) { stream(rest, bySrc, 0); return; }
      if (!opened || failures + 1 >= STREAM_TRIES) {
        // No stream to be had (503, a proxy that refuses it): long-poll each instead.
        rest.forEach(function (src) { bySrc[src].filter(loading).forEach(poll); });
        return;
      }
      setTimeout(function () { stream(waiting(rest, bySrc), bySrc, failures + 1); }, backoff(null, failures));
    }
    es.addEventListener("end", function () { next(false); });
    // The browser would reconnect by itself and ask for everything again: reconnect here,
    // for what was not delivered.
    es.onerror = function () { next(true); };
  }
  function scan(root) {
    root = root || document;
    if (root.nodeType === 1 && root.matches(SELECTOR)) enqueue(root);
    if (root.querySelectorAll) Array.prototype.forEach.call(root.querySelectorAll(SELECTOR), enqueue);
  }
  window.Tessera = { scan: scan, fill: fill };
  function start() {
    scan(document);
    new MutationObserver(function (records) {
      records.forEach(function (r) {
        Array.prototype.forEach.call(r.addedNodes, function (n) { if (n.nodeType === 1) scan(n); });
      });
    }).observe(document.documentElement, { childList: true, subtree: true });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
