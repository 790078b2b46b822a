//! The HTTP/1.1 client for the upstream application, one set-up for the gateway's proxy
//! and the workers' renders.

use std::time::Duration;

use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Idle pooled connections are closed after this, below common upstream keep-alive
/// timeouts (Node's is 5 s).
const POOL_IDLE: Duration = Duration::from_secs(4);

/// A pooled HTTP/1.1 client for the upstream, as renders and the gateway's proxy use it.
pub fn client<B>(connect_timeout: Duration) -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE)
        .build(connector)
}
