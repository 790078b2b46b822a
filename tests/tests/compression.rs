//! Compression: fragments, composed pages and the client script answered in `br` or
//! `gzip` as the client accepts; compressed upstream pages and render answers read.
//! Bodies are decoded here with `flate2` and `brotli`'s decoder, not the gateway's code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use tessera_protocol::FragmentRoute;
use tessera_tests::harness::{Backend, TestGateway, backends, client, config, route};
use tessera_tests::upstream::{FakeUpstream, Script};

const ESI: (&str, &str) = ("surrogate-control", "content=\"ESI/1.0\"");

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    w.write_all(body).unwrap();
    w.finish().unwrap()
}

fn brotli(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    brotli::CompressorWriter::new(&mut out, 4096, 5, 22)
        .write_all(body)
        .unwrap();
    out
}

/// `body` as sent with `headers`, decoded by its `Content-Encoding`.
fn decoded(headers: &HeaderMap, body: &[u8]) -> String {
    let mut out = String::new();
    match headers.get("content-encoding").map(|v| v.to_str().unwrap()) {
        None => out = String::from_utf8(body.to_vec()).unwrap(),
        Some("gzip") => {
            flate2::read::GzDecoder::new(body)
                .read_to_string(&mut out)
                .unwrap();
        }
        Some("br") => {
            brotli::Decompressor::new(body, 4096)
                .read_to_string(&mut out)
                .unwrap();
        }
        Some(other) => panic!("unexpected Content-Encoding {other}"),
    }
    out
}

/// `method url` with `headers`: status, headers, raw body.
async fn fetch(
    method: reqwest::Method,
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut req = client().request(method, url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    (status, headers, r.bytes().await.unwrap().to_vec())
}

async fn get(url: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
    fetch(reqwest::Method::GET, url, headers).await
}

fn vary_has_accept_encoding(h: &HeaderMap) -> bool {
    h.get_all("vary").iter().any(|v| {
        v.to_str()
            .unwrap()
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("accept-encoding"))
    })
}

fn render(up: &FakeUpstream, name: &str, body: Vec<u8>, headers: Vec<(String, String)>) {
    up.script(
        &format!("/_render/{name}"),
        Script {
            body: Some(body.into()),
            headers,
            ..Script::default()
        },
    );
}

async fn gateway(up: &FakeUpstream, routes: Vec<FragmentRoute>, compress: bool) -> TestGateway {
    let mut c = config(&up.url(), routes);
    c.gateway.compress = compress;
    let b = backends(Backend::Memory, &mut c).await;
    TestGateway::start(c, b).await
}

/// A fragment big enough to compress: 3.6 KB of list items.
fn rows() -> String {
    (0..300).map(|i| format!("<li>{i}</li>")).collect()
}

#[tokio::test]
async fn a_cached_fragment_is_served_in_each_accepted_coding_with_its_own_etag() {
    let up = FakeUpstream::start().await;
    let body = rows();
    render(&up, "list", body.clone().into_bytes(), vec![]);
    render(&up, "small", b"<b>tiny</b>".to_vec(), vec![]);
    let gw = gateway(&up, vec![route("list"), route("small")], true).await;
    let url = gw.at("/fragments/list");
    let (status, ..) = get(&url, &[("prefer", "wait=5")]).await;
    assert_eq!(status, StatusCode::OK, "built");

    let (_, plain_h, plain) = get(&url, &[]).await;
    assert!(!plain_h.contains_key("content-encoding"), "none asked");
    assert!(vary_has_accept_encoding(&plain_h), "{plain_h:?}");
    assert_eq!(plain, body.as_bytes());
    let plain_etag = plain_h["etag"].to_str().unwrap().to_string();

    let mut etags = vec![plain_etag.clone()];
    for (accept, coding) in [
        ("gzip, deflate, br, zstd", "br"),
        ("gzip, deflate", "gzip"),
        ("br;q=0.1, gzip", "gzip"),
    ] {
        let (status, h, raw) = get(&url, &[("accept-encoding", accept)]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h["content-encoding"], coding, "{accept}");
        assert!(vary_has_accept_encoding(&h));
        assert!(raw.len() < body.len() / 2, "{coding} is smaller");
        assert_eq!(h["content-length"], raw.len().to_string());
        assert_eq!(decoded(&h, &raw), body, "{coding} decodes to the fragment");
        let etag = h["etag"].to_str().unwrap().to_string();
        assert!(etag.ends_with(&format!("-{coding}\"")), "{etag}");
        etags.push(etag.clone());

        // Revalidation matches only the representation the client holds.
        let (status, h, _) = get(
            &url,
            &[("accept-encoding", accept), ("if-none-match", &etag)],
        )
        .await;
        assert_eq!(status, StatusCode::NOT_MODIFIED, "{coding}");
        assert_eq!(h["etag"], etag.as_str());
        let (status, ..) = get(
            &url,
            &[("accept-encoding", accept), ("if-none-match", &plain_etag)],
        )
        .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "a plain copy is not the {coding} one"
        );

        // HEAD says what GET sends; a Range is answered with the whole representation.
        let (status, h, empty) =
            fetch(reqwest::Method::HEAD, &url, &[("accept-encoding", accept)]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(empty.is_empty());
        assert_eq!(h["content-encoding"], coding);
        assert_eq!(h["content-length"], raw.len().to_string(), "HEAD {coding}");
        let (status, h, ranged) =
            get(&url, &[("accept-encoding", accept), ("range", "bytes=0-9")]).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "Range is not applied to a coded answer"
        );
        assert!(!h.contains_key("content-range"));
        assert_eq!(ranged, raw);
    }
    etags.sort();
    etags.dedup();
    assert_eq!(
        etags.len(),
        3,
        "plain, br and gzip each have their own ETag"
    );

    // Under the size threshold nothing is compressed, and nothing varies.
    let small = gw.at("/fragments/small");
    get(&small, &[("prefer", "wait=5")]).await;
    let (_, h, raw) = get(&small, &[("accept-encoding", "gzip, br")]).await;
    assert!(!h.contains_key("content-encoding"));
    assert!(!vary_has_accept_encoding(&h));
    assert_eq!(raw, b"<b>tiny</b>");
}

#[tokio::test]
async fn compressed_esi_pages_are_composed_and_encoded_for_the_client() {
    let up = FakeUpstream::start().await;
    render(&up, "price", b"<b>PRICE-42</b>".to_vec(), vec![]);
    let page = format!(
        r#"<html><body><h1>Shop</h1><esi:include src="/fragments/price"/><ul>{}</ul></body></html>"#,
        rows()
    );
    let esi_headers = |coding: &str| {
        vec![
            (ESI.0.to_string(), ESI.1.to_string()),
            ("content-encoding".to_string(), coding.to_string()),
            ("vary".to_string(), "Accept-Encoding".to_string()),
        ]
    };
    for (path, body, coding) in [
        ("/gz", gzip(page.as_bytes()), "gzip"),
        ("/br", brotli(page.as_bytes()), "br"),
    ] {
        up.script(
            path,
            Script {
                body: Some(body.into()),
                headers: esi_headers(coding),
                ..Script::default()
            },
        );
    }
    let gw = gateway(&up, vec![route("price")], true).await;
    get(&gw.at("/fragments/price"), &[("prefer", "wait=5")]).await;

    for path in ["/gz", "/br"] {
        for (accept, coding) in [
            (None, None),
            (Some("gzip"), Some("gzip")),
            (Some("br"), Some("br")),
        ] {
            let headers: Vec<(&str, &str)> =
                accept.map(|a| ("accept-encoding", a)).into_iter().collect();
            let (status, h, raw) = get(&gw.at(path), &headers).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                h.get("content-encoding").map(|v| v.to_str().unwrap()),
                coding,
                "{path} for {accept:?}"
            );
            assert_eq!(h["content-length"], raw.len().to_string());
            assert!(!h.contains_key("surrogate-control"));
            assert_eq!(
                h.get_all("vary").iter().count(),
                1,
                "Vary not doubled: {h:?}"
            );
            assert!(vary_has_accept_encoding(&h));
            let html = decoded(&h, &raw);
            assert!(
                html.contains("<b>PRICE-42</b>") && !html.contains("esi:"),
                "{path} for {accept:?} composed: {html}"
            );
            assert!(html.ends_with("</ul></body></html>"), "nothing cut off");

            let (status, head_h, empty) =
                fetch(reqwest::Method::HEAD, &gw.at(path), &headers).await;
            assert_eq!(status, StatusCode::OK);
            assert!(empty.is_empty());
            assert_eq!(
                head_h["content-length"],
                raw.len().to_string(),
                "HEAD {path}"
            );
        }
    }
}

#[tokio::test]
async fn compressed_pages_that_cannot_be_read_are_refused_or_passed_through_whole() {
    let up = FakeUpstream::start().await;
    let esi = |coding: &str| {
        vec![
            (ESI.0.to_string(), ESI.1.to_string()),
            ("content-encoding".to_string(), coding.to_string()),
        ]
    };
    // Not gzip at all, though it says so.
    up.script(
        "/corrupt",
        Script {
            body: Some(
                b"<html><esi:include src=\"/fragments/x\"/></html>"
                    .to_vec()
                    .into(),
            ),
            headers: esi("gzip"),
            ..Script::default()
        },
    );
    // 8 MiB once decoded: past the composition limit.
    let mut big = b"<html><esi:include src=\"/fragments/x\"/>".to_vec();
    big.resize(8 << 20, b' ');
    let bomb = gzip(&big);
    up.script(
        "/bomb",
        Script {
            body: Some(bomb.clone().into()),
            headers: esi("gzip"),
            ..Script::default()
        },
    );
    up.script(
        "/zstd",
        Script {
            body: Some(b"(zstd bytes)".to_vec().into()),
            headers: esi("zstd"),
            ..Script::default()
        },
    );
    let gw = gateway(&up, vec![route("x")], true).await;

    let (status, h, body) = get(&gw.at("/corrupt"), &[("accept-encoding", "gzip")]).await;
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "a corrupt page is an upstream fault"
    );
    let problem = String::from_utf8_lossy(&body);
    assert!(
        h["content-type"].to_str().unwrap().contains("problem")
            && problem.contains("upstream_bad_encoding"),
        "{problem}"
    );

    let (status, h, body) = get(&gw.at("/bomb"), &[("accept-encoding", "gzip")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["content-encoding"], "gzip");
    assert_eq!(body, bomb, "too big to compose: passed through as it came");

    let (status, h, body) = get(&gw.at("/zstd"), &[("accept-encoding", "zstd")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["content-encoding"], "zstd");
    assert_eq!(body, b"(zstd bytes)");
}

#[tokio::test]
async fn render_answers_are_stored_plain_whatever_coding_they_came_in() {
    let up = FakeUpstream::start().await;
    let body = rows();
    let coded = |c: &str| vec![("content-encoding".to_string(), c.to_string())];
    render(&up, "gz", gzip(body.as_bytes()), coded("gzip"));
    render(&up, "br", brotli(body.as_bytes()), coded("br"));
    render(&up, "bad", b"not gzip".to_vec(), coded("gzip"));
    let gw = gateway(&up, vec![route("gz"), route("br"), route("bad")], true).await;
    for name in ["gz", "br"] {
        let (status, h, raw) = get(
            &gw.at(&format!("/fragments/{name}")),
            &[("prefer", "wait=5")],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{name}");
        assert!(!h.contains_key("content-encoding"));
        assert_eq!(raw, body.as_bytes(), "{name} stored decoded");
    }
    let (status, _, problem) = get(&gw.at("/fragments/bad"), &[("prefer", "wait=5")]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let problem = String::from_utf8_lossy(&problem);
    assert!(problem.contains("build_failed"), "{problem}");
    let asked = up.requests("/_render/gz");
    assert!(!asked.is_empty());
    assert!(
        asked
            .iter()
            .all(|(_, h)| h.get("accept-encoding").is_some_and(|v| v == "identity")),
        "workers ask for plain answers"
    );
}

#[tokio::test]
async fn the_client_script_is_compressed_and_compression_can_be_turned_off() {
    let up = FakeUpstream::start().await;
    let body = rows();
    render(&up, "list", body.clone().into_bytes(), vec![]);
    let gw = gateway(&up, vec![route("list")], true).await;
    let (_, plain_h, plain) = get(&gw.at("/_tessera/client.js"), &[]).await;
    assert!(!plain_h.contains_key("content-encoding"));
    let (_, h, raw) = get(
        &gw.at("/_tessera/client.js"),
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(h["content-encoding"], "gzip");
    assert_eq!(decoded(&h, &raw).as_bytes(), plain);
    gw.stop().await;

    let gw = gateway(&up, vec![route("list")], false).await;
    let url = gw.at("/fragments/list");
    get(&url, &[("prefer", "wait=5")]).await;
    for url in [url, gw.at("/_tessera/client.js")] {
        let (_, h, _) = get(&url, &[("accept-encoding", "gzip, br")]).await;
        assert!(!h.contains_key("content-encoding"), "{url}: off");
        assert!(!vary_has_accept_encoding(&h), "{url}");
    }
}
