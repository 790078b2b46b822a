//! The admin listener: token, health, metrics after traffic, purges across gateways.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use reqwest::StatusCode;
use tessera_backends::amqp::AmqpBus;
use tessera_protocol::Config;
use tessera_tests::harness::{
    Backend, TestGateway, amqp_url, backends, client, config, memcached_addr, require_servers,
    route, text, unique_namespace,
};
use tessera_tests::upstream::{FakeUpstream, Script};
use tessera_tests::{eventually, metric};

const WITHIN: Duration = Duration::from_secs(15);

async fn wait_for(url: &str) -> reqwest::Response {
    client()
        .get(url)
        .header("prefer", "wait=5")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_token_guards_every_admin_endpoint() {
    let up = FakeUpstream::start().await;
    let mut c = config(&up.url(), vec![route("a")]);
    c.gateway.admin_token = "s3cret".into();
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/readyz"),
        ("DELETE", "/routes/a"),
        ("DELETE", "/tags/product-42"),
    ] {
        let url = format!("{}{path}", gw.admin);
        let r = client()
            .request(method.parse().unwrap(), &url)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {path} without a token"
        );
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        let r = client()
            .request(method.parse().unwrap(), &url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {path} with a wrong token"
        );
        let r = client()
            .request(method.parse().unwrap(), &url)
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{method} {path} with the token");
    }
    // Nothing admin is reachable on the public port: it is proxied to the upstream.
    client().get(gw.at("/metrics")).send().await.unwrap();
    assert_eq!(
        up.renders("/metrics"),
        1,
        "the public /metrics went to the upstream"
    );
}

#[tokio::test]
async fn health_and_readiness() {
    let up = FakeUpstream::start().await;
    let mut c = config(&up.url(), vec![]);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let r = client()
        .get(format!("{}/healthz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = client()
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"store": "ok", "bus": "ok"}));
}

/// A namespace whose default build queue already exists on the broker with another
/// namespace's arguments cannot queue builds: `/readyz` says so from start-up, before any
/// traffic, and turns ready by itself once the queue can be declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_a_build_queue_the_bus_cannot_declare() {
    require_servers();
    let ns = unique_namespace();
    let queue = format!("{ns}.build");
    // Another namespace took the name first, with its own dead-letter exchange; its
    // queues expire soon after it leaves.
    let first = format!("{ns}-first");
    AmqpBus::with_queue_expiry(&amqp_url(), &first, Some(Duration::from_secs(6)))
        .publish_raw(&queue, b"{}")
        .await
        .unwrap();
    let up = FakeUpstream::start().await;
    let c = Config::from_toml(&format!(
        "[upstream]\nurl = \"{}\"\n[store]\nnamespace = \"{ns}\"\nmemcached = [\"{}\"]\n\
         [bus]\namqp = \"{}\"\nqueue_expiry = \"10m\"\n[workers]\nembedded = 0\n\
         [[fragment]]\nname = \"news\"\nrender = \"/_render/news\"\n",
        up.url(),
        memcached_addr(),
        amqp_url(),
    ))
    .unwrap();
    let b = tessera_backends::connect(&c).await.unwrap();
    let gw = TestGateway::start(c, b).await;
    let readyz = format!("{}/readyz", gw.admin);
    let r = client().get(&readyz).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["store"], "ok");
    let bus = body["bus"].as_str().unwrap();
    assert!(
        bus.contains("PRECONDITION_FAILED") && bus.contains(&queue),
        "bus: {bus}"
    );
    eventually(
        "ready once the other namespace's queue expired",
        WITHIN,
        || {
            let readyz = readyz.clone();
            async move { client().get(&readyz).send().await.unwrap().status() == StatusCode::OK }
        },
    )
    .await;
    gw.stop().await;
}

// One scenario checking every family in turn: long by nature.
#[allow(clippy::too_many_lines)]
#[tokio::test]
async fn metrics_move_with_traffic() {
    let up = FakeUpstream::start().await;
    let mut c = config(&up.url(), vec![route("m")]);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let url = gw.at("/fragments/m");
    assert_eq!(
        client().get(&url).send().await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(wait_for(&url).await.status(), StatusCode::OK);
    for _ in 0..3 {
        assert_eq!(
            client().get(&url).send().await.unwrap().status(),
            StatusCode::OK
        );
    }
    client()
        .get(gw.at("/fragments/unknown-thing"))
        .send()
        .await
        .unwrap();
    let text = text(format!("{}/metrics", gw.admin)).await;
    assert!(
        metric(
            &text,
            r#"tessera_requests_total{route="m",cache="pending"}"#
        ) >= 1.0,
        "{text}"
    );
    // The long-poll counts as waited when it found the build still running.
    assert!(
        metric(&text, r#"tessera_requests_total{route="m",cache="hit"}"#)
            + metric(&text, r#"tessera_requests_total{route="m",cache="waited"}"#)
            >= 4.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"tessera_requests_total{route="",cache="error"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"tessera_builds_published_total{route="m"}"#),
        1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            r#"tessera_request_duration_seconds_count{route="m"}"#
        ) >= 5.0,
        "{text}"
    );
    assert!(
        text.lines().any(
            |l| l.starts_with("tessera_request_duration_seconds_bucket{")
                && l.contains(r#"le="0.001""#)
                && l.contains(r#"route="m""#)
        ),
        "{text}"
    );
    assert!(metric(&text, "tessera_l1_entries") >= 1.0, "{text}");
    assert_eq!(
        metric(&text, r#"tessera_builds_succeeded_total{route="m"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"tessera_queue_consumers{queue="tessera.build"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"tessera_queue_messages{queue="tessera.build"}"#),
        0.0,
        "{text}"
    );
    assert!(text.contains("tessera_queue_messages{"), "{text}");
    // The embedded workers' own figures, under the names a tessera-worker exports.
    assert_eq!(
        metric(&text, r#"tessera_worker_builds_succeeded_total{route="m"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"tessera_worker_build_duration_seconds_count{route="m"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "tessera_bus_reconnects_total"), 0.0, "{text}");
}

/// A fragment served once the build it waited for is done counts as `waited`, not as a
/// hit; every include of a composed page counts as one lookup, as the endpoint counts.
#[tokio::test]
async fn waited_answers_and_esi_includes_are_counted() {
    use tessera_tests::upstream::Script;
    let up = FakeUpstream::start().await;
    let html = |body: &str| Script {
        body: Some(body.to_string().into()),
        ..Script::default()
    };
    up.script(
        "/_render/slow",
        Script {
            delay: Duration::from_millis(300),
            ..html("<p>slow</p>")
        },
    );
    up.script("/_render/a", html("<p>a</p>"));
    up.script("/_render/b", html("<p>b</p>"));
    up.script(
        "/page",
        Script {
            headers: vec![("surrogate-control".into(), "content=\"ESI/1.0\"".into())],
            ..html(r#"<esi:include src="/fragments/a"/><esi:include src="/fragments/b"/>"#)
        },
    );
    let mut c = config(&up.url(), vec![route("slow"), route("a"), route("b")]);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let scrape = || text(format!("{}/metrics", gw.admin));
    let count = |text: &str, route: &str, cache: &str| {
        metric(
            text,
            &format!(r#"tessera_requests_total{{route="{route}",cache="{cache}"}}"#),
        )
    };

    // Cold, and asked to wait: answered once built, 300 ms later.
    assert_eq!(
        wait_for(&gw.at("/fragments/slow")).await.status(),
        StatusCode::OK
    );
    let m = scrape().await;
    assert_eq!(count(&m, "slow", "waited"), 1.0, "{m}");
    assert_eq!(count(&m, "slow", "hit"), 0.0, "{m}");
    assert_eq!(count(&m, "slow", "pending"), 0.0, "{m}");

    // A cold page: both includes are looked up and found pending.
    let page = text(gw.at("/page")).await;
    assert_eq!(page.matches("data-tessera-src").count(), 2, "{page}");
    let m = scrape().await;
    assert_eq!(count(&m, "a", "pending"), 1.0, "{m}");
    assert_eq!(count(&m, "b", "pending"), 1.0, "{m}");
    eventually("both includes are built", WITHIN, || async {
        let m = scrape().await;
        metric(&m, r#"tessera_builds_succeeded_total{route="a"}"#) == 1.0
            && metric(&m, r#"tessera_builds_succeeded_total{route="b"}"#) == 1.0
    })
    .await;
    // Warm: both are hits.
    assert_eq!(text(gw.at("/page")).await, "<p>a</p><p>b</p>");
    let m = scrape().await;
    assert_eq!(count(&m, "a", "hit"), 1.0, "{m}");
    assert_eq!(count(&m, "b", "hit"), 1.0, "{m}");
    assert_eq!(
        metric(&m, r#"tessera_request_duration_seconds_count{route="a"}"#),
        2.0,
        "{m}"
    );
    gw.stop().await;
}

/// The dashboard's worker count: an embedded gateway's build tasks, not the one consumer
/// per queue the in-process bus reports; with RabbitMQ, the broker's consumers.
#[tokio::test]
async fn the_status_counts_workers() {
    let up = FakeUpstream::start().await;
    for (kind, want) in [
        (
            Backend::Memory,
            serde_json::json!({"kind": "embedded", "count": 4}),
        ),
        (
            Backend::Real,
            serde_json::json!({"kind": "broker", "count": 1}),
        ),
    ] {
        let mut c = config(&up.url(), vec![route("w")]);
        assert_eq!(c.workers.embedded, 4);
        let b = backends(kind, &mut c).await;
        let gw = TestGateway::start(c, b).await;
        let status = format!("{}/api/status", gw.admin);
        eventually(&format!("{kind:?}: workers {want}"), WITHIN, || async {
            let r = client().get(&status).send().await.unwrap();
            r.json::<serde_json::Value>().await.unwrap()["workers"] == want
        })
        .await;
        gw.stop().await;
    }
}

/// `promtool`'s path: `PROMTOOL`, else the one on `PATH`. Panics with install
/// instructions when there is none: the lint must not be skipped silently.
fn promtool() -> std::path::PathBuf {
    let found = std::env::var_os("PROMTOOL")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|dir| dir.join("promtool"))
                .find(|p| p.is_file())
        });
    found.unwrap_or_else(|| {
        panic!(
            "promtool not found (PROMTOOL or PATH): run `bash scripts/test.sh` (it installs \
             Debian's prometheus package) or `apt-get install -y prometheus`"
        )
    })
}

/// Runs `promtool check metrics` on `exposition`: its exit status and what it said.
fn promtool_check(exposition: &str) -> (std::process::ExitStatus, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, said)
}

/// `/metrics` as a plain scraper (or an operator with curl) reads it passes Prometheus's
/// own lint, with every family carrying samples: hits, placeholders, errors, builds done
/// and failed. OpenMetrics is served to those that ask for it.
#[tokio::test]
async fn metrics_pass_promtool_and_openmetrics_is_served_on_request() {
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/broken",
        tessera_tests::upstream::Script {
            then: Some(404),
            ..Default::default()
        },
    );
    let mut c = config(&up.url(), vec![route("m"), route("broken")]);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let url = gw.at("/fragments/m");
    client().get(&url).send().await.unwrap();
    assert_eq!(wait_for(&url).await.status(), StatusCode::OK);
    client().get(&url).send().await.unwrap();
    wait_for(&gw.at("/fragments/broken")).await;
    client().get(gw.at("/fragments/nope")).send().await.unwrap();

    // As curl asks (`*/*`), and as Prometheus does.
    let metrics = format!("{}/metrics", gw.admin);
    let scrape = |accept: &'static str| {
        let request = client().get(&metrics).header("accept", accept);
        async move { request.send().await.unwrap() }
    };
    let answer = scrape("*/*").await;
    assert_eq!(
        answer.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let exposition = answer.text().await.unwrap();
    assert!(
        metric(
            &exposition,
            r#"tessera_builds_failed_total{route="broken"}"#
        ) >= 1.0,
        "{exposition}"
    );
    let (status, said) = promtool_check(&exposition);
    assert!(
        status.success(),
        "promtool check metrics failed ({status}):\n{said}\n--- exposition:\n{exposition}"
    );

    let answer = scrape(
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    )
    .await;
    assert!(
        answer.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        answer.headers()
    );
    assert!(answer.text().await.unwrap().ends_with("# EOF\n"));
    gw.stop().await;
}

#[tokio::test]
async fn a_purged_fragment_is_never_served_again() {
    let up = FakeUpstream::start().await;
    let mut r = route("p");
    r.params = vec!["id".into()];
    let mut c = config(&up.url(), vec![r]);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let url = gw.at("/fragments/p?id=1");
    assert_eq!(wait_for(&url).await.status(), StatusCode::OK);
    assert_eq!(
        wait_for(&gw.at("/fragments/p?id=2")).await.status(),
        StatusCode::OK
    );
    let r = client()
        .delete(format!("{}/fragments/p?id=1", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["deleted"],
        true
    );
    let after = client().get(&url).send().await.unwrap();
    assert_eq!(
        after.status(),
        StatusCode::ACCEPTED,
        "not served, not even stale"
    );
    assert_eq!(
        client()
            .get(gw.at("/fragments/p?id=2"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK,
        "others stay"
    );
    eventually("rebuilt after the purge", WITHIN, || async {
        wait_for(&url).await.status() == StatusCode::OK
    })
    .await;
    assert_eq!(up.renders("/_render/p"), 3);
}

#[tokio::test]
async fn purging_a_route_reaches_every_gateway() {
    let up = FakeUpstream::start().await;
    let mut r = route("news");
    r.params = vec!["page".into()];
    let mut c = config(&up.url(), vec![r]);
    c.cache.ttl = Duration::from_secs(60); // only events can evict L1 in time
    let b = backends(Backend::Memory, &mut c).await;
    let one = TestGateway::start(c.clone(), b.clone()).await;
    let two = TestGateway::start(c, b).await;
    for page in 1..=3 {
        assert_eq!(
            wait_for(&one.at(&format!("/fragments/news?page={page}")))
                .await
                .status(),
            StatusCode::OK
        );
        // Both gateways hold it in L1 now.
        assert_eq!(
            client()
                .get(two.at(&format!("/fragments/news?page={page}")))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
    }
    // From now on the upstream renders new content: anything else is the purged copy.
    up.script(
        "/_render/news",
        tessera_tests::upstream::Script {
            body: Some("<p>v2</p>".into()),
            ..Default::default()
        },
    );
    let r = client()
        .delete(format!("{}/routes/news", one.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let purged_at = r.json::<serde_json::Value>().await.unwrap()["generation"]
        .as_u64()
        .unwrap();
    assert!(purged_at > 0);
    // A 202 (rebuilding) or a 200 with the new content are right; the old content never.
    let old_content_served = |gw: &TestGateway, page: u32| {
        let url = gw.at(&format!("/fragments/news?page={page}"));
        async move {
            let r = client().get(url).send().await.unwrap();
            r.status() == StatusCode::OK && r.text().await.unwrap() != "<p>v2</p>"
        }
    };
    eventually("the other gateway forgets the route", WITHIN, || async {
        !old_content_served(&two, 1).await
    })
    .await;
    for page in 1..=3 {
        for gw in [&one, &two] {
            assert!(
                !old_content_served(gw, page).await,
                "page {page} served from before its route was purged"
            );
        }
    }
}

#[tokio::test]
async fn unknown_admin_paths_and_routes_are_problems() {
    let up = FakeUpstream::start().await;
    let mut c = config(&up.url(), vec![]);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let r = client()
        .delete(format!("{}/routes/none", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = client()
        .get(format!("{}/nothing-here", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}

/// A gateway whose admin listener needs `s3cret`, with a route `a`.
async fn guarded_gateway(up: &FakeUpstream) -> TestGateway {
    let mut c = config(&up.url(), vec![route("a")]);
    c.gateway.admin_token = "s3cret".into();
    let b = backends(Backend::Memory, &mut c).await;
    TestGateway::start(c, b).await
}

/// `method path` on the admin listener with HTTP Basic (as a browser resends it by
/// itself) and `headers`.
async fn admin_request(
    gw: &TestGateway,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
) -> reqwest::Response {
    let mut r = client()
        .request(method.parse().unwrap(), format!("{}{path}", gw.admin))
        .basic_auth("admin", Some("s3cret"));
    for (name, value) in headers {
        r = r.header(*name, value);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn cross_site_state_changes_are_refused() {
    let up = FakeUpstream::start().await;
    let gw = guarded_gateway(&up).await;
    let hostile: [&[(&str, String)]; 6] = [
        &[("origin", "http://evil.example".into())],
        &[("origin", "null".into())],
        &[("origin", gw.admin.replace("127.0.0.1", "localhost"))],
        &[("sec-fetch-site", "cross-site".into())],
        &[("sec-fetch-site", "same-site".into())],
        &[("referer", "http://evil.example/page".into())],
    ];
    for (method, path) in [
        ("POST", "/dead-letters/requeue"),
        ("DELETE", "/routes/a"),
        ("DELETE", "/fragments/a"),
        ("DELETE", "/tags/product-42"),
    ] {
        for headers in hostile {
            let r = admin_request(&gw, method, path, headers).await;
            assert_eq!(
                r.status(),
                StatusCode::FORBIDDEN,
                "{method} {path} with {headers:?}"
            );
            assert_eq!(r.headers()["content-type"], "application/problem+json");
            let problem: serde_json::Value = r.json().await.unwrap();
            assert_eq!(problem["code"], "cross_site", "{problem}");
        }
    }
    // Reading stays possible: a cross-site page cannot read the answer anyway (no CORS).
    let r = admin_request(&gw, "GET", "/metrics", hostile[0]).await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn same_origin_and_scripted_state_changes_still_work() {
    let up = FakeUpstream::start().await;
    let gw = guarded_gateway(&up).await;
    let same_origin: [&[(&str, String)]; 5] = [
        &[],
        &[("origin", gw.admin.clone())],
        &[
            ("origin", gw.admin.clone()),
            ("sec-fetch-site", "same-origin".into()),
        ],
        &[("sec-fetch-site", "none".into())],
        &[("referer", format!("{}/", gw.admin))],
    ];
    for headers in same_origin {
        for (method, path) in [("POST", "/dead-letters/requeue"), ("DELETE", "/routes/a")] {
            let r = admin_request(&gw, method, path, headers).await;
            assert_eq!(
                r.status(),
                StatusCode::OK,
                "{method} {path} with {headers:?}"
            );
        }
    }
}

#[tokio::test]
async fn the_dashboard_cannot_be_framed_or_run_foreign_code() {
    let up = FakeUpstream::start().await;
    let gw = guarded_gateway(&up).await;
    let r = admin_request(&gw, "GET", "/", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "frame-ancestors 'none'",
        "connect-src 'self'",
    ] {
        assert!(csp.contains(directive), "{directive} missing in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    // Every script and style the page uses is a file the policy allows ('self').
    let html = r.text().await.unwrap();
    assert!(!html.contains("<style"), "inline style");
    for (tag, asset, content_type) in [
        (
            "<script src=\"dashboard.js\"",
            "/dashboard.js",
            "text/javascript; charset=utf-8",
        ),
        (
            "<link rel=\"stylesheet\" href=\"dashboard.css\"",
            "/dashboard.css",
            "text/css; charset=utf-8",
        ),
    ] {
        assert!(html.contains(tag), "{tag} missing");
        let r = admin_request(&gw, "GET", asset, &[]).await;
        assert_eq!(r.status(), StatusCode::OK, "{asset}");
        assert_eq!(r.headers()["content-type"], content_type);
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    }
    assert_eq!(
        html.matches("<script").count(),
        1,
        "one script, no inline one"
    );
}

#[tokio::test]
async fn the_auth_scheme_is_case_insensitive_and_healthz_is_open() {
    let up = FakeUpstream::start().await;
    let gw = guarded_gateway(&up).await;
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let r = client()
            .get(format!("{}/metrics", gw.admin))
            .header("authorization", format!("{scheme} s3cret"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{scheme}");
    }
    let r = client()
        .get(format!("{}/metrics", gw.admin))
        .header("authorization", "basic YWRtaW46czNjcmV0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "lower-case basic");
    // Probes need no token for liveness; everything else still does.
    let r = client()
        .get(format!("{}/healthz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "ok\n");
    let r = client()
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

/// `DELETE /tags/{tag}`: a valid tag is purged (and counted), a name that cannot be a tag
/// is a 400 naming the rule, no name at all a 404.
#[tokio::test]
async fn tag_purges_check_the_name_and_are_counted() {
    let up = FakeUpstream::start().await;
    let gw = guarded_gateway(&up).await;
    let r = admin_request(&gw, "DELETE", "/tags/product-42", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["tag"], "product-42");
    assert!(body["purged_at"].as_u64().unwrap() > 1_600_000_000_000);
    // Percent-encoded token characters are tags too.
    let r = admin_request(&gw, "DELETE", "/tags/50%25-off", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["tag"],
        "50%-off"
    );

    let too_long = format!("/tags/{}", "x".repeat(129));
    for bad in ["/tags/a%2Fb", "/tags/a:b", "/tags/a%20b", &too_long] {
        let r = admin_request(&gw, "DELETE", bad, &[]).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        let problem: serde_json::Value = r.json().await.unwrap();
        assert_eq!(problem["code"], "bad_tag", "{problem}");
    }
    assert_eq!(
        admin_request(&gw, "DELETE", "/tags/", &[]).await.status(),
        StatusCode::NOT_FOUND
    );

    let metrics = admin_request(&gw, "GET", "/metrics", &[])
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "# HELP tessera_tag_purges_total Tag purges made through this gateway's admin API."
        ) && metrics.contains("tessera_tag_purges_total 2"),
        "{metrics}"
    );
    gw.stop().await;
}

/// A page on another origin whose name is re-pointed at 127.0.0.1 (DNS rebinding) reaches
/// the admin listener with its own name in `Host`: without a token the listener answers
/// only its loopback names, reads and state changes alike.
#[tokio::test]
async fn a_rebound_name_cannot_reach_an_admin_listener_without_a_token() {
    let up = FakeUpstream::start().await;
    let mut c = config(&up.url(), vec![route("a")]);
    c.gateway.admin_token = String::new();
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let port = gw.admin.rsplit(':').next().unwrap().to_string();
    let evil = format!("evil.example:{port}");
    for (method, path) in [
        ("GET", "/dead-letters"),
        ("GET", "/api/status"),
        ("GET", "/metrics"),
        ("DELETE", "/routes/a"),
        ("POST", "/dead-letters/requeue"),
    ] {
        let r = client()
            .request(method.parse().unwrap(), format!("{}{path}", gw.admin))
            .header("host", &evil)
            .header("origin", format!("http://{evil}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{method} {path}");
        let problem: serde_json::Value = r.json().await.unwrap();
        assert_eq!(problem["code"], "bad_host", "{problem}");
    }
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let r = client()
            .delete(format!("{}/routes/a", gw.admin))
            .header("host", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{host}");
    }
    let probe = client()
        .get(format!("{}/healthz", gw.admin))
        .header("host", &evil)
        .send()
        .await
        .unwrap();
    assert_eq!(probe.status(), StatusCode::OK, "probes name no host");
    gw.stop().await;
}

/// A dead letter of a route that varies on a session cookie and a bearer token shows
/// neither, on the admin API and in the dashboard's status; two users stay apart.
#[tokio::test]
async fn dead_letters_show_no_vary_value() {
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/private",
        Script {
            then: Some(500),
            ..Script::default()
        },
    );
    let mut private = route("private");
    // Failed for good at once: dead-lettered.
    private.max_attempts = 1;
    private.vary = vec![
        "cookie:session".parse().unwrap(),
        "header:authorization".parse().unwrap(),
    ];
    let mut c = config(&up.url(), vec![private]);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    for user in ["alice", "bob"] {
        let r = client()
            .get(gw.at("/fragments/private"))
            .header("cookie", format!("session=s3cret-{user}"))
            .header("authorization", format!("Bearer t0ken-{user}"))
            .header("prefer", "wait=5")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "the render fails");
    }
    let dead = format!("{}/dead-letters", gw.admin);
    eventually(
        "both builds are dead-lettered",
        Duration::from_secs(10),
        || async { text(&dead).await.matches("\"queue\"").count() == 2 },
    )
    .await;
    for shown in [
        text(&dead).await,
        text(format!("{}/api/status", gw.admin)).await,
    ] {
        for secret in ["s3cret", "t0ken"] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        assert!(shown.contains("cookie:session"), "{shown}");
    }
    let letters: Vec<serde_json::Value> = serde_json::from_str(&text(&dead).await).unwrap();
    let bodies: Vec<&str> = letters
        .iter()
        .map(|l| l["body"].as_str().unwrap())
        .collect();
    assert_ne!(bodies[0], bodies[1], "two users are told apart");
    gw.stop().await;
}

/// Issue 32: dead letters carry an id, route, fragment, attempts, error and time, and
/// are retried or discarded one by one or a route at a time.
#[tokio::test]
async fn dead_letters_are_retried_and_discarded_by_id_or_route() {
    let up = FakeUpstream::start().await;
    let mut routes = Vec::new();
    for name in ["a", "b"] {
        up.script(
            &format!("/_render/{name}"),
            Script {
                then: Some(503),
                ..Script::default()
            },
        );
        let mut r = route(name);
        r.max_attempts = 1;
        r.params = vec!["id".into()];
        routes.push(r);
    }
    let mut c = config(&up.url(), routes);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    for path in [
        "/fragments/a?id=1",
        "/fragments/a?id=2",
        "/fragments/b?id=1",
    ] {
        let r = client().get(gw.at(path)).header("prefer", "wait=5").send();
        assert_eq!(r.await.unwrap().status(), StatusCode::BAD_GATEWAY);
    }
    let dead = format!("{}/dead-letters", gw.admin);
    let list =
        || async { serde_json::from_str::<Vec<serde_json::Value>>(&text(&dead).await).unwrap() };
    eventually("three dead letters", Duration::from_secs(10), || async {
        list().await.len() == 3
    })
    .await;
    let letters = list().await;
    let first = letters.iter().find(|l| l["fragment"] == "a?id=1").unwrap();
    assert_eq!(first["route"], "a");
    assert_eq!(first["attempts"], 1);
    assert!(first["error"].as_str().unwrap().contains("503"), "{first}");
    assert!(first["time"].as_u64().unwrap() > 0);
    let call = |method: reqwest::Method, path: String| {
        let url = format!("{}{path}", gw.admin);
        async move { client().request(method, url).send().await.unwrap() }
    };
    let id = first["id"].as_str().unwrap();
    let r = call(reqwest::Method::DELETE, format!("/dead-letters/{id}")).await;
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["discarded"], 1);
    let again = call(reqwest::Method::DELETE, format!("/dead-letters/{id}")).await;
    assert_eq!(again.status(), StatusCode::NOT_FOUND, "gone");
    let r = call(reqwest::Method::POST, "/dead-letters/retry?route=a".into()).await;
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["retried"], 1);
    let r = call(reqwest::Method::DELETE, "/dead-letters".into()).await;
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "discarding all needs a route"
    );
    let left = list().await;
    assert_eq!(left.len(), 1, "a's retried letter left the list: {left:?}");
    assert_eq!(left[0]["route"], "b");
    let r = call(reqwest::Method::DELETE, "/dead-letters?route=b".into()).await;
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["discarded"], 1);
    assert!(list().await.is_empty());
    gw.stop().await;
}
