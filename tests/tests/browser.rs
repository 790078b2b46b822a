//! The browser client in a real browser: headless Chromium opens composed pages whose
//! fragments are cold and sees the placeholders filled. Screenshots are kept in
//! `tests/artifacts/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tessera_protocol::FragmentRoute;
use tessera_tests::browser::{Browser, artifact};
use tessera_tests::eventually;
use tessera_tests::harness::{Backend, TestGateway, backends, config, route};
use tessera_tests::upstream::{FakeUpstream, Script};

/// Two browsers at once on a small machine would measure each other, not the client.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Records `tessera:load` / `tessera:error` events as the page sees them.
const RECORDER: &str = r#"<script>
window.__loads = []; window.__errors = [];
document.addEventListener("tessera:load", (e) => window.__loads.push({ src: e.detail.src, t: performance.now() }));
document.addEventListener("tessera:error", (e) => window.__errors.push(e.detail.reason));
</script>"#;

fn serve_page(up: &FakeUpstream, path: &str, html: String, esi: bool) {
    let headers = if esi {
        vec![("surrogate-control".into(), "content=\"ESI/1.0\"".into())]
    } else {
        vec![]
    };
    up.script(
        path,
        Script {
            body: Some(html.into()),
            headers,
            ..Script::default()
        },
    );
}

/// Waits until the page has no placeholder left.
async fn all_placeholders_filled(browser: &Browser) {
    eventually(
        "every placeholder is replaced",
        Duration::from_secs(10),
        || async {
            browser
                .eval("return document.querySelectorAll('[data-tessera-src]').length")
                .await
                == 0
        },
    )
    .await;
}

async fn gateway(up: &FakeUpstream, routes: Vec<FragmentRoute>) -> TestGateway {
    let mut c = config(&up.url(), routes);
    let b = backends(Backend::Memory, &mut c).await;
    TestGateway::start(c, b).await
}

/// Opens, in a browser of its own, a page without ESI that holds `body` and loads the
/// client script by hand, through a gateway with `routes`. Holds [`BROWSER`] while the
/// test runs.
async fn open_by_hand(
    up: &FakeUpstream,
    routes: Vec<FragmentRoute>,
    body: &str,
) -> (TestGateway, Browser, tokio::sync::MutexGuard<'static, ()>) {
    serve_page(
        up,
        "/by-hand",
        format!(
            r#"<!doctype html><html><head>{RECORDER}</head><body>{body}
<script src="/_tessera/client.js" defer></script>
</body></html>"#
        ),
        false,
    );
    let gw = gateway(up, routes).await;
    let browser = Browser::start().await;
    let one_at_a_time = BROWSER.lock().await;
    browser.open(&gw.at("/by-hand")).await;
    (gw, browser, one_at_a_time)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_composed_page_fills_in_within_build_time_plus_a_second() {
    let up = FakeUpstream::start().await;
    let routes = vec![
        up.render("weather", 300, r#"<p id="weather">Sunny, 21 °C</p>"#),
        up.render(
            "recs",
            800,
            r#"<ul id="recs"><li>Book one</li><li>Book two</li></ul>"#,
        ),
        up.render(
            "news",
            1200,
            r#"<ol id="news"><li>Fragments are back</li></ol>"#,
        ),
    ];
    let slowest = Duration::from_millis(1200);
    serve_page(
        &up,
        "/",
        format!(
            r#"<!doctype html><html><head><title>Composed</title>{RECORDER}</head><body>
<h1>A composed page</h1>
<section><esi:include src="/fragments/weather"/></section>
<section><esi:include src="/fragments/recs"/></section>
<section><esi:include src="/fragments/news"/></section>
<script>window.__cold = document.querySelectorAll('[data-tessera-src]').length;</script>
</body></html>"#
        ),
        true,
    );
    let gw = gateway(&up, routes).await;
    let browser = Browser::start().await;

    let _one_at_a_time = BROWSER.lock().await;
    browser.open(&gw.at("/")).await;
    // Counted by the page as it was parsed, before the client script ran: on a loaded
    // machine the fastest fragment may be filled in before the test gets to look.
    let placeholders = browser.eval("return window.__cold").await;
    assert_eq!(placeholders, 3, "the page arrived with every fragment cold");
    all_placeholders_filled(&browser).await;
    browser.screenshot(&artifact("composed-page.png")).await;
    // Measured by the page itself, from the start of navigation to the last fragment
    // swapped in: the browser's own start-up is not part of it.
    let last_ms = browser
        .eval("return Math.max(...window.__loads.map((l) => l.t))")
        .await;
    let took = Duration::from_millis(last_ms.as_f64().unwrap() as u64);
    assert!(
        took <= slowest + Duration::from_secs(1),
        "filled {took:?} after navigation; the slowest fragment takes {slowest:?}"
    );
    let text = browser.eval("return document.body.innerText").await;
    let text = text.as_str().unwrap();
    for expected in ["Sunny, 21 °C", "Book two", "Fragments are back"] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from {text:?}"
        );
    }
    assert_eq!(
        browser.eval("return window.__loads.length").await,
        3,
        "one tessera:load each"
    );
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('#recs li').length")
            .await,
        2
    );
    for name in ["weather", "recs", "news"] {
        assert_eq!(up.renders(&format!("/_render/{name}")), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_hand_placeholders_give_up_at_their_deadline_and_late_ones_are_found() {
    let up = FakeUpstream::start().await;
    let routes = vec![
        up.render("never", 30_000, "<p>too late</p>"),
        up.render(
            "later",
            200,
            r#"<p id="later">added later, filled anyway</p>"#,
        ),
    ];
    let by_hand = r#"
<div data-tessera-src="/fragments/never" data-tessera-deadline="1500">Loading…<template class="tessera-fallback"><p id="fb">Fallback shown</p></template></div>
<div id="slot"></div>
<script>setTimeout(() => {
  document.getElementById("slot").innerHTML = '<div data-tessera-src="/fragments/later">…</div>';
}, 300);</script>"#;
    let (_gw, browser, _one_at_a_time) = open_by_hand(&up, routes, by_hand).await;
    eventually(
        "the late placeholder is filled",
        Duration::from_secs(10),
        || async {
            browser
                .eval("return !!document.getElementById('later')")
                .await
                == true
        },
    )
    .await;
    eventually(
        "the fallback is shown at the deadline",
        Duration::from_secs(10),
        || async { browser.eval("return !!document.getElementById('fb')").await == true },
    )
    .await;
    browser.screenshot(&artifact("by-hand-fallback.png")).await;
    assert_eq!(
        browser.eval("return window.__errors").await,
        serde_json::json!(["deadline"])
    );
    assert_eq!(browser.eval("return window.__loads.length").await, 1);
}

/// `data-tessera-mode="inner"` keeps the element (id, classes) and fills it; without it
/// the fragment takes the placeholder's place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_mode_keeps_the_element_and_replace_mode_swaps_it() {
    let up = FakeUpstream::start().await;
    let routes = vec![
        up.render("kept", 200, r#"<p id="kept-content">inside</p>"#),
        up.render("swapped", 200, r#"<p id="swapped-content">instead</p>"#),
    ];
    let by_hand = r#"
<div id="box" class="card wide" data-tessera-mode="inner" data-tessera-src="/fragments/kept">Loading…</div>
<div id="placeholder" class="card" data-tessera-src="/fragments/swapped">Loading…</div>"#;
    let (_gw, browser, _one_at_a_time) = open_by_hand(&up, routes, by_hand).await;
    eventually("both fragments are in", Duration::from_secs(10), || async {
        browser.eval("return window.__loads.length").await == 2
    })
    .await;
    let inner = browser
        .eval(
            "const b = document.getElementById('box'); return b && \
             [b.className, b.children.length, b.firstElementChild.id, b.textContent.trim(), \
              b.getAttribute('data-tessera-state')]",
        )
        .await;
    assert_eq!(
        inner,
        serde_json::json!(["card wide", 1, "kept-content", "inside", "loaded"]),
        "inner mode keeps the element and fills it"
    );
    let replaced = browser
        .eval(
            "const c = document.getElementById('swapped-content'); \
             return [document.getElementById('placeholder') === null, \
                     !!c && c.parentElement === document.body]",
        )
        .await;
    assert_eq!(
        replaced,
        serde_json::json!([true, true]),
        "replace mode puts the fragment in the placeholder's place"
    );
}

/// A gateway that answered a waited long-poll, hits, a 404 build and a 503 build; the
/// latter is dead-lettered (one attempt), and its request is on the dead-letter list.
async fn traffic_and_a_dead_letter(up: &FakeUpstream) -> TestGateway {
    for (name, status) in [("broken", 404), ("flaky", 503)] {
        up.script(
            &format!("/_render/{name}"),
            Script {
                then: Some(status),
                ..Script::default()
            },
        );
    }
    let mut flaky = route("flaky");
    flaky.max_attempts = 1;
    // Its failure is remembered briefly: then a retried letter may build it again.
    flaky.failed_ttl = FLAKY_FAILED_TTL;
    let routes = vec![up.render("fast", 10, "<p>fast</p>"), route("broken"), flaky];
    let gw = gateway(up, routes).await;
    let http = tessera_tests::harness::client();
    let get = |name: &str, wait: bool| {
        let req = http.get(gw.at(&format!("/fragments/{name}")));
        let req = if wait {
            req.header("prefer", "wait=5")
        } else {
            req
        };
        async move { req.send().await.unwrap() }
    };
    get("fast", true).await;
    for _ in 0..5 {
        get("fast", false).await;
    }
    get("broken", true).await;
    get("flaky", true).await;
    let dead_letters = format!("{}/dead-letters", gw.admin);
    eventually("a dead letter", Duration::from_secs(10), || async {
        let r = http.get(&dead_letters).send().await.unwrap();
        !r.json::<Vec<serde_json::Value>>().await.unwrap().is_empty()
    })
    .await;
    gw
}

/// At `width` CSS pixels the page needs no horizontal scrolling; saves a screenshot of
/// the whole page.
async fn fits_at(browser: &Browser, width: u32) {
    browser.resize(width, 900).await;
    let fits = browser
        .eval("const e = document.documentElement; return [e.scrollWidth, window.innerWidth]")
        .await;
    let (scroll, inner) = (fits[0].as_u64().unwrap(), fits[1].as_u64().unwrap());
    assert!(
        inner <= u64::from(width) && scroll <= inner,
        "{width} px window: the page is {scroll} px wide in {inner} px"
    );
    // Tall enough for the whole page, dead letters included.
    browser.resize(width, 1800).await;
    browser
        .screenshot(&artifact(&format!("dashboard-{width}.png")))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_figures() {
    let up = FakeUpstream::start().await;
    let gw = traffic_and_a_dead_letter(&up).await;
    let browser = Browser::start().await;
    let _one_at_a_time = BROWSER.lock().await;
    // (The token check has its own tests; a browser cannot be handed Basic credentials
    // through the URL.)
    browser.open(&format!("{}/", gw.admin)).await;
    eventually(
        "the dashboard has drawn two polls",
        Duration::from_secs(10),
        || async {
            browser
                .eval("return document.querySelector('[data-chart=queued] path.line').getAttribute('d')")
                .await
                .as_str()
                .is_some_and(|d| d.contains('L'))
        },
    )
    .await;
    let text = |id: &'static str| {
        let b = &browser;
        async move {
            let v = b
                .eval(&format!("return document.getElementById('{id}').innerText"))
                .await;
            v.as_str().unwrap().to_string()
        }
    };
    let requests: u64 = text("requests").await.parse().unwrap();
    assert!(requests >= 8, "{requests} requests shown");
    assert_ne!(text("hit-ratio").await, "–");
    assert_eq!(text("health").await, "ok");
    assert_eq!(
        text("workers").await,
        "4",
        "the embedded workers, not one consumer"
    );
    assert_eq!(text("workers-label").await, "Workers (embedded)");
    for (id, shows, why) in [
        (
            "hit-detail",
            "1 waited",
            "the long-poll that waited for its build is no hit",
        ),
        ("latency", "fast", "build latency lists the route"),
        ("failures", "404", "the failure is listed with its error"),
        ("dead", "503", "the dead letter is listed with its reason"),
    ] {
        let shown = text(id).await;
        assert!(shown.contains(shows), "{why}: #{id} shows {shown:?}");
    }
    for width in [800, 1280] {
        fits_at(&browser, width).await;
    }
    requeue_from_the_page(&browser).await;
}

/// How long the dead-lettered route's failure is remembered.
const FLAKY_FAILED_TTL: Duration = Duration::from_secs(1);

/// Issue 32: the dashboard lists dead letters by route with counts; retrying one from the
/// page puts it back on its queue, and it builds: a build nobody else asked for (the
/// route's builds published stay at one, the request that failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_one_dead_letter_from_the_dashboard_builds_it() {
    let up = FakeUpstream::start().await;
    let gw = traffic_and_a_dead_letter(&up).await;
    // The upstream is well again.
    up.script("/_render/flaky", Script::default());
    let http = tessera_tests::harness::client();
    let browser = Browser::start().await;
    let _one_at_a_time = BROWSER.lock().await;
    browser.open(&format!("{}/", gw.admin)).await;
    eventually(
        "the letter is listed under its route",
        Duration::from_secs(10),
        || async {
            browser
            .eval("const g = document.querySelector('#dead tr.group'); return g ? g.innerText : ''")
            .await
            .as_str()
            .is_some_and(|t| t.contains("flaky · 1"))
        },
    )
    .await;
    // A build is dropped as done while the failure is remembered.
    tokio::time::sleep(FLAKY_FAILED_TTL).await;
    browser
        .eval("document.querySelector('#dead tr[data-id] button.retry').click(); return null")
        .await;
    let metrics = format!("{}/metrics", gw.admin);
    let series =
        |text: &str, name: &str| tessera_tests::metric(text, &format!("{name}{{route=\"flaky\"}}"));
    eventually(
        "the retried letter builds",
        Duration::from_secs(10),
        || async {
            let text = http
                .get(&metrics)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            series(&text, "tessera_worker_builds_succeeded_total") == 1.0
        },
    )
    .await;
    let text = http
        .get(&metrics)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        series(&text, "tessera_builds_published_total"),
        1.0,
        "no other build"
    );
    let r = http.get(gw.at("/fragments/flaky")).send().await.unwrap();
    assert_eq!(r.status(), 200, "served as built by the retry");
    let left = http
        .get(format!("{}/dead-letters", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(
        left.json::<Vec<serde_json::Value>>().await.unwrap(),
        Vec::<serde_json::Value>::new()
    );
}

/// Clicks the dashboard's Re-queue button: the page's own POST (same origin, as the
/// browser says in `Origin` and `Sec-Fetch-Site`) must pass the cross-site check.
async fn requeue_from_the_page(browser: &Browser) {
    browser
        .eval("document.getElementById('requeue').click(); return null")
        .await;
    eventually("the re-queue answered", Duration::from_secs(10), || async {
        browser
            .eval("return document.getElementById('requeued').textContent")
            .await
            .as_str()
            .unwrap_or("")
            .starts_with("re-queued ")
    })
    .await;
}

/// A gzipped ESI page (as Django's `gzip_page` sends it) is composed, and reaches the
/// browser compressed again: smaller on the wire than in the page, every fragment filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzipped_esi_page_is_composed_and_arrives_compressed() {
    use std::io::Write;
    let up = FakeUpstream::start().await;
    let routes = vec![
        up.render("cart", 0, r#"<p id="cart">2 items in your cart</p>"#),
        up.render(
            "deals",
            400,
            r#"<ul id="deals"><li>Half-price tea</li></ul>"#,
        ),
    ];
    let rows: String = (1..=60).map(|i| format!("<li>Category {i}</li>")).collect();
    let html = format!(
        r#"<!doctype html><html><head><title>Gzipped and composed</title>{RECORDER}</head><body>
<h1>A gzipped page, composed</h1>
<section><esi:include src="/fragments/cart"/></section>
<section><esi:include src="/fragments/deals"/></section>
<ul>{rows}</ul>
</body></html>"#
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(html.as_bytes()).unwrap();
    up.script(
        "/",
        Script {
            body: Some(gz.finish().unwrap().into()),
            headers: vec![
                ("surrogate-control".into(), "content=\"ESI/1.0\"".into()),
                ("content-encoding".into(), "gzip".into()),
            ],
            ..Script::default()
        },
    );
    let gw = gateway(&up, routes).await;
    let warmed = tessera_tests::harness::client()
        .get(gw.at("/fragments/cart"))
        .header("prefer", "wait=5")
        .send()
        .await
        .unwrap();
    assert_eq!(warmed.status(), 200);
    let browser = Browser::start().await;

    let _one_at_a_time = BROWSER.lock().await;
    browser.open(&gw.at("/")).await;
    all_placeholders_filled(&browser).await;
    browser
        .screenshot(&artifact("composed-gzip-page.png"))
        .await;
    let text = browser.eval("return document.body.innerText").await;
    let text = text.as_str().unwrap();
    for expected in ["2 items in your cart", "Half-price tea", "Category 60"] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from {text:?}"
        );
    }
    assert!(!text.contains("esi:"), "no markup shown: {text:?}");
    let sizes = browser
        .eval(
            "const n = performance.getEntriesByType('navigation')[0]; \
             return [n.encodedBodySize, n.decodedBodySize]",
        )
        .await;
    let (encoded, decoded) = (sizes[0].as_u64().unwrap(), sizes[1].as_u64().unwrap());
    assert!(
        encoded > 0 && encoded * 2 < decoded,
        "the page arrived compressed: {encoded} bytes on the wire for {decoded}"
    );
}

/// Eight includes, and a `fetch` of `/api/cart` 300 ms after load, timed by the page.
fn eight_boxes_and_a_fetch() -> String {
    let boxes: String = (1..=8)
        .map(|i| format!(r#"<section><esi:include src="/fragments/f{i}"/></section>"#))
        .collect();
    format!(
        r#"<!doctype html><html><head><title>Eight slow fragments</title>{RECORDER}</head><body>
<h1>Eight slow fragments</h1>{boxes}
<script>
setTimeout(async () => {{
  const t0 = performance.now();
  await (await fetch('/api/cart')).text();
  window.__fetch = performance.now() - t0;
}}, 300);
</script></body></html>"#
    )
}

/// Issue 12's page, over HTTP/1.1: 8 placeholders whose fragments take 3 s, and the
/// page's own `fetch` at 300 ms. The placeholders share one push stream, so the fetch is
/// not queued behind them (it waited 2.9 s with a long-poll each) and every build starts
/// at once (the last two started 3 s late).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_slow_placeholders_share_one_connection() {
    let up = FakeUpstream::start().await;
    let routes: Vec<FragmentRoute> = (1..=8)
        .map(|i| {
            let mut r = up.render(&format!("f{i}"), 3_000, &format!("<p>fragment {i}</p>"));
            r.build_timeout = Duration::from_secs(10);
            r
        })
        .collect();
    up.script(
        "/api/cart",
        Script {
            body: Some("{\"items\":2}".to_string().into()),
            ..Script::default()
        },
    );
    serve_page(&up, "/", eight_boxes_and_a_fetch(), true);
    let mut c = config(&up.url(), routes);
    c.workers.embedded = 8;
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let browser = Browser::start().await;

    let _one_at_a_time = BROWSER.lock().await;
    browser.open(&gw.at("/")).await;
    eventually("all 8 filled", Duration::from_secs(10), || async {
        browser.eval("return window.__loads.length").await == 8
    })
    .await;
    browser
        .screenshot(&artifact("eight-placeholders-one-stream.png"))
        .await;
    let last = browser
        .eval("return Math.max(...window.__loads.map((l) => l.t))")
        .await
        .as_f64()
        .unwrap();
    let fetch = browser
        .eval("return window.__fetch")
        .await
        .as_f64()
        .unwrap();
    let resources = browser
        .eval(
            "return performance.getEntriesByType('resource').map((r) => new URL(r.name).pathname)",
        )
        .await;
    let paths: Vec<&str> = resources
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        paths.iter().filter(|p| **p == "/_tessera/stream").count(),
        1,
        "one stream for the page: {paths:?}"
    );
    assert!(
        !paths.iter().any(|p| p.starts_with("/fragments/")),
        "no long-poll per placeholder: {paths:?}"
    );
    assert!(last < 4_000.0, "all 8 filled {last} ms after navigation");
    assert!(fetch < 1_000.0, "the page's fetch took {fetch} ms");
    assert_eq!(browser.eval("return window.__errors.length").await, 0);
}

/// Where streams are refused (here `gateway.max_streams = 0`: every stream is a 503),
/// each placeholder long-polls its fragment instead, and the page fills all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholders_long_poll_when_streams_are_refused() {
    let up = FakeUpstream::start().await;
    let routes = vec![
        up.render("a", 300, r#"<p id="a">A</p>"#),
        up.render("b", 300, r#"<p id="b">B</p>"#),
    ];
    serve_page(
        &up,
        "/",
        format!(
            r#"<!doctype html><html><head><title>No streams</title>{RECORDER}</head><body>
<esi:include src="/fragments/a"/><esi:include src="/fragments/b"/></body></html>"#
        ),
        true,
    );
    let mut c = config(&up.url(), routes);
    c.gateway.max_streams = 0;
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let browser = Browser::start().await;

    let _one_at_a_time = BROWSER.lock().await;
    browser.open(&gw.at("/")).await;
    eventually(
        "both filled by long-polls",
        Duration::from_secs(10),
        || async { browser.eval("return window.__loads.length").await == 2 },
    )
    .await;
    let polled = browser
        .eval(
            "return performance.getEntriesByType('resource').filter((r) => new URL(r.name).pathname.startsWith('/fragments/')).length",
        )
        .await;
    assert!(polled.as_u64().unwrap() >= 2, "{polled}");
    assert_eq!(browser.eval("return window.__errors.length").await, 0);
}
