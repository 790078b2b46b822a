//! Render paths closed to the public.
//!
//! A route's `render` path is for the workers: a public request for it would load the
//! upstream with exactly the work the cache and the build queue exist to keep off it. So
//! unless `gateway.public_render_paths` opens them, public requests for a render path
//! are answered 404 and never proxied.
//!
//! The match has to hold however the upstream routes a path, since that is what an
//! attacker aims at, so a request path is refused when any reading of it reaches a
//! render path or below it:
//! - percent-encoding is decoded (up to [`MAX_DECODINGS`] times, for servers that decode
//!   twice), `%2F` included, as WSGI servers hand Django a decoded path;
//! - `\` counts as `/`; a decoded `?`, `#` or NUL ends the path;
//! - `.` and `..` segments are resolved, empty ones dropped (`//`, a trailing `/`), and
//!   `;parameters` and trailing spaces cut off each segment (servlet containers);
//! - letters match in any case (case-insensitive servers and file systems);
//! - what follows the render path may be a `.format` (Rails' `(.:format)`) or further
//!   segments (frameworks that mount a handler on a prefix).
//!
//! Refusing a little too much costs nothing here: nothing public lives under a render
//! path.

use tessera_protocol::Config;

/// Most rounds of percent-decoding a request path is read through.
pub(crate) const MAX_DECODINGS: usize = 3;

/// The render paths a gateway refuses to proxy, in their normalized form.
#[derive(Debug, Clone, Default)]
pub(crate) struct RenderPaths {
    closed: Vec<String>,
}

impl RenderPaths {
    /// The render paths of `config`'s routes, as the upstream sees them (under the path
    /// of `upstream.url`); none when `gateway.public_render_paths` opens them.
    pub(crate) fn new(config: &Config) -> Self {
        if config.gateway.public_render_paths {
            return Self::default();
        }
        let base = config.upstream.url.uri().path().trim_end_matches('/');
        let mut closed: Vec<String> = config
            .fragments
            .iter()
            .map(|r| normalize(&format!("{base}{}", r.render)))
            .collect();
        closed.sort();
        closed.dedup();
        Self { closed }
    }

    /// Whether a public request for `path` (its request target's path) must be refused.
    pub(crate) fn closes(&self, path: &str) -> bool {
        if self.closed.is_empty() {
            return false;
        }
        readings(path).any(|reading| {
            self.closed.iter().any(|closed| {
                // `/` alone closes everything: a render path at the root.
                closed == "/"
                    || reading.strip_prefix(closed.as_str()).is_some_and(|rest| {
                        rest.is_empty() || rest.starts_with('/') || rest.starts_with('.')
                    })
            })
        })
    }
}

/// `path` normalized as read raw and after each round of percent-decoding, until
/// decoding changes nothing.
fn readings(path: &str) -> impl Iterator<Item = String> + '_ {
    let mut next = Some(path.to_string());
    let mut round = 0;
    std::iter::from_fn(move || {
        let current = next.take()?;
        if round < MAX_DECODINGS {
            round += 1;
            let decoded = percent_encoding::percent_decode_str(&current)
                .decode_utf8_lossy()
                .into_owned();
            if decoded != current {
                next = Some(decoded);
            }
        }
        Some(normalize(&current))
    })
}

/// One reading of a path: see the module doc. Always starts with `/`, never ends with
/// one unless it is `/`, lower-case.
fn normalize(path: &str) -> String {
    let end = path.find(['?', '#', '\0']).unwrap_or(path.len());
    let mut segments: Vec<String> = Vec::new();
    for raw in path[..end].split(['/', '\\']) {
        let segment = raw.split(';').next().unwrap_or("").trim_end();
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s.to_ascii_lowercase()),
        }
    }
    format!("/{}", segments.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_protocol::FragmentRoute;

    fn paths(renders: &[&str], upstream: &str) -> RenderPaths {
        let mut c = Config::default();
        c.upstream.url = upstream.parse().unwrap();
        c.fragments = renders
            .iter()
            .enumerate()
            .map(|(i, r)| FragmentRoute::new(format!("r{i}"), *r))
            .collect();
        RenderPaths::new(&c)
    }

    #[test]
    fn every_spelling_of_a_render_path_is_closed() {
        let p = paths(&["/_render/slow", "/_render/Mixed/"], "http://app");
        for hostile in [
            "/_render/slow",
            "/_render/slow/",
            "/_render/slow//",
            "//_render//slow",
            "/_RENDER/SLOW",
            "/_render/slow.json",
            "/_render/slow.",
            "/_render/slow/anything",
            "/_render/slow;jsessionid=1",
            "/_render/slow%20",
            "/%5Frender/%73low",
            "/_render%2Fslow",
            "/_render%2fslow",
            "/_render%252Fslow",
            "/_render%25252Fslow",
            "/x/../_render/slow",
            "/x/%2e%2e/_render/slow",
            "/_render/./slow",
            "/_render/x/..%2Fslow",
            "\\_render\\slow",
            "/_render%5Cslow",
            "/_render/slow%3F",
            "/_render/slow%23x",
            "/_render/slow%00.html",
            "/../../_render/slow",
            "/_render/mixed",
            "/_render/MIXED/x",
        ] {
            assert!(p.closes(hostile), "{hostile} reaches the upstream");
        }
        for open in [
            "/",
            "/_render",
            "/_render/",
            "/_render/slower",
            "/_render/other",
            "/products/_render/slow",
            "/_render/slo",
            "/_render%2Fslo",
        ] {
            assert!(!p.closes(open), "{open} is refused");
        }
    }

    #[test]
    fn render_paths_are_read_under_the_upstream_s_own_path() {
        let p = paths(&["/_render/slow"], "http://app/base/");
        assert!(p.closes("/base/_render/slow"));
        assert!(p.closes("/BASE//_render/slow/"));
        assert!(!p.closes("/_render/slow"), "not where the upstream renders");
    }

    #[test]
    fn opened_render_paths_close_nothing() {
        let mut c = Config {
            fragments: vec![FragmentRoute::new("slow", "/_render/slow")],
            ..Config::default()
        };
        c.gateway.public_render_paths = true;
        assert!(!RenderPaths::new(&c).closes("/_render/slow"));
        assert!(!paths(&[], "http://app").closes("/_render/slow"));
    }

    #[test]
    fn decoding_stops() {
        // Each round removes one level; past the limit the rest is taken as it is.
        let deep = "/_render%2525252Fslow";
        assert_eq!(readings(deep).count(), MAX_DECODINGS + 1);
        assert!(!paths(&["/_render/slow"], "http://app").closes(deep));
        assert_eq!(readings("/plain").count(), 1);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use tessera_protocol::FragmentRoute;

    /// One way of writing a character of a path that the upstream reads as the same.
    fn spell(c: char, how: u8) -> String {
        match how % 4 {
            0 => c.to_string(),
            1 => c.to_ascii_uppercase().to_string(),
            2 => format!("%{:02X}", c as u32),
            _ => format!("%25{:02x}", c as u32),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// However a render path is spelt (case, percent-encoding once or twice, repeated
        /// slashes, `x/..` detours, a trailing slash or format), it is closed.
        #[test]
        fn every_spelling_is_closed(
            segments in proptest::collection::vec("[a-z0-9_-]{1,8}", 1..4),
            hows in proptest::collection::vec(any::<u8>(), 64),
            detour in any::<bool>(),
            tail in prop::sample::select(vec!["", "/", "//", ".json", "/x", ";p=1"]),
        ) {
            let render = format!("/{}", segments.join("/"));
            let c = Config {
                fragments: vec![FragmentRoute::new("r", render.clone())],
                ..Config::default()
            };
            let closed = RenderPaths::new(&c);
            let mut spelt = String::new();
            for (i, seg) in segments.iter().enumerate() {
                spelt.push_str(if i % 2 == 0 { "/" } else { "//" });
                if detour {
                    spelt.push_str("zz/../");
                }
                for (j, ch) in seg.chars().enumerate() {
                    spelt.push_str(&spell(ch, hows[(i * 8 + j) % hows.len()]));
                }
            }
            spelt.push_str(tail);
            prop_assert!(closed.closes(&spelt), "{} as {}", render, spelt);
        }

        /// A reading is already normal: normalizing it again changes nothing.
        #[test]
        fn normalizing_is_idempotent(path in "[/a-zA-Z.;%0-9\\\\?]{0,40}") {
            let once = normalize(&path);
            prop_assert_eq!(normalize(&once), once.clone());
            prop_assert!(once.starts_with('/'));
        }

        /// Paths that share no segment with the render path stay open.
        #[test]
        fn other_paths_stay_open(path in "(/[a-z]{1,6}){1,4}/?") {
            let c = Config {
                fragments: vec![FragmentRoute::new("r", "/_render/r")],
                ..Config::default()
            };
            prop_assert!(!RenderPaths::new(&c).closes(&path));
        }
    }
}
