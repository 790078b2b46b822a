/*! Tessera client: fills fragment placeholders as soon as their fragments are built.
 * No dependencies. Placeholders are elements with data-tessera-src="/fragments/…";
 * the gateway injects this script into composed pages that still have some. A page
 * without ESI can use it by hand: <div data-tessera-src="/fragments/x">Loading…</div>
 * and <script src="/_tessera/client.js" defer></script>. The fragment replaces the
 * placeholder, unless it has data-tessera-mode="inner": then the element is kept
 * (id, classes) and the fragment becomes its content.
 * Events (bubbling): tessera:load {src} on the new content (on the element kept, in
 * inner mode), tessera:error {src, reason} on the placeholder. window.Tessera.scan(root) picks up placeholders added later by
 * hand (a MutationObserver does this by itself). */
(function () {
  "use strict";
  if (window.Tessera) return;
  var SELECTOR = "[data-tessera-src]";
  var WAIT = 20; // seconds per long-poll; the gateway caps it at gateway.max_wait
  var DEADLINE = 60000; // ms before giving up; data-tessera-deadline overrides
  var MAX_BACKOFF = 10000;
  var started = typeof WeakSet === "function" ? new WeakSet() : null;

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
  function giveUp(el, src, reason) {
    var fallback = el.querySelector("template.tessera-fallback");
    if (fallback) el.innerHTML = fallback.innerHTML;
    el.setAttribute("data-tessera-state", "failed");
    emit(el, "tessera:error", { src: src, reason: reason });
  }
  // "replace" (the default): the fragment takes the placeholder's place. "inner": the
  // element stays (its id, classes, attributes) and the fragment becomes its content.
  function swap(el, src, html) {
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
    if (!parent) return;
    el.replaceWith.apply(el, nodes);
    var first = nodes.filter(function (n) { return n.nodeType === 1; })[0];
    emit(first || parent, "tessera:load", { src: src });
  }
  async function fill(el) {
    if (started) { if (started.has(el)) return; started.add(el); }
    else if (el.__tessera) return; else el.__tessera = true;
    var src = el.getAttribute("data-tessera-src");
    var deadline = Date.now() + (Number(el.getAttribute("data-tessera-deadline")) || DEADLINE);
    el.setAttribute("data-tessera-state", "loading");
    for (var attempt = 0; Date.now() < deadline; attempt++) {
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
  function scan(root) {
    root = root || document;
    if (root.nodeType === 1 && root.matches(SELECTOR)) fill(root);
    if (root.querySelectorAll) Array.prototype.forEach.call(root.querySelectorAll(SELECTOR), fill);
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
