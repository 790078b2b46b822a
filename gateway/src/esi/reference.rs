//! An include's `src` as a URI reference (RFC 3986 §5), resolved against the request of
//! the page it is in: what it names on this gateway, if anything.
//!
//! - `/fragments/x?id=1` (an absolute path), `../fragments/x`, `x?id=1`: resolved against
//!   the page's path, dot segments removed.
//! - `http://host/…` and `//host/…`: on this gateway when `host` is the one the page was
//!   asked of (its `Host`), as Varnish sends such an include to the backend of that host.
//!   Any other host, any other scheme (`https:` included, which Varnish ignores by
//!   default) and any user information name nothing here.
//!
//! Only the path and query come out: the caller still maps them to a configured route.

/// What `src` names on this gateway, as `/path?query`, when the page was asked of `host`
/// at `base` (its path and query); `None` when it names something elsewhere.
pub(crate) fn resolve(src: &str, host: Option<&str>, base: &str) -> Option<String> {
    let src = src.split_once('#').map_or(src, |(before, _)| before);
    if let Some((scheme, rest)) = scheme(src) {
        return match scheme.eq_ignore_ascii_case("http") {
            true => on_host(rest.strip_prefix("//")?, host?),
            false => None,
        };
    }
    if let Some(rest) = src.strip_prefix("//") {
        return on_host(rest, host?);
    }
    let (path, query) = split_query(src);
    let (base_path, base_query) = split_query(base);
    let (path, query) = if path.is_empty() {
        (base_path.to_string(), query.or(base_query))
    } else if path.starts_with('/') {
        (remove_dot_segments(path), query)
    } else {
        // RFC 3986 §5.2.3: the base path up to its last `/`, then the reference.
        let dir = base_path.rfind('/').map_or("/", |i| &base_path[..=i]);
        let dir = if dir.starts_with('/') { dir } else { "/" };
        (remove_dot_segments(&format!("{dir}{path}")), query)
    };
    Some(with_query(path, query))
}

/// The scheme of an absolute URI (`http` of `http://…`), and what follows its `:`.
fn scheme(src: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = src.split_once(':')?;
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some((scheme, rest))
}

/// The path and query of `authority/path?query` when the authority is `host`.
fn on_host(rest: &str, host: &str) -> Option<String> {
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') || !same_host(authority, host) {
        return None;
    }
    let (path, query) = split_query(path);
    let path = if path.is_empty() { "/" } else { path };
    Some(with_query(remove_dot_segments(path), query))
}

/// Authorities compared as HTTP compares them: host in any case, port 80 when none.
fn same_host(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        let s = s.to_ascii_lowercase();
        match s.strip_suffix(":80") {
            Some(bare) => bare.to_string(),
            None => s,
        }
    };
    !a.is_empty() && norm(a) == norm(b)
}

fn split_query(s: &str) -> (&str, Option<&str>) {
    s.split_once('?').map_or((s, None), |(p, q)| (p, Some(q)))
}

fn with_query(path: String, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

/// RFC 3986 §5.2.4 for an absolute path: `.` segments go, `..` takes the one before it
/// (never above the root), and a path ending in either ends in `/`.
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
        if last && matches!(*segment, "." | "..") {
            out.push("");
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Option<&str> = Some("shop.example:8080");

    fn at(src: &str, base: &str) -> Option<String> {
        resolve(src, HOST, base)
    }

    #[test]
    fn relative_references_resolve_against_the_page() {
        for (src, base, expected) in [
            ("/frag/x", "/a/b?q=1", "/frag/x"),
            ("../fragments/x", "/shop/cart", "/fragments/x"),
            ("x?id=1", "/fragments/list?id=9", "/fragments/x?id=1"),
            ("x?id=1", "/", "/x?id=1"),
            ("?id=2", "/fragments/x?id=1", "/fragments/x?id=2"),
            ("", "/fragments/x?id=1", "/fragments/x?id=1"),
            ("#top", "/p", "/p"),
            ("./a/./b/../c#frag", "/d/e", "/d/a/c"),
            ("../../../../x", "/a/b", "/x"),
            ("..", "/a/b/c", "/a/"),
            ("/a/b/.", "/", "/a/b/"),
            ("a//b", "/c/", "/c/a//b"),
            // bin/varnishtest/tests/e00005.vtc: `body` in the page `/foo/bar`.
            ("body", "/foo/bar", "/foo/body"),
        ] {
            assert_eq!(
                at(src, base).as_deref(),
                Some(expected),
                "{src:?} in {base:?}"
            );
        }
    }

    #[test]
    fn absolute_urls_name_this_gateway_only_on_its_own_host() {
        let base = "/page";
        for (src, expected) in [
            ("http://shop.example:8080/frag/x?id=1", Some("/frag/x?id=1")),
            ("HTTP://Shop.Example:8080/frag/../frag/x", Some("/frag/x")),
            ("//shop.example:8080/frag/x", Some("/frag/x")),
            ("http://shop.example:8080", Some("/")),
            ("http://shop.example:8080?x=1", Some("/?x=1")),
            ("http://shop.example/frag/x", None),
            ("http://other.example:8080/frag/x", None),
            ("http://user@shop.example:8080/frag/x", None),
            ("https://shop.example:8080/frag/x", None),
            ("javascript:alert(1)", None),
            ("http:/frag/x", None),
            ("http:///frag/x", None),
        ] {
            assert_eq!(at(src, base).as_deref(), expected, "{src:?}");
        }
        assert_eq!(
            resolve("http://shop.example/x", Some("SHOP.example:80"), base).as_deref(),
            Some("/x"),
            "port 80 is the default"
        );
        // bin/varnishtest/tests/e00006.vtc: Varnish fetches `http://bozz/body` of the page
        // asked of `froboz` from bozz's backend; Tessera fetches no other host.
        assert_eq!(
            resolve("http://bozz/body", Some("froboz"), "/foo/bar"),
            None
        );
        assert_eq!(
            resolve("http://x/frag", None, base),
            None,
            "no Host, no match"
        );
    }
}
