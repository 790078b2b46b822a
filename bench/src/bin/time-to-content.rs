//! Time to content: how long one client waits for a cold fragment it asked for with
//! `Prefer: wait=5`, from sending the request to holding the whole 200 body, one request
//! at a time. Each request names a new key (`?id=` a fresh number), so every one is a
//! miss, a build and a wake-up.
//!
//! `time-to-content REQUESTS ROUNDS NAME=URL...`: each URL (a fragment route with
//! `params = ["id"]`, e.g. `http://127.0.0.1:8080/fragments/cold`) gets REQUESTS
//! requests, sent in ROUNDS blocks that alternate between the URLs, so a swing of the
//! machine's load falls on all of them alike. Each URL has one keep-alive connection
//! (`TCP_NODELAY`, as a browser's), so neither connecting nor curl's start-up is counted.
//! Prints p50, p90, p99 and the largest per NAME, in ms, and exits non-zero if any answer
//! was not a 200 with a body.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Requests sent to each target before measuring (connection warm, code paged in).
const WARM_UP: usize = 20;

/// One target: its name, its URL, its connection, the latencies measured.
struct Target {
    name: String,
    url: http::Uri,
    sender: SendRequest<Empty<Bytes>>,
    took: Vec<Duration>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: time-to-content REQUESTS ROUNDS NAME=URL...";
    let requests: usize = args.next().context(usage)?.parse().context(usage)?;
    let rounds: usize = args
        .next()
        .context(usage)?
        .parse::<usize>()
        .context(usage)?
        .max(1);
    let mut targets = Vec::new();
    for arg in args {
        let (name, url) = arg.split_once('=').context(usage)?;
        targets.push(connect(name, url.parse()?).await?);
    }
    if targets.is_empty() {
        bail!(usage);
    }
    // Keys unique across runs too: a key a previous run built would be a hit.
    let run: u32 = rand::random();
    let mut n = 0u64;
    for t in &mut targets {
        for _ in 0..WARM_UP {
            n += 1;
            fetch(t, run, n).await?;
        }
    }
    let per_round = requests.div_ceil(rounds);
    for _ in 0..rounds {
        for t in &mut targets {
            for _ in 0..per_round.min(requests - t.took.len()) {
                n += 1;
                let took = fetch(t, run, n).await?;
                t.took.push(took);
            }
        }
    }
    for t in &mut targets {
        t.took.sort();
        let q = |p: f64| ms(t.took[((t.took.len() - 1) as f64 * p).round() as usize]);
        println!(
            "{}: {} requests, p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            t.name,
            t.took.len(),
            q(0.5),
            q(0.9),
            q(0.99),
            ms(t.took[t.took.len() - 1]),
        );
    }
    Ok(())
}

/// A keep-alive HTTP/1 connection to `url`'s host.
async fn connect(name: &str, url: http::Uri) -> anyhow::Result<Target> {
    let authority = url
        .authority()
        .context("the URL names no host")?
        .to_string();
    let stream = TcpStream::connect(&authority).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(Target {
        name: name.to_string(),
        url,
        sender,
        took: Vec::new(),
    })
}

/// How long one request may take, `Prefer: wait=5` included.
const DEADLINE: Duration = Duration::from_secs(10);

/// Asks `t` for key `n` of this `run` and waits for the whole body; how long it took.
async fn fetch(t: &mut Target, run: u32, n: u64) -> anyhow::Result<Duration> {
    let path = format!("{}?id={run}-{n}", t.url.path());
    let req = Request::get(path)
        .header(
            http::header::HOST,
            t.url.authority().map_or("", |a| a.as_str()),
        )
        .header("prefer", "wait=5")
        .body(Empty::new())?;
    let started = Instant::now();
    // `Prefer: wait=5` answers within 5 s: a gateway that does not is a failure, not a
    // figure.
    let answered = tokio::time::timeout(DEADLINE, async {
        t.sender.ready().await?;
        let response = t.sender.send_request(req).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    })
    .await;
    let Ok(answered) = answered else {
        bail!("{}: key {run}-{n} not answered within {DEADLINE:?}", t.name);
    };
    let (status, body) = answered?;
    let took = started.elapsed();
    if status != StatusCode::OK || body.is_empty() {
        bail!(
            "{}: key {run}-{n} answered {status} with {} bytes",
            t.name,
            body.len()
        );
    }
    Ok(took)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
