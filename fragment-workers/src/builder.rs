//! How a fragment is rendered: the [`FragmentBuilder`] trait and its default, the
//! [`HttpBuilder`], which GETs the route's render path on the upstream application.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use tessera_protocol::config::{Config, RENDER_TOKEN_HEADER, VarySource};
use tessera_protocol::surrogate;
use tessera_protocol::tags::{self, TagError};
use tessera_protocol::{BuildRequest, Cause, FragmentRoute};
use tessera_runtime::otel;

/// A rendered fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The fragment.
    pub body: Bytes,
    /// Its `Content-Type`.
    pub content_type: String,
    /// The render answer asked for ESI processing (`Surrogate-Control:
    /// content="ESI/1.0"`): its `<esi:…>` tags are composed when it is served.
    pub esi: bool,
    /// Its tags (the render answer's `Surrogate-Key`), by which it can be purged along
    /// with every other fragment carrying one of them. The worker checks them against
    /// [`tessera_protocol::tags`]' limits: a list over a limit fails the build.
    pub tags: Vec<String>,
}

/// Why a build failed: who is to blame, and whether trying again can help.
///
/// It is `Clone` (the worker reports one error to several places), so sources are kept
/// as a [`Cause`], which shares them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BuildError {
    /// The upstream answered 5xx: its fault, maybe passing.
    #[error("upstream answered {0}")]
    UpstreamServer(StatusCode),
    /// The upstream answered 4xx: the request is wrong, asking again will not help.
    #[error("upstream answered {0}")]
    UpstreamClient(StatusCode),
    /// The upstream answered 3xx: fragments are never fetched through redirects.
    #[error("upstream answered {0} (redirects are not followed)")]
    UpstreamRedirect(StatusCode),
    /// No complete answer within the route's `build_timeout`.
    #[error("no answer within build_timeout ({0:?})")]
    Timeout(Duration),
    /// The upstream could not be reached, or the connection broke.
    #[error("upstream unreachable: {0}")]
    Connect(#[source] Cause),
    /// The render request could not be made from the build request (a vary header name
    /// that is not a valid header name): a problem of the request or the config, which a
    /// retry cannot fix.
    #[error("cannot build the render request: {0}")]
    Request(#[source] Cause),
    /// The render answer is marked private (`Cache-Control: private` or `no-store`) but
    /// the route has no `vary`: stored, it would be served to every user.
    #[error(
        "route {route:?}: the render answer is marked Cache-Control: {directive}, and the \
         route has no `vary`, so it would be served to every user; add `vary` (e.g. the \
         session cookie) to the route, make the render path answer with a shareable \
         Cache-Control (e.g. public), or set `shareable = true` on the route"
    )]
    Private {
        /// The route.
        route: String,
        /// `private` or `no-store`.
        directive: &'static str,
    },
    /// The fragment is bigger than the store takes.
    #[error(
        "fragment too large: it takes {size} bytes or more in the store (body, key and \
         envelope), over store.max_item_size ({max} bytes)"
    )]
    TooLarge {
        /// Bytes the stored item takes, at least: the body, or the body with its key and
        /// envelope.
        size: usize,
        /// `store.max_item_size`.
        max: usize,
    },
    /// The render answer came in a `Content-Encoding` that cannot be read (unsupported or
    /// corrupt): what is stored must be the fragment itself.
    #[error("cannot read the render answer: {0}")]
    Coding(#[source] Cause),
    /// The render answer's tags (`Surrogate-Key`) are over a limit or not token
    /// characters: the same answer fails the same way, so it is not retried.
    #[error("the render answer's Surrogate-Key is refused: {0}")]
    Tags(#[from] TagError),
    /// The builder panicked.
    #[error("the fragment builder panicked")]
    Panicked,
    /// The store could not take the result.
    #[error("store: {0}")]
    Store(#[source] Cause),
}

impl BuildError {
    /// Whether a later attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            BuildError::UpstreamServer(_)
                | BuildError::Timeout(_)
                | BuildError::Connect(_)
                | BuildError::Store(_)
        )
    }
}

/// Renders fragments. Implement it to build fragments some other way than over HTTP.
#[async_trait]
pub trait FragmentBuilder: Send + Sync + std::fmt::Debug + 'static {
    /// Renders `request` for `route`. The worker bounds the call by `route.build_timeout`
    /// and catches panics; implementations should still honour the timeout themselves.
    async fn build(
        &self,
        route: &FragmentRoute,
        request: &BuildRequest,
    ) -> Result<Rendered, BuildError>;
}

/// The default builder: `GET {upstream.url}{render}?{params}` with the vary headers and
/// cookies of the request, and nothing else from the browser. It says it is a surrogate
/// that processes ESI (`Surrogate-Capability`, as proxied requests do) and, when
/// `workers.render_token` is set, proves it is a worker (`Tessera-Render-Token`).
///
/// A configuration reload gives it a new upstream, timeout and token
/// ([`HttpBuilder::reconfigure`]); a render under way finishes with the ones it began with.
#[derive(Debug)]
pub struct HttpBuilder {
    settings: arc_swap::ArcSwap<Settings>,
}

/// What an [`HttpBuilder`] renders with, from one configuration.
#[derive(Debug)]
struct Settings {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// `upstream.url` without trailing `/`, which the render path follows.
    base: String,
    max_body: usize,
    user_agent: HeaderValue,
    /// `workers.render_token`, marked sensitive (it prints as `Sensitive`).
    render_token: Option<HeaderValue>,
}

impl HttpBuilder {
    /// A builder for the upstream and item size limit of `config`.
    pub fn new(config: &Config) -> Result<Self, BuildError> {
        Ok(Self {
            settings: arc_swap::ArcSwap::from_pointee(Settings::new(config)?),
        })
    }

    /// Renders from now on with `config`'s upstream, timeout, token and size limit.
    pub fn reconfigure(&self, config: &Config) -> Result<(), BuildError> {
        self.settings
            .store(std::sync::Arc::new(Settings::new(config)?));
        Ok(())
    }
}

impl Settings {
    fn new(config: &Config) -> Result<Self, BuildError> {
        let token = &config.workers.render_token;
        let render_token = if token.is_empty() {
            None
        } else {
            // Validated at load as header-safe; one built in code may not have been.
            let mut value =
                HeaderValue::from_str(token).map_err(|e| BuildError::Request(Cause::new(e)))?;
            value.set_sensitive(true);
            Some(value)
        };
        Ok(Self {
            client: tessera_runtime::upstream::client(config.upstream.timeout),
            base: config.upstream.url.base().to_string(),
            max_body: tessera_protocol::backends::item_limit(config),
            user_agent: HeaderValue::from_static(concat!(
                "tessera-worker/",
                env!("CARGO_PKG_VERSION")
            )),
            render_token,
        })
    }

    fn request(
        &self,
        route: &FragmentRoute,
        req: &BuildRequest,
    ) -> Result<Request<Empty<Bytes>>, BuildError> {
        let query = req.identity.query_string();
        let uri = if query.is_empty() {
            format!("{}{}", self.base, route.render)
        } else {
            format!("{}{}?{query}", self.base, route.render)
        };
        // Fragments are stored as they are served before compression: ask for them plain
        // (a coded answer is still read, see `decode`).
        let mut builder = Request::get(uri)
            .header(header::USER_AGENT, self.user_agent.clone())
            .header(header::ACCEPT_ENCODING, "identity");
        let mut cookies = Vec::new();
        for (spec, value) in &req.identity.vary {
            match spec.parse::<VarySource>() {
                Ok(VarySource::Header(name)) => {
                    let name = HeaderName::from_bytes(name.as_bytes())
                        .map_err(|e| BuildError::Request(Cause::new(e)))?;
                    builder = builder.header(name, value.as_str());
                }
                Ok(VarySource::Cookie(name)) => cookies.push(format!("{name}={value}")),
                Err(_) => {}
            }
        }
        if !cookies.is_empty() {
            builder = builder.header(header::COOKIE, cookies.join("; "));
        }
        if !req.trace_id.is_empty() {
            builder = builder.header("x-request-id", req.trace_id.as_str());
        }
        builder = builder.header(
            surrogate::CAPABILITY_HEADER,
            HeaderValue::from_static(surrogate::CAPABILITY),
        );
        let mut request = builder
            .body(Empty::new())
            .map_err(|e| BuildError::Request(Cause::new(e)))?;
        // Inserted last, over any header of that name: the token is the worker's alone.
        if let Some(token) = &self.render_token {
            request
                .headers_mut()
                .insert(RENDER_TOKEN_HEADER, token.clone());
        }
        // The render span (the worker's current one) is this request's parent: the
        // application's own tracing joins the trace through it.
        if otel::on() {
            otel::inject(&otel::Context::current(), request.headers_mut());
        }
        Ok(request)
    }

    /// Sends the render `request` and reads the answer into a fragment, checking it in the
    /// order a failing answer is reported: status, privacy, tags, then the body.
    async fn fetch(
        &self,
        route: &FragmentRoute,
        request: Request<Empty<Bytes>>,
    ) -> Result<Rendered, BuildError> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| BuildError::Connect(Cause::new(e)))?;
        check_answer(route, response.status(), response.headers())?;
        let headers = response.headers();
        let esi = tessera_protocol::surrogate::asks_for_esi(headers);
        let tags = tags_of(headers)?;
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("text/html; charset=utf-8")
            .to_string();
        let coding = headers
            .get(header::CONTENT_ENCODING)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let body = read_body(response.into_body(), self.max_body).await?;
        let body = decode(body, coding, self.max_body)?;
        Ok(Rendered {
            body,
            content_type,
            esi,
            tags,
        })
    }
}

#[async_trait]
impl FragmentBuilder for HttpBuilder {
    async fn build(
        &self,
        route: &FragmentRoute,
        req: &BuildRequest,
    ) -> Result<Rendered, BuildError> {
        let settings = self.settings.load_full();
        let request = settings.request(route, req)?;
        tokio::time::timeout(route.build_timeout, settings.fetch(route, request))
            .await
            .map_err(|_| BuildError::Timeout(route.build_timeout))?
    }
}

/// Refuses a render answer that is not a success, or that is marked private while the
/// route would share it between users.
fn check_answer(
    route: &FragmentRoute,
    status: StatusCode,
    headers: &http::HeaderMap,
) -> Result<(), BuildError> {
    if status.is_server_error() {
        return Err(BuildError::UpstreamServer(status));
    }
    if status.is_client_error() {
        return Err(BuildError::UpstreamClient(status));
    }
    if !status.is_success() {
        return Err(BuildError::UpstreamRedirect(status));
    }
    if let Some(directive) = private(headers)
        && route.vary.is_empty()
        && !route.shareable
    {
        return Err(BuildError::Private {
            route: route.name.clone(),
            directive,
        });
    }
    Ok(())
}

/// The answer's tags, from every `Surrogate-Key` header.
fn tags_of(headers: &http::HeaderMap) -> Result<Vec<String>, TagError> {
    tags::parse(
        headers
            .get_all(tags::HEADER)
            .iter()
            .map(HeaderValue::as_bytes),
    )
}

/// The whole body, at most `max` bytes.
async fn read_body(body: Incoming, max: usize) -> Result<Bytes, BuildError> {
    // A fragment that does not fit is an error, never a truncated fragment.
    let collected = Limited::new(body, max).collect().await.map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            BuildError::TooLarge { size: max + 1, max }
        } else {
            BuildError::Connect(Cause::new(e))
        }
    })?;
    Ok(collected.to_bytes())
}

/// The fragment itself from a body in `coding` (its `Content-Encoding`, if any), at most
/// `max` bytes once decoded.
fn decode(body: Bytes, coding: Option<String>, max: usize) -> Result<Bytes, BuildError> {
    let Some(coding) = coding else {
        return Ok(body);
    };
    match tessera_runtime::coding::decode(&coding, &body, max) {
        Ok(plain) => Ok(Bytes::from(plain)),
        Err(tessera_runtime::coding::DecodeError::TooBig(_)) => {
            Err(BuildError::TooLarge { size: max + 1, max })
        }
        Err(e) => Err(BuildError::Coding(Cause::new(e))),
    }
}

/// The `Cache-Control` directive that keeps an answer from being shared, if any.
fn private(headers: &http::HeaderMap) -> Option<&'static str> {
    let directives = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| {
            d.split('=')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    for directive in directives {
        match directive.as_str() {
            "private" => return Some("private"),
            "no-store" => return Some("no-store"),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn only_passing_faults_are_retried_and_sources_are_kept() {
        let bad_name = HeaderName::from_bytes(b"bad name").unwrap_err();
        let request = BuildError::Request(Cause::new(bad_name));
        assert!(!request.is_retryable(), "a bad request stays bad");
        assert!(
            request
                .to_string()
                .starts_with("cannot build the render request: ")
        );
        assert!(request.source().is_some());

        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let connect = BuildError::Connect(Cause::new(io));
        assert!(connect.is_retryable());
        assert_eq!(connect.to_string(), "upstream unreachable: refused");
        let kept = connect.clone();
        assert!(
            matches!(kept, BuildError::Connect(c) if c.downcast_ref::<std::io::Error>().is_some())
        );
    }
}
