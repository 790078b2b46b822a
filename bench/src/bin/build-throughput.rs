//! End-to-end build throughput of `tessera-worker` processes (compare with RabbitMQ's own
//! consume+ack rate, `amqp-rates`).
//!
//! `build-throughput BIN_DIR BUILDS RENDER_MS CONCURRENCY WORKERS...`
//!
//! For each worker count: queue BUILDS build requests (as another program would), start
//! that many `tessera-worker` processes (CONCURRENCY builds each) against an in-process
//! upstream that answers after RENDER_MS, and time from the first fragment seen in
//! memcached until every one is there (the processes' start is printed on its own).
//! Needs memcached on 127.0.0.1:11211 and RabbitMQ on 127.0.0.1:5672.

use std::convert::Infallible;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tessera_backends::amqp::AmqpBus;
use tessera_backends::memcached::MemcachedStore;
use tessera_protocol::{BuildRequest, Bus, Identity, Keyspace, Store, StoreKey, store};
use tokio::net::TcpListener;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const MEMCACHED: &str = "127.0.0.1:11211";
/// Benchmark queues are deleted by RabbitMQ once unused this long.
const EXPIRY: Duration = Duration::from_secs(300);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        eprintln!("usage: build-throughput BIN_DIR BUILDS RENDER_MS CONCURRENCY WORKERS...");
        std::process::exit(2);
    }
    let bin = PathBuf::from(&args[1]);
    let builds: usize = args[2].parse()?;
    let render = Duration::from_millis(args[3].parse()?);
    let concurrency: usize = args[4].parse()?;
    let counts: Vec<usize> = args[5..]
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let upstream = start_upstream(render).await?;

    for workers in counts {
        let (rate, ready) = run(&bin, &upstream, builds, workers, concurrency).await?;
        println!(
            "{workers} worker process(es), {concurrency} builds in flight each, {} ms renders: \
             {rate:.0} builds/s (first stored {} ms after the start)",
            render.as_millis(),
            ready.as_millis()
        );
    }
    Ok(())
}

async fn start_upstream(delay: Duration) -> std::io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    // Not `sleep(0)`: a timer rounds up to the next millisecond tick,
                    // which made an instant render cost up to 1 ms.
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"<p>fragment</p>",
                    ))))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(format!("http://{addr}"))
}

fn namespace() -> String {
    format!("bench{:x}", rand::random::<u32>())
}

async fn run(
    bin: &std::path::Path,
    upstream: &str,
    n: usize,
    workers: usize,
    concurrency: usize,
) -> Result<(f64, Duration), Box<dyn std::error::Error>> {
    let ns = namespace();
    let queue = format!("{ns}.build");
    let config = format!(
        "[upstream]\nurl = \"{upstream}\"\n[store]\nmemcached = [\"{MEMCACHED}\"]\nnamespace = \"{ns}\"\n[bus]\namqp = \"{AMQP}\"\nqueue_expiry = \"5m\"\n\
         [workers]\nembedded = 0\nconcurrency = {concurrency}\n[[fragment]]\nname = \"b\"\nrender = \"/r\"\nparams = [\"id\"]\nqueue = \"{queue}\"\n"
    );
    let path = std::env::temp_dir().join(format!("{ns}.toml"));
    std::fs::write(&path, config)?;
    let bus = AmqpBus::with_queue_expiry(AMQP, &ns, Some(EXPIRY));
    let store: Arc<dyn Store> = Arc::new(MemcachedStore::new(
        &[MEMCACHED.parse()?],
        Duration::from_secs(1),
        1 << 20,
    )?);
    let keys = Keyspace::new(&ns);
    let generation = store::generation(store.as_ref(), &keys.generation("b")).await?;
    let mut wanted = Vec::new();
    for i in 0..n {
        let identity = Identity {
            route: "b".into(),
            params: vec![("id".into(), i.to_string())],
            vary: vec![],
        };
        wanted.push(keys.fragment(&identity, generation).envelope);
        let req = BuildRequest {
            v: 1,
            id: i.to_string(),
            key: String::new(),
            identity,
            generation: 0,
            attempt: 1,
            requested_at: 0,
            lease_deadline: 0,
            trace_id: String::new(),
            traceparent: None,
        };
        bus.publish_build(&queue, &req).await?;
    }
    let started = Instant::now();
    let mut procs: Vec<_> = (0..workers)
        .map(|_| {
            Command::new(bin.join("tessera-worker"))
                .arg("--config")
                .arg(&path)
                .args(["--admin-listen", "127.0.0.1:0"])
                .env("RUST_LOG", "error")
                .stdout(Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let result = drained(store.as_ref(), &wanted, started).await;
    for p in &mut procs {
        let _ = p.kill();
        let _ = p.wait();
    }
    result
}

/// Waits until every key of `wanted` is stored: the builds per second from the first
/// seen stored to the last, and how long after `started` the first was seen.
async fn drained(
    store: &dyn Store,
    wanted: &[StoreKey],
    started: Instant,
) -> Result<(f64, Duration), Box<dyn std::error::Error>> {
    let n = wanted.len();
    // Builds finish about in queue order: each poll checks the oldest keys not yet seen
    // built, a chunk at a time, and stops at the first chunk still missing one. Asking for
    // every key on every poll (as this did) cost memcached and this process more CPU than
    // the worker measured, on the same two cores.
    //
    // The clock starts when the first builds are seen stored, as RabbitMQ's own rate
    // starts once its consumer is set up: a process's start (config, connections,
    // declarations) is not draining. It is printed on its own.
    let mut left = wanted;
    let mut first: Option<(Instant, usize)> = None;
    while !left.is_empty() {
        let chunk = &left[..left.len().min(256)];
        let found = store.get_many(chunk).await?;
        let done = chunk.iter().take_while(|k| found.contains_key(*k)).count();
        left = &left[done..];
        if first.is_none() && left.len() < n {
            first = Some((Instant::now(), n - left.len()));
        }
        if done == chunk.len() {
            continue;
        }
        if started.elapsed() > Duration::from_secs(300) {
            let built = n - left.len();
            return Err(format!("only {built} of {n} built after 300 s").into());
        }
        let pause = if first.is_some() { 10 } else { 1 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let (first_seen, built_then) = first.ok_or("no build was seen stored")?;
    let ready = first_seen - started;
    if built_then == n {
        return Err(format!(
            "all {n} builds were stored by the first look, so none could be timed; queue more"
        )
        .into());
    }
    let rate = (n - built_then) as f64 / first_seen.elapsed().as_secs_f64();
    Ok((rate, ready))
}
