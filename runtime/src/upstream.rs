//! The HTTP/1.1 client for the upstream application, one set-up for the gateway's proxy
//! and the workers' renders.

use std::time::Duration;

use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Idle pooled connections are closed after this, below common upstream keep-alive
/// timeouts (Node's is 5 s).
const POOL_IDLE: Duration = Duration::from_secs(4);

/// Bytes read from an upstream connection at once, as nginx's `proxy_buffer_size` (a
/// memory page). What a proxied answer has read ahead of a client that does not take it
/// stays in memory until `http.send_timeout` cuts the client off: hyper's default read
/// buffer grows to about 400 KiB, and 1,000 clients that read nothing of a proxied
/// download held 520 MB of the gateway (`bench/slow-readers.sh`); with this, 60 MB.
const MAX_READ_BUF: usize = 4 * 1024;

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
        .http1_read_buf_exact_size(MAX_READ_BUF)
        .build(connector)
}
