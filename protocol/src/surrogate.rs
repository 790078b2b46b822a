//! `Surrogate-Control`: what an upstream answer asks of the surrogate in front of it
//! (Edge Architecture Specification). Tessera reads one directive, `content="ESI/1.0"`:
//! pages and fragment renders are composed only when they ask. The header is for
//! surrogates, not clients, so the gateway removes it from what it sends on. Every request
//! to the upstream says in `Surrogate-Capability` that ESI may be answered.

use http::HeaderMap;

/// The answer header that carries surrogate directives.
pub const HEADER: &str = "surrogate-control";

/// The request header by which a surrogate says what it can do (Edge Architecture
/// Specification): sent with every request to the upstream, proxied pages and fragment
/// renders alike, so the application (or a helper of it) knows it may answer with ESI.
pub const CAPABILITY_HEADER: &str = "surrogate-capability";

/// [`CAPABILITY_HEADER`]'s value: the surrogate `tessera` processes ESI 1.0.
pub const CAPABILITY: &str = "tessera=\"ESI/1.0\"";

/// Whether an upstream answer asks a surrogate to process ESI: `Surrogate-Control`
/// with `content="ESI/1.0"` (Edge Architecture Specification). Pages and fragment
/// renders are composed only when they ask.
pub fn asks_for_esi(headers: &HeaderMap) -> bool {
    headers
        .get_all(HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.to_ascii_lowercase()
                .replace(' ', "")
                .contains("content=\"esi/1.0\"")
        })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn esi_is_asked_for_by_surrogate_control_only() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.append("surrogate-control", HeaderValue::from_static(v));
            h
        };
        assert!(asks_for_esi(&with(r#"content="ESI/1.0""#)));
        assert!(asks_for_esi(&with(r#"max-age=60, content = "esi/1.0""#)));
        assert!(!asks_for_esi(&with("max-age=60")));
        assert!(!asks_for_esi(&HeaderMap::new()));
    }
}
