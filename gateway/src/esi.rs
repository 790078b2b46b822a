//! ESI 1.0 as Varnish (7.1, default features) parses it, as a pure parser (no I/O).
//!
//! - `<esi:include src="…"/>` (or `<esi:include src="…">`, whose `</esi:include>` is
//!   dropped as a stray end tag): replaced by a fragment. Tessera also reads `alt="…"` and
//!   `onerror="continue"`.
//! - `<esi:remove>…</esi:remove>`: dropped (content for clients without ESI). Blocks do not
//!   nest: the first `</esi:remove>` ends the block, an inner `<esi:remove>` is an error.
//! - `<!--esi … -->`: the comment markers are dropped, the content is processed.
//! - `<esi:comment …/>`: dropped.
//!
//! What is not ESI is not looked into, as in Varnish: an HTML comment `<!-- … -->`, a
//! `<![CDATA[ … ]]>` section and any other tag up to its `>` pass through as they are (so a
//! `</esi:remove>` in a CDATA section ends nothing).
//!
//! Errors are removed, as Varnish removes them (and logs them): every other `<esi:…>` or
//! `</esi:…>` tag — an unknown element, a stray end tag, a second `<esi:remove>`, an
//! include without `src`, with an empty one or with a broken attribute (a value unquoted
//! up to the `>`, a missing quote) — is dropped up to its first `>`, or to the end of the
//! page when it has none, and reported as [`Segment::Dropped`]. Text outside ESI markup is
//! kept byte for byte. Attribute values are HTML-unescaped (`&amp;` in a `src` query is
//! common and correct HTML).
//!
//! Unlike Varnish, element and attribute names are matched in any case (`<ESI:Include
//! SRC=…>`): Varnish passes such tags to the client as text. And a body whose first
//! non-blank byte is not `<` is parsed too, as Varnish does with its
//! `esi_disable_xml_check` feature: a page or fragment asks for ESI explicitly
//! (`Surrogate-Control`), and a fragment may well start with text.
//!
//! One pass over the page, whatever it holds: every construct is scanned once, from its
//! opener to its closer or the end of the page.

/// One piece of a parsed page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment<'a> {
    /// Bytes to emit as they are.
    Text(&'a [u8]),
    /// An include to resolve.
    Include(Include),
    /// ESI markup Varnish drops with an error: nothing is emitted for it.
    Dropped(Dropped),
}

/// An `<esi:include>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Include {
    /// `src`, unescaped.
    pub src: String,
    /// `alt`, unescaped: tried when `src` cannot be served.
    pub alt: Option<String>,
    /// `onerror="continue"`: when neither can be served, emit nothing.
    pub continue_on_error: bool,
}

/// ESI markup removed from the page as an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dropped {
    /// Offset of the markup in the page.
    pub at: usize,
    /// An `<esi:include>` that could not be read (outside `<esi:remove>`, where Varnish
    /// would have fetched it had it been well formed).
    pub include: bool,
    /// What is wrong, in Varnish's words where it has some.
    pub why: &'static str,
}

/// Whether `b` is XML white space (Varnish's `vct_islws`).
fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn starts_with_ci(hay: &[u8], prefix: &[u8]) -> bool {
    hay.len() >= prefix.len() && hay[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
        .map(|p| p + from)
}

/// Just past the first `byte` at or after `from`, or the end of `hay`.
fn past(hay: &[u8], byte: u8, from: usize) -> usize {
    hay.get(from..)
        .and_then(|rest| rest.iter().position(|&b| b == byte))
        .map_or(hay.len(), |p| from + p + 1)
}

fn next_lt(hay: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .iter()
        .position(|&b| b == b'<')
        .map(|p| from + p)
}

/// What follows a `<`: the construct Varnish tells apart, and where its name ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opener {
    /// `<!--esi`
    EsiComment,
    /// `<!--`
    Comment,
    /// `<![CDATA[`
    Cdata,
    /// `<esi:` or `</esi:` (`end`)
    Esi { end: bool },
    /// Any other tag.
    Other,
}

/// Reads the construct opening at `page[lt] == b'<'`; returns it and where its body starts.
fn opener(page: &[u8], lt: usize) -> (Opener, usize) {
    let end = page.get(lt + 1) == Some(&b'/');
    let name = lt + 1 + usize::from(end);
    let rest = &page[name..];
    if starts_with_ci(rest, b"esi:") {
        (Opener::Esi { end }, name + 4)
    } else if starts_with_ci(rest, b"!--esi") {
        (Opener::EsiComment, name + 6)
    } else if rest.starts_with(b"!--") {
        (Opener::Comment, name + 3)
    } else if rest.starts_with(b"![CDATA[") {
        (Opener::Cdata, name + 8)
    } else {
        (Opener::Other, lt + 1)
    }
}

/// Splits `page` into text, includes and dropped markup. Cheap when the page has no ESI
/// markup: one scan.
pub(crate) fn parse(page: &[u8]) -> Vec<Segment<'_>> {
    let mut parser = Parser {
        page,
        pos: 0,
        text_from: 0,
        remove: false,
        esi_comment: false,
        out: Vec::new(),
    };
    parser.run();
    parser.finish()
}

/// The parse of one page: where it is, and the state Varnish keeps between tags.
struct Parser<'a> {
    page: &'a [u8],
    /// Where scanning goes on.
    pos: usize,
    /// Start of the text not yet emitted (or dropped, inside `<esi:remove>`).
    text_from: usize,
    /// Inside `<esi:remove>`: text is dropped.
    remove: bool,
    /// Inside `<!--esi`: the next `-->` between tags is dropped.
    esi_comment: bool,
    out: Vec<Segment<'a>>,
}

impl<'a> Parser<'a> {
    fn run(&mut self) {
        let page = self.page;
        while self.pos < page.len() {
            let lt = next_lt(page, self.pos).unwrap_or(page.len());
            if self.esi_comment
                && let Some(end) = find(&page[..lt], b"-->", self.pos)
            {
                self.cut(end, end + 3);
                self.esi_comment = false;
                self.pos = end + 3;
                continue;
            }
            if lt == page.len() {
                break;
            }
            self.pos = self.construct(lt);
        }
    }

    /// Handles the construct opening at `lt`; returns where scanning goes on.
    fn construct(&mut self, lt: usize) -> usize {
        let page = self.page;
        let (opener, body) = opener(page, lt);
        match opener {
            Opener::EsiComment if !self.esi_comment => {
                self.cut(lt, body);
                if self.remove {
                    self.drop(lt, false, "ESI 1.0 Nested <!--esi element in <esi:remove>");
                }
                self.esi_comment = true;
                body
            }
            // Within `<!--esi`, any `<!--` is a plain comment, and Varnish forgets the
            // `<!--esi` it was in: its `-->` stays.
            Opener::EsiComment | Opener::Comment => {
                self.esi_comment = false;
                find(page, b"-->", lt + 4).map_or(page.len(), |e| e + 3)
            }
            Opener::Cdata => find(page, b"]]>", body).map_or(page.len(), |e| e + 3),
            Opener::Esi { end } => {
                let tag_end = past(page, b'>', body);
                self.cut(lt, tag_end);
                self.element(lt, end, &page[body..tag_end]);
                tag_end
            }
            Opener::Other => past(page, b'>', body),
        }
    }

    /// Acts on the ESI element at `at` (`tag`: after `esi:`, through the `>`), already
    /// cut from the text.
    fn element(&mut self, at: usize, end: bool, tag: &[u8]) {
        let (name, rest) = element_name(tag);
        let include = name == Name::Include && !end && !self.remove;
        let Some(attrs) = rest.strip_suffix(b">") else {
            return self.drop(at, include, "ESI tag not terminated by '>'");
        };
        let done = match name {
            Name::Unknown => Err("ESI 1.0 <esi:bogus> element"),
            Name::Include if self.remove => {
                Err("ESI 1.0 <esi:include> element nested in <esi:remove>")
            }
            Name::Include if end => Err("ESI 1.0 </esi:include> illegal end-tag"),
            Name::Include => include_of(attrs).map(|i| self.out.push(Segment::Include(i))),
            Name::Remove => self.remove_tag(end, attrs),
            Name::Comment if self.remove => {
                Err("ESI 1.0 <esi:comment> element nested in <esi:remove>")
            }
            Name::Comment if end => Err("ESI 1.0 </esi:comment> illegal end-tag"),
            Name::Comment => attributes(attrs).and_then(|tag| match tag.empty {
                true => Ok(()),
                false => Err("ESI 1.0 <esi:comment> needs final '/'"),
            }),
        };
        if let Err(why) = done {
            self.drop(at, include, why);
        }
    }

    /// `<esi:remove>` or `</esi:remove>`: opens or closes a block, when it can.
    fn remove_tag(&mut self, end: bool, attrs: &[u8]) -> Result<(), &'static str> {
        if attributes(attrs)?.empty {
            return Err("ESI 1.0 <esi:remove/> not legal");
        }
        match (self.remove, end) {
            (true, false) => Err("ESI 1.0 <esi:remove> already open"),
            (false, true) => Err("ESI 1.0 <esi:remove> not open"),
            _ => {
                self.remove = !end;
                Ok(())
            }
        }
    }

    /// Leaves out `page[from..to]`: the text before it is emitted unless it is removed.
    fn cut(&mut self, from: usize, to: usize) {
        if !self.remove {
            push_text(&mut self.out, &self.page[self.text_from..from]);
        }
        self.text_from = to;
    }

    fn drop(&mut self, at: usize, include: bool, why: &'static str) {
        self.out
            .push(Segment::Dropped(Dropped { at, include, why }));
    }

    fn finish(mut self) -> Vec<Segment<'a>> {
        if !self.remove {
            push_text(&mut self.out, &self.page[self.text_from..]);
        }
        self.out
    }
}

fn push_text<'a>(out: &mut Vec<Segment<'a>>, text: &'a [u8]) {
    if !text.is_empty() {
        out.push(Segment::Text(text));
    }
}

/// The ESI elements Varnish knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    Include,
    Remove,
    Comment,
    Unknown,
}

/// The element named at the start of `tag`, and the rest of the tag. Varnish matches the
/// name as a prefix: `<esi:includes>` is an include whose attributes are broken.
fn element_name(tag: &[u8]) -> (Name, &[u8]) {
    for (name, word) in [
        (Name::Include, &b"include"[..]),
        (Name::Remove, b"remove"),
        (Name::Comment, b"comment"),
    ] {
        if starts_with_ci(tag, word) {
            return (name, &tag[word.len()..]);
        }
    }
    (Name::Unknown, tag)
}

/// The attributes of an ESI tag, and whether it ended in `/`.
#[derive(Debug)]
struct Tag<'a> {
    attrs: Vec<(&'a [u8], Option<&'a [u8]>)>,
    empty: bool,
}

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':'
}

fn is_name(b: u8) -> bool {
    is_name_start(b) || b.is_ascii_digit() || b == b'-' || b == b'.'
}

/// Reads what lies between an ESI tag's name and its `>` as Varnish does: attributes
/// each after white space, values quoted or ending at white space, a `/` only last.
fn attributes(s: &[u8]) -> Result<Tag<'_>, &'static str> {
    let mut tag = Tag {
        attrs: Vec::new(),
        empty: false,
    };
    let mut i = 0;
    let mut can_attr = false;
    loop {
        while s.get(i).is_some_and(|b| is_lws(*b)) {
            i += 1;
            can_attr = true;
        }
        if s.get(i) == Some(&b'/') {
            i += 1;
            tag.empty = true;
        }
        let Some(&b) = s.get(i) else {
            return Ok(tag);
        };
        if tag.empty {
            return Err("XML 1.0 '>' does not follow '/' in tag");
        }
        if !can_attr || !is_name_start(b) {
            return Err("XML 1.0 Illegal attribute start char");
        }
        let name_end = i + s[i..].iter().take_while(|b| is_name(**b)).count();
        let name = &s[i..name_end];
        i = name_end;
        match s.get(i) {
            Some(b'=') => {
                let (value, next) = attribute_value(s, i + 1)?;
                tag.attrs.push((name, Some(value)));
                i = next;
            }
            None | Some(b'/') => tag.attrs.push((name, None)),
            Some(b) if is_lws(*b) => tag.attrs.push((name, None)),
            Some(_) => return Err("XML 1.0 Illegal attr char"),
        }
    }
}

/// The value starting at `s[at]` (just after `=`), and where the tag goes on.
fn attribute_value(s: &[u8], at: usize) -> Result<(&[u8], usize), &'static str> {
    const UNTERMINATED: &str = "XML 1.0 Missing end attribute delimiter";
    match s.get(at) {
        Some(&q @ (b'"' | b'\'')) => {
            let len = s[at + 1..]
                .iter()
                .position(|b| *b == q)
                .ok_or(UNTERMINATED)?;
            Ok((&s[at + 1..at + 1 + len], at + len + 2))
        }
        Some(b) if is_lws(*b) => Err("XML 1.0 Illegal attribute delimiter"),
        // An unquoted value ends at white space; one that runs into the `>` is broken.
        _ => {
            let len = s[at..]
                .iter()
                .position(|b| is_lws(*b))
                .ok_or(UNTERMINATED)?;
            Ok((&s[at..at + len], at + len + 1))
        }
    }
}

/// The include an `<esi:include>` tag's attributes describe.
fn include_of(attrs: &[u8]) -> Result<Include, &'static str> {
    let (mut src, mut alt, mut onerror) = (None, None, None);
    for (name, value) in attributes(attrs)?.attrs {
        let slot = match name.to_ascii_lowercase().as_slice() {
            b"src" => &mut src,
            b"alt" => &mut alt,
            b"onerror" => &mut onerror,
            _ => continue,
        };
        let Some(value) = value else { continue };
        if slot.is_some() {
            return Err("ESI 1.0 <esi:include> has multiple src=, alt= or onerror= attributes");
        }
        *slot = Some(unescape(&String::from_utf8_lossy(value)));
    }
    match src {
        None => Err("ESI 1.0 <esi:include> lacks src attr"),
        // Varnish would fetch the page's own directory: never what was meant.
        Some(src) if src.is_empty() => Err("<esi:include> has an empty src"),
        Some(src) => Ok(Include {
            src,
            alt: alt.filter(|s| !s.is_empty()),
            continue_on_error: onerror.is_some_and(|v| v.eq_ignore_ascii_case("continue")),
        }),
    }
}

/// The few HTML entities that appear in URLs.
fn unescape(s: &str) -> String {
    s.replace("&amp;", "&")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
}

/// Whether [`parse`] would change anything in `page` (a cheap pre-check).
pub(crate) fn has_markup(page: &[u8]) -> bool {
    let mut at = 0;
    while let Some(lt) = next_lt(page, at) {
        if matches!(opener(page, lt).0, Opener::Esi { .. } | Opener::EsiComment) {
            return true;
        }
        at = lt + 1;
    }
    false
}

pub(crate) mod reference;

/// Properties on generated pages (proptest), sharing the unit tests' helpers.
#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use super::*;

    /// Owned, with neighbouring text joined: what a page renders to, piece by piece
    /// (dropped markup renders to nothing).
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
                (_, Segment::Dropped(_)) => {}
            }
        }
        out
    }

    /// The markup dropped from `page`, as `(include, why)`.
    pub(super) fn dropped(page: &[u8]) -> Vec<(bool, &'static str)> {
        parse(page)
            .into_iter()
            .filter_map(|s| match s {
                Segment::Dropped(d) => Some((d.include, d.why)),
                _ => None,
            })
            .collect()
    }

    /// `page` as Varnish serves it when each include's `src` answers `fragments[src]`
    /// (served as it is: the vtc fragments are not XML, so Varnish does not parse them).
    fn served(page: &str, fragments: &[(&str, &str)]) -> String {
        parse(page.as_bytes())
            .into_iter()
            .map(|s| match s {
                Segment::Text(t) => String::from_utf8(t.to_vec()).unwrap(),
                Segment::Include(i) => fragments
                    .iter()
                    .find(|(src, _)| *src == i.src)
                    .unwrap_or_else(|| panic!("unexpected include of {:?}", i.src))
                    .1
                    .to_string(),
                Segment::Dropped(_) => String::new(),
            })
            .collect()
    }

    /// What Varnish serves for `page` (see [`served`]), checked against the vtc's
    /// `resp.bodylen` and `esi_errors` counter.
    fn varnish_serves(
        page: &str,
        fragments: &[(&str, &str)],
        bodylen: usize,
        esi_errors: usize,
    ) -> String {
        let out = served(page, fragments);
        assert_eq!(out.len(), bodylen, "resp.bodylen of {out:?}");
        let errors = dropped(page.as_bytes());
        assert_eq!(errors.len(), esi_errors, "esi_errors: {errors:#?}");
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
        let page = br#"<p>a<esi:include src="/fragments/x?a=1&amp;b=2"/>b<ESI:INCLUDE src='/fragments/y' alt="/fragments/z" onerror="continue"></esi:include>c<esi:include src=/fragments/w />d"#;
        assert_eq!(
            pieces(page),
            vec![
                text("<p>a"),
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
        // The end tag is Varnish's error, dropped: not a malformed include.
        assert_eq!(
            dropped(page),
            vec![(false, "ESI 1.0 </esi:include> illegal end-tag")]
        );
    }

    #[test]
    fn remove_and_comment_blocks() {
        let page = b"<p>1<esi:remove><a href=/x>fallback</a></esi:remove>2<!--esi <p>only with ESI</p><esi:include src=\"/fragments/q\"/> -->3";
        assert_eq!(
            pieces(page),
            vec![
                text("<p>12 <p>only with ESI</p>"),
                Piece::Include(inc("/fragments/q")),
                text(" 3"),
            ]
        );
    }

    /// bin/varnishtest/tests/e00001.vtc: an include and an `<!--esi` inside a remove are
    /// both errors, removed with it; `<esX>` is no ESI tag.
    #[test]
    fn e00001_remove() {
        let page = "\n\t\t<esi:remove>\n\t\tThis is a test: Unseen University\n\t\t<esi:include src=\"trick question\">\n\t\t<!--esi XXX -->\n\t\t</esi:remove>\n\t\t<esX>This is a test: Hello world\n\t";
        let out = varnish_serves(page, &[], 40, 2);
        assert_eq!(out, "\n\t\t\n\t\t<esX>This is a test: Hello world\n\t");
    }

    /// bin/varnishtest/tests/e00002.vtc: a `</esi:remove>` in a CDATA section ends nothing.
    #[test]
    fn e00002_cdata_in_remove() {
        let page = "\n\t\t<esi:remove>\n\t\t<![CDATA[</esi:remove>]]>\n\t\tThis is a test: Unseen University\n\t\t</esi:remove>\n\t\tThis is a test: Hello world\n\t";
        let out = varnish_serves(page, &[], 35, 0);
        assert_eq!(out, "\n\t\t\n\t\tThis is a test: Hello world\n\t");
    }

    /// bin/varnishtest/tests/e00003.vtc: an unknown attribute is skipped.
    #[test]
    fn e00003_include() {
        let page = "\n\t\t<html>\n\t\tBefore include\n\t\t<esi:include src=\"/body\" sr=\"foo\"/>\n\t\tAfter include\n\t\t</html>\n\t";
        varnish_serves(page, &[("/body", "\n\t\tIncluded file\n\t")], 75, 0);
    }

    /// bin/varnishtest/tests/e00004.vtc and e00005.vtc (whose relative `src` is resolved by
    /// composition): an include inside `<!--esi … -->`.
    #[test]
    fn e00004_commented_include() {
        for src in ["/body", "body"] {
            let page = format!(
                "\n\t\t<html>\n\t\tBefore include\n\t\t<!--esi <esi:include src=\"{src}\"/> -->\n\t\tAfter include\n\t"
            );
            varnish_serves(&page, &[(src, "\n\t\tIncluded file\n\t")], 67, 0);
        }
    }

    /// bin/varnishtest/tests/e00007.vtc: a CDATA section outside a remove is kept whole.
    #[test]
    fn e00007_cdata_is_kept() {
        let page = "\n\t\t<html>filler\n\t\tThis is before the test\n\t\t<![CDATA[fooooooooooooooooooobar]]>\n\t\tfiller<esi:remove>\n\t\tThis is a test: Unseen University\n\t\tDepartment of cruel and unjust geography\n\t\t</esi:remove>\n\t\tThis is a test: Hello world\n\t";
        let out = varnish_serves(page, &[], 120, 0);
        assert!(out.contains("<![CDATA[fooooooooooooooooooobar]]>"), "{out}");
    }

    /// bin/varnishtest/tests/e00008.vtc: every error is removed (the line numbers are
    /// part of the page), the one good include among them is kept.
    #[test]
    fn e00008_parsing_errors() {
        let page = concat!(
            "\n\t\t<html>\t\t\t\t\t1\n\t\tBefore include\t\t\t\t2\n",
            "\t\t<!--esi <esi:include src=\"/body\"/> -->\t3\n\t\tAfter include\t\t\t\t4\n",
            "\t\t<!-- normal comment -->\t\t\t5\n\t\t<esi:bogosity/>\t\t\t\t6\n",
            "\t\t<esi:comment>\t\t\t\t7\n\t\t foo\t\t\t\t\t8\n\t\t </esi:comment>\t\t\t\t9\n",
            "\t\t<esi:comment bar />\t\t\t10\n\t\t\t\t\t\t\t11\n",
            "\t\t<esi:remove>\t\t\t\t12\n\t\t\t<esi:comment foo/>\t\t13\n\t\t</esi:remove>\t\t\t\t14\n",
            "\t\t\t\t\t\t\t15\n\t\t<esi:remove>\t\t\t\t16\n\t\t\t<esi:remove>\t\t\t17\n",
            "\t\t\tbar\t\t\t\t18\n\t\t\t</esi:remove>\t\t\t19\n\t\t</esi:remove>\t\t\t\t20\n",
            "\t\t</>\t\t\t\t\t21\n\t\t<esi:remove/>\t\t\t\t22\n\t\t\t\t\t\t\t23\n",
            "\t\t<esi:include\t\t\t\t24\n\t\n",
            "                                                             >\t25\n",
            "\t\t\t\t\t\t\t26\n\t\t<esi:include  aaa />\t\t\t27\n\t\t<esi:include  k?=./>\t\t\t28\n",
            "\t\t<esi:include  src/>\t\t\t29\n\t\t<esi:include  src=/>\t\t\t30\n",
            "\t\t<esi:include  src= />\t\t\t31\n\t\t</esi:include>\t\t\t\t32\n",
            "\t\t<esi:include  src=\"foofof />\t\t33\n\t\t<esi:include  foo=bar src=/body2 />\t34\n\t",
        );
        let body = "\n\t\tIncluded file\n\t\t<esi:remove>\n\t\t<Aaa\n\t";
        let body2 = "\n\t\tIncluded file 2\n\t\t<!--esi\n\t\t<![CDATA[fooo\n\t";
        let out = varnish_serves(page, &[("/body", body), ("/body2", body2)], 385, 15);
        assert!(!out.contains("<esi:bogosity") && !out.contains("esi:include  "));
        assert!(out.contains("\t\t</>\t\t\t\t\t21\n"), "not ESI: kept");
        let errors = dropped(page.as_bytes());
        // Lines 24, 27 to 31 and 33: broken includes, which composition reports.
        assert_eq!(errors.iter().filter(|(include, _)| *include).count(), 7);
    }

    /// bin/varnishtest/tests/e00009.vtc, second half (`+esi_disable_xml_check`): a body
    /// whose first non-blank byte is not `<` is processed too. (Varnish's default skips
    /// it; Tessera departs from that, see the module doc.)
    #[test]
    fn e00009_not_xml_is_processed_as_with_esi_disable_xml_check() {
        let page = "\n\t\tBefore include\n\t\t<esi:remove>\n\t\t\tbar\n\t\t</esi:remove>\n\t";
        varnish_serves(page, &[], 22, 0);
        assert!(has_markup(page.as_bytes()));
        assert!(has_markup(b" \r\n\t<p><esi:remove>x</esi:remove>"));
    }

    /// bin/varnishtest/tests/e00014.vtc: `<esi/>` is no ESI element.
    #[test]
    fn e00014_esi_detector() {
        let page = "           <a>   <esi/>                          ";
        varnish_serves(page, &[], 49, 0);
        assert!(!has_markup(page.as_bytes()));
    }

    /// bin/varnishtest/tests/e00018.vtc: the XML entities in a `src`.
    #[test]
    fn e00018_entity_references() {
        let page = "\n\t\t<esi:include src=\"&amp;\"/>\n\t\t<esi:include src=\"&lt;\"/>\n\t\t<esi:include src=\"&gt;\"/>\n\t\t<esi:include src=\"&apos;\"/>\n\t\t<esi:include src=\"&quot;\"/>\n\t";
        let fragments = [("&", "1"), ("<", "22"), (">", "333"), ("'", "4444")];
        let fragments = [fragments.as_slice(), &[("\"", "55555")]].concat();
        varnish_serves(page, &fragments, 32, 0);
    }

    /// bin/varnishtest/tests/e00019.vtc: the corners of the parser, one chunk a line.
    #[test]
    fn e00019_corners() {
        let filler = |n| "x".repeat(n);
        let page = [
            "<1></esi:comment foo><1>",
            "<2><esi:comment / ><esi:comment doo><2>",
            "<3><esi:remove foo=\"bar\"></esi:remove><3>",
            "<4><esi:include src=\"foo\"><esi:incl><4>",
            "<H1><esi:remove>",
            &filler(256),
            "</esi:remove></H1>",
            "<H2><esi:remove>",
            &filler(65536),
            "</esi:remove></H2>",
            "<esi:comment/>",
            &filler(256),
            "<esi:comment/>",
            &filler(65536),
            "<esi:comment/>",
        ]
        .concat();
        let out = varnish_serves(&page, &[("foo", "<INCL>")], 65840, 4);
        assert!(out.starts_with("<1><1><2><2><3><3><4><INCL><4><H1></H1><H2></H2>x"));
    }

    #[test]
    fn unknown_elements_and_stray_end_tags_are_removed() {
        let page = b"<p>a<esi:choose><esi:when test=\"1\">x</esi:when></esi:choose>b</esi:remove>c</esi:include>d</esi:foo>e<esi:comment text='note'/>f</p>";
        assert_eq!(pieces(page), vec![text("<p>axbcdef</p>")]);
        assert!(dropped(page).iter().all(|(include, _)| !include));
        assert_eq!(dropped(page).len(), 7);
    }

    /// Blocks do not nest: the inner opener is an error, the first closer ends the block,
    /// the second is a stray closer; neither reaches the page.
    #[test]
    fn a_nested_remove_leaks_nothing() {
        let page = b"<p>1<esi:remove>a<esi:remove>b</esi:remove>2</esi:remove>3</p>";
        assert_eq!(pieces(page), vec![text("<p>123</p>")]);
        assert_eq!(
            dropped(page),
            vec![
                (false, "ESI 1.0 <esi:remove> already open"),
                (false, "ESI 1.0 <esi:remove> not open")
            ]
        );
    }

    #[test]
    fn comments_and_cdata_are_not_looked_into() {
        let page = b"<p><!-- <esi:include src=\"/f\"/> --><![CDATA[<esi:remove>]]><a title=\"<esi:include src='/f'/>\">x</a></p>";
        assert_eq!(pieces(page), vec![text(std::str::from_utf8(page).unwrap())]);
        // Inside `<!--esi`, a plain comment ends the ESI comment: its `-->` stays.
        let page = b"<p><!--esi a<!-- b -->c -->d</p>";
        assert_eq!(pieces(page), vec![text("<p> a<!-- b -->c -->d</p>")]);
    }

    #[test]
    fn malformed_includes_are_removed_and_reported() {
        for page in [
            "<esi:include alt=\"/a\"/>",            // no src
            "<esi:include src=\"\"/>",              // empty src
            "<esi:include src/>",                   // src without a value
            "<esi:include src=/fragments/a/>",      // unquoted up to the `>`
            "<esi:include src=\"/fragments/a/>",    // unterminated quote
            "<esi:include src= \"/fragments/a\"/>", // blank after `=`
            "<esi:include src=\"/f\" src=\"/g\"/>", // two `src`
            "<esi:include src=\"/f\" 1a=\"1\"/>",   // not an attribute start
            "<esi:include src=\"/f\" =\"1\"/>",     // no name
            "<esi:include src=\"/f\"/x>",           // `/` not last
            "<esi:include src=\"/f\" / >",          // `/` not last
            "<esi:includex src=\"/f\"/>",           // the name runs on
            "<esi:include src=\"/f\" <b>",          // a tag inside the tag
            "<esi:include>",
            "<esi:include/>",
            "<esi:include src=\"/fragments/x\"", // unterminated: to the end
            "<esi:include src=\"/a?q=>\"/>",     // `>` ends the tag
        ] {
            let kept: Vec<u8> = pieces(format!("<p>{page}</p>").as_bytes())
                .into_iter()
                .flat_map(|p| match p {
                    Piece::Text(t) => t,
                    Piece::Include(i) => panic!("{page:?} included {i:?}"),
                })
                .collect();
            let kept = String::from_utf8(kept).unwrap();
            assert!(
                !kept.contains("esi:") && !kept.contains("src"),
                "{page:?}: {kept:?}"
            );
            assert!(kept.starts_with("<p>"), "{page:?}: {kept:?}");
            let errors = dropped(page.as_bytes());
            assert_eq!(errors.len(), 1, "{page:?}: {errors:?}");
            assert!(errors[0].0, "{page:?} is a malformed include");
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
            "<p></esi:remove>",
            "text first <esi:include src=\"/fragments/a\"/>",
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
        let page = b"<esi:include\tsrc=\"/fragments/a?x=&quot;1&quot;&amp;y=&#39;2&#39;&lt;&gt;\" \n alt='/fragments/b' data-x_y:z defer onerror=CONTINUE />";
        assert_eq!(
            pieces(page),
            vec![Piece::Include(Include {
                src: "/fragments/a?x=\"1\"&y='2'<>".into(),
                alt: Some("/fragments/b".into()),
                continue_on_error: true,
            })]
        );
        // An unquoted value ends at white space.
        let page = b"<esi:include src=/fragments/a alt=/fragments/b />";
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

    /// A quoted value may hold `<` and the other quote; the first `>` ends the tag, as in
    /// Varnish, so a value holding one is broken and what follows it is text.
    #[test]
    fn quoted_values_may_hold_tag_openers_but_not_closers() {
        let page = br#"<p>x<esi:include src="/fragments/a?q=<" alt='/fragments/"b"'/>y<esi:include src="/a?q=>b"/>z</p>"#;
        assert_eq!(
            pieces(page),
            vec![
                text("<p>x"),
                Piece::Include(Include {
                    src: "/fragments/a?q=<".into(),
                    alt: Some("/fragments/\"b\"".into()),
                    continue_on_error: false,
                }),
                text("yb\"/>z</p>"),
            ]
        );
    }

    #[test]
    fn an_include_without_a_final_slash_is_read_and_its_end_tag_dropped() {
        let page = b"<p>a<esi:include src=\"/fragments/a\"> \n\t</ESI:INCLUDE>b<esi:include src=\"/fragments/b\">text</esi:include>c</p>";
        assert_eq!(
            pieces(page),
            vec![
                text("<p>a"),
                Piece::Include(inc("/fragments/a")),
                text(" \n\tb"),
                Piece::Include(inc("/fragments/b")),
                text("textc</p>"),
            ]
        );
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

    /// Varnish drops an unterminated opener and goes on: `<!--esi` loses its marker,
    /// `<esi:remove>` and a broken ESI tag take the rest of the page.
    #[test]
    fn unterminated_blocks_end_with_the_page() {
        assert_eq!(
            pieces(b"<p><!--esi never closed"),
            vec![text("<p> never closed")]
        );
        assert_eq!(pieces(b"<p><esi:remove>never closed"), vec![text("<p>")]);
        assert_eq!(
            pieces(b"<p><esi:include src=\"/f\" never"),
            vec![text("<p>")]
        );
        for kept in [
            "<p><!-- never closed",
            "<p><![CDATA[ never",
            "<p><a href='x'",
        ] {
            assert_eq!(pieces(kept.as_bytes()), vec![text(kept)]);
        }
    }

    #[test]
    fn a_page_of_unterminated_openers_is_read_in_one_pass() {
        // Each opener's closer is looked for once, from that opener on, and what it
        // spans is not looked at again: no opener scans the page twice. (The property
        // tests time bigger pages.)
        for (opener, kept) in [
            ("<!--esi ", 7),
            ("<esi:remove>", 0),
            ("<esi:include src=/a>", 0),
            ("<!-- ", usize::MAX),
            ("<p ", usize::MAX),
        ] {
            let page = opener.repeat(256 * 1024 / opener.len());
            let out: usize = pieces(page.as_bytes())
                .iter()
                .map(|p| match p {
                    Piece::Text(t) => t.len(),
                    Piece::Include(_) => 0,
                })
                .sum();
            let expected = match kept {
                usize::MAX => page.len(),
                0 => 0,
                n => page.len() - n,
            };
            assert_eq!(out, expected, "{opener:?}");
        }
    }

    #[test]
    fn non_utf8_bytes_do_not_break_parsing() {
        let page =
            b"<p>\xff\xfe<esi:include src=\"/fragments/a\"/>\xff<esi:include src=\"/\xff\"/>";
        assert_eq!(
            pieces(page),
            vec![
                Piece::Text(b"<p>\xff\xfe".to_vec()),
                Piece::Include(inc("/fragments/a")),
                Piece::Text(b"\xff".to_vec()),
                Piece::Include(inc("/\u{fffd}")),
            ]
        );
    }
}
