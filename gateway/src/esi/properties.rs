//! Properties of the ESI parser (`esi::parse`, `esi::has_markup`) on generated pages: it
//! never panics, never takes more than linear time, leaves no ESI tag that Varnish would
//! have consumed, keeps every byte outside ESI markup, and leaves a page without markup
//! exactly as it was.

use std::time::{Duration, Instant};

use super::tests::{Piece, pieces};
use super::{Include, Segment, has_markup, parse};
use proptest::prelude::*;

/// Bytes of every text segment, in order: the page minus what markup took out.
fn text_of(page: &[u8]) -> Vec<u8> {
    parse(page)
        .into_iter()
        .filter_map(|s| match s {
            Segment::Text(t) => Some(t.to_vec()),
            Segment::Include(_) | Segment::Dropped(_) => None,
        })
        .flatten()
        .collect()
}

/// The tokens the parser looks for, and the ones that end or confuse a tag.
const TOKENS: &[&str] = &[
    "<esi:include",
    "<ESI:Include ",
    " src=\"/fragments/a\"",
    " src='/b?x=1&amp;y=2'",
    " alt=/c",
    " onerror=\"continue\"",
    "/>",
    ">",
    "</esi:include>",
    "<esi:remove>",
    "</esi:remove>",
    "<!--esi",
    "-->",
    "<esi:other>",
    "<",
    "\"",
    "'",
    "=",
    " ",
    "\n",
    "text",
    "\u{e9}",
];

/// Pages of `tokens` (three in four) and `filler`, one after the other.
fn soup(
    tokens: &'static [&'static str],
    filler: impl Strategy<Value = Vec<u8>>,
) -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        3 => proptest::sample::select(tokens).prop_map(|t| t.as_bytes().to_vec()),
        1 => filler,
    ];
    proptest::collection::vec(token, 0..64).prop_map(|ts| ts.concat())
}

/// Pages made of ESI-ish tokens and arbitrary bytes: where the parser's branches are.
fn esi_soup() -> impl Strategy<Value = Vec<u8>> {
    soup(TOKENS, proptest::collection::vec(any::<u8>(), 0..8))
}

/// ESI tags of every kind, well formed or not, each ending at its `>`.
const ESI_TAGS: &[&str] = &[
    "<esi:include src=\"/fragments/a\"/>",
    "<esi:include src=/b />",
    "<esi:include src=\"/c\">",
    "</esi:include>",
    "<esi:include/>",
    "<esi:include src=/d/>",
    "<esi:include src=\"/e/>",
    "<ESI:Include src='' alt=/f >",
    "<esi:remove>",
    "</esi:remove>",
    "<esi:remove/>",
    "<esi:comment text=\"x\"/>",
    "<esi:comment>",
    "</esi:comment>",
    "<esi:choose>",
    "</esi:when>",
    "<esi:includes x='1'>",
];

/// Pages of ESI tags and text without `<` (which would open a tag Varnish skips whole):
/// every ESI tag in them is one Varnish consumes.
fn esi_tags_and_text() -> impl Strategy<Value = Vec<u8>> {
    let filler = prop_oneof![
        proptest::sample::select(&["<esi:include src=\"", "<esi:remove ", "-->", ">", "\""][..])
            .prop_map(|t| t.as_bytes().to_vec()),
        flat_text().prop_map(String::into_bytes),
    ];
    soup(ESI_TAGS, filler).prop_map(|page| [b"<p>".to_vec(), page].concat())
}

/// Text without `<`: around ESI markup, it is never part of a tag.
fn flat_text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 >/=\"'!&;:\\-\n\u{e9}]{0,40}"
}

/// Text that contains no ESI markup, though it may hold `<`, `>`, quotes and `<!--`.
fn plain_text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 <>/=\"'!&;:\\-\n]{0,40}".prop_filter("no ESI markup", |t| {
        let lower = t.to_ascii_lowercase();
        !lower.contains("<esi") && !lower.contains("<!--esi")
    })
}

/// A well-formed include, as written in a page and as the parser should read it.
fn include() -> impl Strategy<Value = (String, Include)> {
    (
        "/fragments/[a-z]{1,8}",
        proptest::option::of(("[a-z]{1,4}", "[0-9]{1,3}", "[0-9]{1,3}")),
        proptest::option::of("/fragments/[a-z]{1,8}"),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(path, query, alt, cont, self_closing)| {
            let (written, src) = match query {
                Some((k, a, b)) => (
                    format!("{path}?{k}={a}&amp;z={b}"),
                    format!("{path}?{k}={a}&z={b}"),
                ),
                None => (path.clone(), path),
            };
            let mut tag = format!("<esi:include src=\"{written}\"");
            if let Some(alt) = &alt {
                tag.push_str(&format!(" alt='{alt}'"));
            }
            if cont {
                tag.push_str(" onerror=\"continue\"");
            }
            tag.push_str(if self_closing {
                "/>"
            } else {
                "></esi:include>"
            });
            let parsed = Include {
                src,
                alt,
                continue_on_error: cont,
            };
            (tag, parsed)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_bytes_parse_without_panic(page in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let segments = parse(&page);
        // Text segments are sub-slices of the page, in page order: never more bytes out
        // than went in.
        prop_assert!(text_of(&page).len() <= page.len());
        prop_assert!(segments.len() <= page.len() + 1);
        let _ = has_markup(&page);
    }

    #[test]
    fn esi_soup_parses_without_panic(page in esi_soup()) {
        prop_assert!(text_of(&page).len() <= page.len());
        if !has_markup(&page) {
            prop_assert_eq!(text_of(&page), page.clone());
        }
    }

    #[test]
    fn no_esi_tag_varnish_consumes_is_left(page in esi_tags_and_text()) {
        let text = text_of(&page).to_ascii_lowercase();
        let left = |tag: &[u8]| text.windows(tag.len()).any(|w| w == tag);
        prop_assert!(!left(b"<esi:") && !left(b"</esi:"), "{:?}", String::from_utf8_lossy(&text));
    }

    #[test]
    fn text_around_dropped_markup_is_kept(
        parts in proptest::collection::vec(
            (flat_text(), proptest::sample::select(&ESI_TAGS[3..8])),
            0..8,
        ),
        tail in flat_text(),
    ) {
        let mut page = String::from("<p>");
        let mut expected = page.clone();
        for (text, tag) in &parts {
            page.push_str(text);
            expected.push_str(text);
            page.push_str(tag);
        }
        page.push_str(&tail);
        expected.push_str(&tail);
        prop_assert_eq!(text_of(page.as_bytes()), expected.into_bytes());
        let dropped = parse(page.as_bytes())
            .iter()
            .filter(|s| matches!(s, Segment::Dropped(_)))
            .count();
        prop_assert_eq!(dropped, parts.len());
    }

    #[test]
    fn a_page_without_markup_is_unchanged(page in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assume!(!has_markup(&page));
        let expected = if page.is_empty() { vec![] } else { vec![Piece::Text(page.clone())] };
        prop_assert_eq!(pieces(&page), expected);
    }

    #[test]
    fn plain_text_without_esi_is_unchanged(page in plain_text()) {
        prop_assert!(!has_markup(page.as_bytes()));
        prop_assert_eq!(text_of(page.as_bytes()), page.as_bytes().to_vec());
    }

    #[test]
    fn text_around_includes_is_kept(
        parts in proptest::collection::vec((flat_text(), include()), 0..8),
        tail in flat_text(),
    ) {
        let mut page = String::from("<p>");
        let mut expected: Vec<Piece> = vec![Piece::Text(page.as_bytes().to_vec())];
        let push_text = |expected: &mut Vec<Piece>, t: &str| {
            if !t.is_empty() {
                expected.push(Piece::Text(t.as_bytes().to_vec()));
            }
        };
        for (text, (tag, parsed)) in &parts {
            page.push_str(text);
            match expected.last_mut() {
                Some(Piece::Text(prev)) => prev.extend_from_slice(text.as_bytes()),
                _ => push_text(&mut expected, text),
            }
            page.push_str(tag);
            expected.push(Piece::Include(parsed.clone()));
        }
        page.push_str(&tail);
        match expected.last_mut() {
            Some(Piece::Text(prev)) => prev.extend_from_slice(tail.as_bytes()),
            _ => push_text(&mut expected, &tail),
        }
        prop_assert_eq!(pieces(page.as_bytes()), expected);
    }

    #[test]
    fn removed_and_commented_text_is_handled(before in flat_text(), inner in plain_text(), after in flat_text()) {
        // Whatever is inside a remove goes, but for a closing tag, or a CDATA section, a
        // comment or a tag that runs on over the `</esi:remove>`.
        let closed = |t: &str| t.rfind('<').is_none_or(|lt| t[lt..].contains('>'));
        prop_assume!(!inner.contains("<!") && !inner.contains("</") && closed(&inner));
        let removed = format!("<p>{before}<esi:remove>{inner} </esi:remove>{after}");
        prop_assert_eq!(text_of(removed.as_bytes()), format!("<p>{before}{after}").into_bytes());
        let inner = inner.replace('<', "");
        prop_assume!(!inner.contains("-->"));
        let commented = format!("<p>{before}<!--esi{inner}-->{after}");
        prop_assert_eq!(text_of(commented.as_bytes()), format!("<p>{before}{inner}{after}").into_bytes());
    }
}

/// Unterminated markup repeated across a big page: each opening must not rescan the rest
/// of the page (quadratic), or a 4 MiB page would hold a gateway thread for minutes.
#[test]
fn unterminated_markup_does_not_take_quadratic_time() {
    // Each opener, and how many bytes of the page Varnish keeps: all of it when the opener
    // is not ESI, none when ESI takes the rest, all but the first `<!--esi` marker.
    const OPENERS: &[(&str, Option<usize>)] = &[
        ("<!--esi ", Some(7)),
        ("<esi:remove>", None),
        ("<esi:include src=/a>", None),
        ("<esi:include src=\"", None),
        ("<esi:include a='b' ", None),
        ("<esi:include ", None),
        ("<!-- ", Some(0)),
        ("<![CDATA[ ", Some(0)),
        ("<p ", Some(0)),
    ];
    for (opener, cut) in OPENERS {
        let page = opener.repeat(256 * 1024 / opener.len());
        let started = Instant::now();
        let text = text_of(page.as_bytes());
        let took = started.elapsed();
        let kept = cut.map_or(0, |cut| page.len() - cut);
        assert_eq!(text.len(), kept, "{opener:?}");
        // Linear work is a few milliseconds even unoptimised; quadratic is minutes.
        assert!(
            took < Duration::from_secs(3),
            "{opener:?} x {}: parse took {took:?}",
            page.len() / opener.len()
        );
    }
}
