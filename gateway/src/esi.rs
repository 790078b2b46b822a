//! The ESI 1.0 subset Tessera understands, as a pure parser (no I/O).
//!
//! - `<esi:include src="…" alt="…" onerror="continue"/>` (or with a closing
//!   `</esi:include>`): replaced by a fragment.
//! - `<esi:remove>…</esi:remove>`: dropped (content for clients without ESI).
//! - `<!--esi … -->`: the comment markers are dropped, the content is processed.
//!
//! Anything else — other `esi:` tags, an unterminated tag, an include without `src` — is
//! passed through byte for byte: malformed markup is never eaten or mangled. Attribute
//! values are HTML-unescaped (`&amp;` in a `src` query is common and correct HTML).

/// One piece of a parsed page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment<'a> {
    /// Bytes to emit as they are.
    Text(&'a [u8]),
    /// An include to resolve.
    Include(Include),
}

/// An `<esi:include>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    /// `src`, unescaped.
    pub src: String,
    /// `alt`, unescaped: tried when `src` cannot be served.
    pub alt: Option<String>,
    /// `onerror="continue"`: when neither can be served, emit nothing.
    pub continue_on_error: bool,
}

const INCLUDE: &[u8] = b"<esi:include";
const REMOVE_OPEN: &[u8] = b"<esi:remove>";
const REMOVE_CLOSE: &[u8] = b"</esi:remove>";
const COMMENT_OPEN: &[u8] = b"<!--esi";
const COMMENT_CLOSE: &[u8] = b"-->";
const INCLUDE_CLOSE: &[u8] = b"</esi:include>";

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
        .map(|p| p + from)
}

/// Where each closing tag was last searched for in one page, and what was found, so that
/// a page of openers without their closer (`<!--esi` ten thousand times, no `-->`) is
/// scanned once per closer instead of once per opener: linear, not quadratic, time.
#[derive(Debug, Default)]
struct Closers {
    /// `(searched from, found at)` for [`COMMENT_CLOSE`], [`REMOVE_CLOSE`], [`INCLUDE_CLOSE`].
    last: [Option<(usize, Option<usize>)>; 3],
}

impl Closers {
    /// `find(page, needle, from)`, answered from the last search of the same closer when
    /// that search covers `from`: nothing found from an earlier start means nothing from
    /// a later one; a match at or after `from` found from an earlier start is the first.
    fn find(&mut self, page: &[u8], which: usize, from: usize) -> Option<usize> {
        let needle = [COMMENT_CLOSE, REMOVE_CLOSE, INCLUDE_CLOSE][which];
        if let Some((searched, found)) = self.last[which]
            && searched <= from
            && found.is_none_or(|at| at >= from)
        {
            return found;
        }
        let found = find(page, needle, from);
        self.last[which] = Some((from, found));
        found
    }
}

const COMMENT: usize = 0;
const REMOVE: usize = 1;
const INCLUDE_END: usize = 2;

/// Splits `page` into text and includes. Cheap when the page has no ESI markup: one scan.
pub fn parse(page: &[u8]) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    parse_into(page, &mut out);
    out
}

fn parse_into<'a>(page: &'a [u8], out: &mut Vec<Segment<'a>>) {
    let mut closers = Closers::default();
    let mut pos = 0;
    let mut text_from = 0;
    while let Some(lt) = find(page, b"<", pos) {
        let rest = &page[lt..];
        let starts =
            |tag: &[u8]| rest.len() >= tag.len() && rest[..tag.len()].eq_ignore_ascii_case(tag);
        if starts(COMMENT_OPEN) {
            if let Some(end) = closers.find(page, COMMENT, lt + COMMENT_OPEN.len()) {
                push_text(out, &page[text_from..lt]);
                parse_into(&page[lt + COMMENT_OPEN.len()..end], out);
                pos = end + COMMENT_CLOSE.len();
                text_from = pos;
                continue;
            }
        } else if starts(REMOVE_OPEN) {
            if let Some(end) = closers.find(page, REMOVE, lt + REMOVE_OPEN.len()) {
                push_text(out, &page[text_from..lt]);
                pos = end + REMOVE_CLOSE.len();
                text_from = pos;
                continue;
            }
        } else if starts(INCLUDE)
            && rest
                .get(INCLUDE.len())
                .is_some_and(|b| b.is_ascii_whitespace() || *b == b'/' || *b == b'>')
            && let Some((include, consumed)) = include_at(page, lt, &mut closers)
        {
            push_text(out, &page[text_from..lt]);
            out.push(Segment::Include(include));
            pos = lt + consumed;
            text_from = pos;
            continue;
        }
        pos = lt + 1;
    }
    push_text(out, &page[text_from..]);
}

fn push_text<'a>(out: &mut Vec<Segment<'a>>, text: &'a [u8]) {
    if !text.is_empty() {
        out.push(Segment::Text(text));
    }
}

/// Parses the include tag starting at `at`; returns it and the bytes it spans.
fn include_at(page: &[u8], at: usize, closers: &mut Closers) -> Option<(Include, usize)> {
    let start = at + INCLUDE.len();
    let attrs_end = tag_end(page, start)?;
    let self_closing = page[..attrs_end].ends_with(b"/");
    let attrs_slice = if self_closing {
        &page[start..attrs_end - 1]
    } else {
        &page[start..attrs_end]
    };
    let attrs = parse_attrs(std::str::from_utf8(attrs_slice).ok()?)?;
    let mut end = attrs_end + 1;
    if !self_closing {
        // `<esi:include …></esi:include>`; without the closing tag it is malformed.
        let close = closers.find(page, INCLUDE_END, end)?;
        if !page[end..close].iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        end = close + INCLUDE_CLOSE.len();
    }
    let get = |name: &str| {
        attrs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let src = get("src").filter(|s| !s.is_empty())?;
    Some((
        Include {
            src,
            alt: get("alt").filter(|s| !s.is_empty()),
            continue_on_error: get("onerror").is_some_and(|v| v.eq_ignore_ascii_case("continue")),
        },
        end - at,
    ))
}

/// Index of the `>` closing a tag whose attributes start at `from`, skipping quoted values.
fn tag_end(page: &[u8], from: usize) -> Option<usize> {
    let mut quote = None;
    for (i, &b) in page.iter().enumerate().skip(from) {
        match (quote, b) {
            (Some(q), _) if b == q => quote = None,
            (Some(_), _) => {}
            (None, b'"' | b'\'') => quote = Some(b),
            (None, b'>') => return Some(i),
            (None, b'<') => return None,
            _ => {}
        }
    }
    None
}

/// `name="v" name='v' name=v`; `None` when it is not attribute syntax.
fn parse_attrs(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        let name_end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let name = &rest[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == ':')
        {
            return None;
        }
        rest = rest[name_end..].trim_start();
        let value = if let Some(after) = rest.strip_prefix('=') {
            let after = after.trim_start();
            let (value, remaining) = match after.chars().next() {
                Some(q @ ('"' | '\'')) => {
                    let close = after[1..].find(q)? + 1;
                    (&after[1..close], &after[close + 1..])
                }
                _ => {
                    let end = after.find(char::is_whitespace).unwrap_or(after.len());
                    (&after[..end], &after[end..])
                }
            };
            rest = remaining.trim_start();
            unescape(value)
        } else {
            String::new()
        };
        out.push((name.to_string(), value));
    }
    Some(out)
}

/// The few HTML entities that appear in URLs.
fn unescape(s: &str) -> String {
    s.replace("&amp;", "&")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
}

/// Whether `page` has anything this module would change (a cheap pre-check).
pub fn has_markup(page: &[u8]) -> bool {
    find(page, b"<esi:", 0).is_some() || find(page, COMMENT_OPEN, 0).is_some()
}

/// Properties on generated pages (proptest), sharing the unit tests' helpers.
#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;

    /// Owned, with neighbouring text joined: what a page renders to, piece by piece.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(super) enum Piece {
        Text(Vec<u8>),
        Include(Include),
    }

    pub(super) fn pieces(page: &[u8]) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        for seg in parse(page) {
            match (out.last_mut(), seg) {
                (Some(Piece::Text(prev)), Segment::Text(t)) => prev.extend_from_slice(t),
                (_, Segment::Text(t)) => out.push(Piece::Text(t.to_vec())),
                (_, Segment::Include(i)) => out.push(Piece::Include(i)),
            }
        }
        out
    }

    fn text(s: &str) -> Piece {
        Piece::Text(s.as_bytes().to_vec())
    }

    fn inc(src: &str) -> Include {
        Include {
            src: src.into(),
            alt: None,
            continue_on_error: false,
        }
    }

    #[test]
    fn plain_html_is_one_text_segment() {
        let page = "<html><body><p>a < b</p></body></html>";
        assert_eq!(pieces(page.as_bytes()), vec![text(page)]);
        assert!(!has_markup(page.as_bytes()));
    }

    #[test]
    fn includes_in_every_form() {
        let page = br#"a<esi:include src="/fragments/x?a=1&amp;b=2"/>b<ESI:INCLUDE src='/fragments/y' alt="/fragments/z" onerror="continue"></esi:include>c<esi:include src=/fragments/w />d"#;
        assert_eq!(
            pieces(page),
            vec![
                text("a"),
                Piece::Include(inc("/fragments/x?a=1&b=2")),
                text("b"),
                Piece::Include(Include {
                    src: "/fragments/y".into(),
                    alt: Some("/fragments/z".into()),
                    continue_on_error: true
                }),
                text("c"),
                Piece::Include(inc("/fragments/w")),
                text("d"),
            ]
        );
    }

    #[test]
    fn remove_and_comment_blocks() {
        let page = b"1<esi:remove><a href=/x>fallback</a></esi:remove>2<!--esi <p>only with ESI</p><esi:include src=\"/fragments/q\"/> -->3";
        assert_eq!(
            pieces(page),
            vec![
                text("12 <p>only with ESI</p>"),
                Piece::Include(inc("/fragments/q")),
                text(" 3"),
            ]
        );
    }

    #[test]
    fn malformed_markup_passes_through_unharmed() {
        for page in [
            "<esi:include src=\"/fragments/x\"",          // unterminated
            "<esi:include alt=\"/a\"/>",                  // no src
            "<esi:include src=\"/f\">text</esi:include>", // content inside
            "<esi:include src=\"/f\">",                   // no closing tag
            "<esi:remove>never closed",
            "<!--esi never closed",
            "<esi:choose><esi:when test=\"1\">x</esi:when></esi:choose>",
            "<esi:includex src=\"/f\"/>",
            "<esi:include src=\"/f\" <b>/>",
            "\u{fffd}<esi:include src=\"\u{1f600}\"/>",
        ] {
            let segs = parse(page.as_bytes());
            let rebuilt: Vec<u8> = segs
                .iter()
                .flat_map(|s| match s {
                    Segment::Text(t) => t.to_vec(),
                    Segment::Include(i) => format!("[{}]", i.src).into_bytes(),
                })
                .collect();
            if page.contains('\u{1f600}') {
                assert!(segs.iter().any(|s| matches!(s, Segment::Include(_))));
            } else {
                assert_eq!(
                    String::from_utf8(rebuilt).unwrap(),
                    page,
                    "{page:?} was changed"
                );
            }
        }
    }

    #[test]
    fn markup_is_detected_in_any_case_and_form() {
        for page in [
            "<p>x</p><esi:include src=\"/fragments/a\"/>",
            "<ESI:Remove>x</ESI:Remove>",
            "<!--esi <p>only a comment</p> -->",
            "<!--ESI x -->",
            "<esi:choose>",
        ] {
            assert!(has_markup(page.as_bytes()), "{page:?}");
        }
        for page in [
            "",
            "<!-- esi is mentioned in a comment -->",
            "esi:include src=/fragments/a",
            "<esi",
            "<p>a < b</p>",
        ] {
            assert!(!has_markup(page.as_bytes()), "{page:?}");
        }
    }

    #[test]
    fn attribute_syntax_variants() {
        let page = b"<esi:include\tsrc = \"/fragments/a?x=&quot;1&quot;&amp;y=&#39;2&#39;&lt;&gt;\" \n alt='/fragments/b' data-x_y:z defer onerror=CONTINUE />";
        assert_eq!(
            pieces(page),
            vec![Piece::Include(Include {
                src: "/fragments/a?x=\"1\"&y='2'<>".into(),
                alt: Some("/fragments/b".into()),
                continue_on_error: true,
            })]
        );
        let page = b"<esi:include src=/fragments/a alt=/fragments/b/>";
        assert_eq!(
            pieces(page),
            vec![Piece::Include(Include {
                src: "/fragments/a".into(),
                alt: Some("/fragments/b".into()),
                continue_on_error: false,
            })]
        );
        // Attribute names are matched case-insensitively; empty values count as absent.
        let page = b"<esi:include SRC='/fragments/a' ALT='' ONERROR='abort'/>";
        assert_eq!(pieces(page), vec![Piece::Include(inc("/fragments/a"))]);
    }

    #[test]
    fn quoted_values_may_hold_tag_characters() {
        let page = br#"x<esi:include src="/fragments/a?q=>" alt='/fragments/"<b>"'/>y"#;
        assert_eq!(
            pieces(page),
            vec![
                text("x"),
                Piece::Include(Include {
                    src: "/fragments/a?q=>".into(),
                    alt: Some("/fragments/\"<b>\"".into()),
                    continue_on_error: false,
                }),
                text("y"),
            ]
        );
    }

    #[test]
    fn an_include_may_be_closed_after_whitespace() {
        let page = b"a<esi:include src=\"/fragments/a\"> \n\t</ESI:INCLUDE>b<esi:include src=\"/fragments/b\"></esi:include>c";
        assert_eq!(
            pieces(page),
            vec![
                text("a"),
                Piece::Include(inc("/fragments/a")),
                text("b"),
                Piece::Include(inc("/fragments/b")),
                text("c"),
            ]
        );
    }

    #[test]
    fn malformed_attributes_pass_through_unharmed() {
        for page in [
            "<esi:include src=\"/fragments/a/>",   // unterminated quote
            "<esi:include src=\"\"/>",             // empty src
            "<esi:include src=\"/f\" a.b=\"1\"/>", // not an attribute name
            "<esi:include src=\"/f\" =\"1\"/>",    // no name
            "<esi:include src=/f <b>x</b>",        // a tag inside the tag
            "<esi:include src=/f<br/>",            // a tag inside a value
            "<esi:include>",
            "<esi:include/>",
            "<esi:include src=\"/f\"></esi:includes>",
        ] {
            assert_eq!(pieces(page.as_bytes()), vec![text(page)], "{page:?}");
        }
    }

    #[test]
    fn blocks_are_matched_in_any_case_and_text_around_them_is_kept() {
        let page = b"<p>1</p><ESI:REMOVE>gone</Esi:Remove><p>2</p><!--ESI <i>kept</i> --><p>3</p><esi:remove>also gone</esi:remove>";
        assert_eq!(
            pieces(page),
            vec![text("<p>1</p><p>2</p> <i>kept</i> <p>3</p>")]
        );
        let segments = parse(b"<esi:remove>x</esi:remove>");
        assert!(segments.is_empty(), "{segments:?}");
        let page = b"<!--esi--><!--esi a<esi:remove>b</esi:remove>c -->d";
        assert_eq!(pieces(page), vec![text(" ac d")]);
    }

    #[test]
    fn a_page_of_unterminated_openers_passes_through_in_one_pass() {
        // Each opener looks for its closer once per page, not once per opener: were it
        // searched again from every opener, this page would take minutes, not
        // milliseconds (the integration test in tests/esi_properties.rs times it).
        for opener in ["<!--esi ", "<esi:remove>", "<esi:include src=/a>"] {
            let page = opener.repeat(256 * 1024 / opener.len());
            assert_eq!(pieces(page.as_bytes()), vec![text(&page)], "{opener:?}");
        }
    }

    #[test]
    fn non_utf8_bytes_do_not_break_parsing() {
        let page = b"\xff\xfe<esi:include src=\"/fragments/a\"/>\xff";
        assert_eq!(
            pieces(page),
            vec![
                Piece::Text(b"\xff\xfe".to_vec()),
                Piece::Include(inc("/fragments/a")),
                Piece::Text(b"\xff".to_vec())
            ]
        );
    }
}
