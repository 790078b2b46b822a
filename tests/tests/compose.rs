//! ESI composition of upstream pages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use tessera_protocol::FragmentRoute;
use tessera_tests::counting::{Calls, CountingStore};
use tessera_tests::eventually;
use tessera_tests::harness::{Backend, TestGateway, backends, client, config, route};
use tessera_tests::upstream::{FakeUpstream, Script};

const ESI: (&str, &str) = ("surrogate-control", "content=\"ESI/1.0\"");

fn page(up: &FakeUpstream, path: &str, html: &str) {
    up.script(
        path,
        Script {
            body: Some(html.to_string().into()),
            headers: vec![(ESI.0.into(), ESI.1.into())],
            ..Script::default()
        },
    );
}

fn fragment(up: &FakeUpstream, name: &str, html: &str) {
    up.script(
        &format!("/_render/{name}"),
        Script {
            body: Some(html.to_string().into()),
            ..Script::default()
        },
    );
}

/// `l1` includes `l2` includes `l3` includes `l4`, each asking for ESI: one level more
/// than the depth limit allows.
fn nested_fragments(up: &FakeUpstream) -> Vec<FragmentRoute> {
    esi_fragment(up, "l1", r#"<b>1</b><esi:include src="/fragments/l2"/>"#);
    esi_fragment(up, "l2", r#"<b>2</b><esi:include src="/fragments/l3"/>"#);
    esi_fragment(up, "l3", r#"<b>3</b><esi:include src="/fragments/l4"/>"#);
    fragment(up, "l4", "<b>4</b>");
    ["l1", "l2", "l3", "l4"].map(route).to_vec()
}

/// What the levels of [`nested_fragments`] compose to, after the page's `[`.
const LEVELS: &str = "[<b>1</b><b>2</b><b>3</b>";

/// A fragment whose render asks for ESI processing, as pages do.
fn esi_fragment(up: &FakeUpstream, name: &str, html: &str) {
    up.script(
        &format!("/_render/{name}"),
        Script {
            body: Some(html.to_string().into()),
            headers: vec![(ESI.0.into(), ESI.1.into())],
            ..Script::default()
        },
    );
}

/// A route that varies on the `sid` cookie.
fn per_user(name: &str) -> FragmentRoute {
    let mut r = route(name);
    r.vary = vec!["cookie:sid".parse().unwrap()];
    r
}

async fn start(up: &FakeUpstream, routes: Vec<FragmentRoute>) -> (TestGateway, Arc<Calls>) {
    let mut c = config(&up.url(), routes);
    let mut b = backends(Backend::Memory, &mut c).await;
    let (store, calls) = CountingStore::wrap(b.store.clone());
    b.store = store;
    (TestGateway::start(c, b).await, calls)
}

async fn text(url: &str) -> (reqwest::header::HeaderMap, String) {
    let r = client().get(url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    (r.headers().clone(), r.text().await.unwrap())
}

#[tokio::test]
async fn every_esi_form_is_composed() {
    let up = FakeUpstream::start().await;
    page(
        &up,
        "/",
        r#"<html><body><h1>Shop</h1><esi:include src="/fragments/box"/><esi:remove><p>NO-ESI</p></esi:remove><!--esi <p>ESI-ONLY</p> --><esi:include src="/fragments/gone" alt="/fragments/box" onerror="continue"/></body></html>"#,
    );
    fragment(&up, "box", "<b>BOX</b>");
    up.script(
        "/_render/gone",
        Script {
            then: Some(404),
            ..Script::default()
        },
    );
    let (gw, _) = start(&up, vec![route("box"), route("gone")]).await;

    let (headers, cold) = text(&gw.at("/")).await;
    assert!(
        !headers.contains_key("surrogate-control"),
        "Surrogate-Control is not for clients"
    );
    assert!(
        cold.contains(r#"data-tessera-src="/fragments/box""#),
        "{cold}"
    );
    assert!(cold.contains("tessera-loading"), "the route's placeholder");
    assert_eq!(
        cold.matches("/_tessera/client.js").count(),
        1,
        "script injected once: {cold}"
    );
    assert!(!cold.contains("NO-ESI") && cold.contains("<p>ESI-ONLY</p>"));
    assert!(
        !cold.contains("esi:"),
        "no ESI markup reaches the client: {cold}"
    );

    eventually(
        "both fragments are built",
        Duration::from_secs(15),
        || async {
            let (_, warm) = text(&gw.at("/")).await;
            !warm.contains("data-tessera-src")
        },
    )
    .await;
    let (headers, warm) = text(&gw.at("/")).await;
    assert_eq!(
        warm.matches("<b>BOX</b>").count(),
        2,
        "include and alt both filled: {warm}"
    );
    assert!(
        !warm.contains("client.js"),
        "no script when nothing is pending"
    );
    assert_eq!(headers["content-length"], warm.len().to_string());
    assert_eq!(up.renders("/_render/box"), 1);
}

#[tokio::test]
async fn onerror_continue_drops_a_failed_include() {
    let up = FakeUpstream::start().await;
    page(
        &up,
        "/",
        r#"<p>a</p><esi:include src="/fragments/bad" onerror="continue"/><p>b</p>"#,
    );
    up.script(
        "/_render/bad",
        Script {
            then: Some(404),
            ..Script::default()
        },
    );
    let (gw, _) = start(&up, vec![route("bad")]).await;
    text(&gw.at("/")).await;
    eventually(
        "the failed include is dropped",
        Duration::from_secs(15),
        || async { text(&gw.at("/")).await.1 == "<p>a</p><p>b</p>" },
    )
    .await;
}

#[tokio::test]
async fn only_configured_routes_are_ever_fetched() {
    let up = FakeUpstream::start().await;
    page(
        &up,
        "/",
        r#"<esi:include src="http://127.0.0.1:1/steal"/><esi:include src="/_render/box"/><esi:include src="/fragments/nope"/><esi:include src="/fragments/box"/>"#,
    );
    let (gw, _) = start(&up, vec![route("box")]).await;
    let (_, body) = text(&gw.at("/")).await;
    assert_eq!(
        body.matches("<!-- tessera: include of").count(),
        3,
        "{body}"
    );
    assert!(body.contains("data-tessera-src=\"/fragments/box\""));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        up.renders("/_render/box"),
        1,
        "the configured route is built once"
    );
    assert_eq!(up.renders("/steal"), 0);
}

#[tokio::test]
async fn fragments_may_include_fragments_up_to_the_depth_limit() {
    let up = FakeUpstream::start().await;
    page(&up, "/", r#"<p>[<esi:include src="/fragments/l1"/>]</p>"#);
    let routes = nested_fragments(&up);
    let (gw, _) = start(&up, routes).await;
    eventually(
        "three levels are composed",
        Duration::from_secs(15),
        || async {
            let body = text(&gw.at("/")).await.1;
            body.starts_with(&format!("<p>{LEVELS}"))
        },
    )
    .await;
    let (_, body) = text(&gw.at("/")).await;
    assert_eq!(
        body,
        format!("<p>{LEVELS}<!-- tessera: depth limit reached -->]</p>")
    );
    assert_eq!(
        up.renders("/_render/l4"),
        0,
        "nothing is built past the limit"
    );
}

/// The fragment endpoint composes a fragment's includes as a page would: the client
/// script inserts what it answers, so a raw `<esi:include>` there would be a dead tag.
#[tokio::test]
async fn the_fragment_endpoint_composes_nested_includes_with_the_same_limit() {
    let up = FakeUpstream::start().await;
    let routes = nested_fragments(&up);
    let (gw, _) = start(&up, routes).await;
    let url = gw.at("/fragments/l1");
    eventually(
        "the nested includes are built",
        Duration::from_secs(15),
        || async {
            let r = client().get(&url).send().await.unwrap();
            r.status() == StatusCode::OK && r.text().await.unwrap().starts_with(&LEVELS[1..])
        },
    )
    .await;
    let (headers, body) = text(&url).await;
    // Level 1 of a page, as when the page composed it: the same depth limit.
    assert_eq!(
        body,
        format!("{}<!-- tessera: depth limit reached -->", &LEVELS[1..])
    );
    assert_eq!(
        up.renders("/_render/l4"),
        0,
        "nothing is built past the limit"
    );
    // Its validator is the composed body's, so an include's change is seen.
    let etag = headers["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, tessera_protocol::envelope::etag_of(body.as_bytes()));
    let again = client()
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
}

/// Only a render that asked for ESI is composed: markup in any other fragment (user
/// input it reflects, say) is left as text and never builds anything.
#[tokio::test]
async fn fragments_that_did_not_ask_for_esi_are_not_composed() {
    let up = FakeUpstream::start().await;
    page(&up, "/", r#"<p>[<esi:include src="/fragments/echo"/>]</p>"#);
    let reflected = r#"<i>hi</i> <esi:include src="/fragments/secret"/>"#;
    fragment(&up, "echo", reflected);
    fragment(&up, "secret", "s");
    let (gw, _) = start(&up, vec![route("echo"), route("secret")]).await;
    eventually("the fragment is built", Duration::from_secs(15), || async {
        text(&gw.at("/")).await.1.starts_with("<p>[<i>hi")
    })
    .await;
    assert_eq!(text(&gw.at("/")).await.1, format!("<p>[{reflected}]</p>"));
    assert_eq!(text(&gw.at("/fragments/echo")).await.1, reflected);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        up.renders("/_render/secret"),
        0,
        "the reflected include built nothing"
    );
}

/// Every form Varnish drops as an ESI error (e00008.vtc and the differential run of issue
/// 13) is removed: no ESI markup reaches the client, the text around it is kept, and each
/// malformed include becomes a comment, as a refused one does.
#[tokio::test]
async fn malformed_markup_is_removed_as_varnish_removes_it() {
    let up = FakeUpstream::start().await;
    let html = concat!(
        "<p>a</p><esi:remove><![CDATA[</esi:remove>]]>NO-ESI</esi:remove>",
        "<p>b</p><esi:comment text=\"note\"/><esi:bogosity/><esi:choose>",
        "<p>c</p><esi:remove><esi:remove>NO-ESI</esi:remove></esi:remove></esi:foo></esi:include>",
        "<p>d</p><esi:include/><esi:include src=\"\"/><esi:include src=/fragments/box/>",
        "<esi:include src= \"/fragments/box\"/><esi:include src=\"/fragments/box />",
        "<p>e</p><esi:include alt=\"/fragments/box\" src",
    );
    page(&up, "/", html);
    let (gw, _) = start(&up, vec![route("box")]).await;
    let (_, body) = text(&gw.at("/")).await;
    let malformed = "<!-- tessera: malformed include removed";
    assert_eq!(body.matches(malformed).count(), 6, "{body}");
    assert!(!body.contains("esi:") && !body.contains("NO-ESI"), "{body}");
    assert!(
        !body.contains("data-tessera-src"),
        "nothing included: {body}"
    );
    assert!(
        body.starts_with("<p>a</p><p>b</p><p>c</p><p>d</p><!--"),
        "text kept: {body}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(up.renders("/_render/box"), 0, "nothing malformed is built");
}

/// A response whose first non-blank byte is not `<` is not XML to Varnish and is not
/// composed (e00008.vtc: its `/body` fragment comes out with its `<esi:remove>` as it was).
#[tokio::test]
async fn a_page_that_starts_with_text_is_composed_too() {
    let up = FakeUpstream::start().await;
    let html = r#"Included file <esi:remove>gone</esi:remove><esi:include src="/fragments/box"/>"#;
    page(&up, "/", html);
    fragment(&up, "box", "<b>BOX</b>");
    let (gw, _) = start(&up, vec![route("box")]).await;
    let (_, cold) = text(&gw.at("/")).await;
    assert!(
        cold.starts_with("Included file <div") && !cold.contains("esi:") && !cold.contains("gone"),
        "composed, as Varnish with esi_disable_xml_check: {cold}"
    );
    eventually("the include is built", Duration::from_secs(10), || async {
        text(&gw.at("/")).await.1 == "Included file <b>BOX</b>"
    })
    .await;
}

/// A relative `src` is resolved against the page's path, and an absolute one naming the
/// host the page was asked of is this gateway (e00005.vtc, e00006.vtc); any other host
/// stays refused.
#[tokio::test]
async fn relative_and_own_host_includes_are_composed() {
    let up = FakeUpstream::start().await;
    fragment(&up, "box", "<b>BOX</b>");
    let mut item = route("item");
    item.params = vec!["id".into()];
    let (gw, _) = start(&up, vec![route("box"), item]).await;
    let host = gw.url.trim_start_matches("http://");
    let html = format!(
        concat!(
            r#"<p>[<esi:include src="../fragments/box"/>]"#,
            r#"[<esi:include src="./../fragments/item?id=2&amp;x=1"/>]"#,
            r#"[<esi:include src="http://{host}/fragments/./item?id=3"/>]"#,
            r#"[<esi:include src="http://elsewhere.invalid/fragments/box"/>]</p>"#,
        ),
        host = host
    );
    page(&up, "/shop/cart", &html);
    let url = gw.at("/shop/cart");
    eventually(
        "the includes are built",
        Duration::from_secs(15),
        || async { !text(&url).await.1.contains("data-tessera-src") },
    )
    .await;
    let (_, body) = text(&url).await;
    assert_eq!(
        body,
        "<p>[<b>BOX</b>][<p>/_render/item?id=2 cookie=[]</p>][<p>/_render/item?id=3 cookie=[]</p>][<!-- tessera: include of \"http://elsewhere.invalid/fragments/box\" refused: not a fragment route -->]</p>"
    );
}

/// A fragment composed at its endpoint resolves a relative `src` against its own path.
#[tokio::test]
async fn a_fragment_resolves_relative_includes_against_its_own_path() {
    let up = FakeUpstream::start().await;
    esi_fragment(&up, "list", r#"<ul><esi:include src="item?id=1"/></ul>"#);
    let mut item = route("item");
    item.params = vec!["id".into()];
    let (gw, _) = start(&up, vec![route("list"), item]).await;
    let url = gw.at("/fragments/list");
    eventually("the include is built", Duration::from_secs(15), || async {
        let r = client().get(&url).send().await.unwrap();
        r.status() == StatusCode::OK && r.text().await.unwrap().contains("/_render/item")
    })
    .await;
    assert_eq!(
        text(&url).await.1,
        "<ul><p>/_render/item?id=1 cookie=[]</p></ul>"
    );
}

#[tokio::test]
async fn fifty_includes_cost_one_multi_get() {
    let up = FakeUpstream::start().await;
    let includes: String = (0..50)
        .map(|i| format!(r#"<esi:include src="/fragments/item?id={i}"/>"#))
        .collect();
    page(&up, "/", &includes);
    let mut item = route("item");
    item.params = vec!["id".into()];
    let mut c = config(&up.url(), vec![item]);
    c.cache.capacity = bytesize(0); // L1 off: every lookup reaches the store
    let mut b = backends(Backend::Memory, &mut c).await;
    let (store, calls) = CountingStore::wrap(b.store.clone());
    b.store = store;
    let gw = TestGateway::start(c, b).await;

    let (_, cold) = text(&gw.at("/")).await;
    assert_eq!(cold.matches("data-tessera-src").count(), 50);
    assert_eq!(
        Calls::read(&calls.get_many),
        1,
        "one multi-get for the page"
    );
    assert_eq!(Calls::read(&calls.get_many_keys), 50);
    assert_eq!(
        Calls::read(&calls.lease_adds),
        50,
        "one lease each, nothing queued twice"
    );

    eventually("all 50 are built", Duration::from_secs(20), || async {
        !text(&gw.at("/")).await.1.contains("data-tessera-src")
    })
    .await;
    calls.reset();
    let (_, warm) = text(&gw.at("/")).await;
    assert_eq!(warm.matches("/_render/item?id=").count(), 50);
    assert_eq!(Calls::read(&calls.get_many), 1);
    assert_eq!(
        Calls::read(&calls.envelope_gets),
        0,
        "no per-include round trips"
    );
    assert_eq!(Calls::read(&calls.lease_adds), 0);
    assert_eq!(
        up.renders("/_render/item"),
        50,
        "one render per distinct include"
    );
}

#[tokio::test]
async fn oversized_pages_pass_through_uncomposed() {
    let up = FakeUpstream::start().await;
    let big = format!(
        r#"<esi:include src="/fragments/box"/>{}"#,
        "x".repeat(tessera_gateway::MAX_PAGE)
    );
    page(&up, "/", &big);
    let (gw, _) = start(&up, vec![route("box")]).await;
    let (headers, body) = text(&gw.at("/")).await;
    assert_eq!(body.len(), big.len());
    assert!(body.starts_with("<esi:include"), "left as it was");
    assert!(!headers.contains_key("surrogate-control"));
    assert_eq!(up.renders("/_render/box"), 0);
}

#[tokio::test]
async fn pages_with_per_user_fragments_are_private() {
    let up = FakeUpstream::start().await;
    page(&up, "/", r#"<esi:include src="/fragments/me"/>"#);
    let (gw, _) = start(&up, vec![per_user("me")]).await;
    let (headers, _) = text(&gw.at("/")).await;
    assert_eq!(headers["cache-control"], "private, no-cache");
}

#[tokio::test]
async fn head_of_a_page_carries_what_get_would() {
    let up = FakeUpstream::start().await;
    page(&up, "/", r#"<p><esi:include src="/fragments/me"/></p>"#);
    let (gw, _) = start(&up, vec![per_user("me")]).await;
    // Once the fragment is built, GET and HEAD see the same page.
    eventually("the fragment is built", Duration::from_secs(10), || async {
        !text(&gw.at("/")).await.1.contains("data-tessera-src")
    })
    .await;
    let (get, body) = text(&gw.at("/")).await;
    let head = client().head(gw.at("/")).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    let h = head.headers().clone();
    assert!(!h.contains_key("surrogate-control"), "{h:?}");
    assert_eq!(h["cache-control"], "private, no-cache", "composed caching");
    assert_eq!(
        h["content-length"],
        body.len().to_string().as_str(),
        "the composed length"
    );
    assert_eq!(h["content-length"], get["content-length"]);
    assert!(head.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn pages_without_surrogate_control_are_untouched() {
    let up = FakeUpstream::start().await;
    let html = r#"<esi:include src="/fragments/box"/>"#;
    up.script(
        "/plain",
        Script {
            body: Some(html.into()),
            ..Script::default()
        },
    );
    let (gw, _) = start(&up, vec![route("box")]).await;
    assert_eq!(text(&gw.at("/plain")).await.1, html);
}

#[tokio::test]
async fn the_client_script_is_served() {
    let up = FakeUpstream::start().await;
    let (gw, _) = start(&up, vec![]).await;
    let r = client()
        .get(gw.at("/_tessera/client.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    let etag = r.headers()["etag"].clone();
    let js = r.text().await.unwrap();
    assert!(js.len() < 8 * 1024, "a few KB: {} bytes", js.len());
    assert!(js.contains("tessera:load") && js.contains("Prefer"));
    let r = client()
        .get(gw.at("/_tessera/client.js"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
}

fn bytesize(n: u64) -> tessera_protocol::config::ByteSize {
    tessera_protocol::config::ByteSize::b(n)
}
