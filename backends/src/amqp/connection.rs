//! The one broker connection of a process: the [`Link`] (the connection and the
//! confirm-mode channel publishers share), opened on first use and opened again when it
//! is lost — on behalf of publishers at most every [`RECONNECT_MIN`], by consumers and
//! subscriptions after a [`Backoff`]. Every new connection declares the shared topology
//! before anyone uses it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};

use tessera_protocol::bus::BusError;

use super::topology::Declarations;
use super::{AmqpBus, BACKOFF_MAX, BACKOFF_MIN, RECONNECT_MIN, timed, unavailable};

/// How long a consumer or subscription waits before each reconnection attempt: `min`,
/// doubling up to `max`, and `min` again once a connection worked ([`Backoff::reset`]),
/// so a broker restart hours after the last one is not waited out for `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Default for Backoff {
    /// [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`].
    fn default() -> Self {
        Self::new(BACKOFF_MIN, BACKOFF_MAX)
    }
}

impl Backoff {
    /// Starts at `min`, doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max: max.max(min),
        }
    }

    /// The wait before this attempt; the next one waits twice as long, at most `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// A connection worked: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A live connection and the confirm-mode channel publishers share.
pub(super) struct Link {
    pub(super) conn: Connection,
    pub(super) publish: Channel,
    /// Route queues declared on this connection, and the declaration under way.
    pub(super) queues: Declarations,
}

impl Link {
    pub(super) fn alive(&self) -> bool {
        self.conn.status().connected() && self.publish.status().connected()
    }
}

/// The broker this process connects to, and its connection when there is one.
pub(super) struct Connector {
    url: String,
    /// The live link, if any: looked at by every publish, so not held across I/O.
    link: Mutex<Option<Arc<Link>>>,
    /// Held while connecting: one connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    last_attempt: Mutex<Option<Instant>>,
    /// Set after the first successful connection.
    connected: AtomicBool,
    /// Connections made after a lost one.
    reconnects: AtomicU64,
}

impl Connector {
    /// Not connected yet: the first call that needs the broker connects.
    pub(super) fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            link: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            last_attempt: Mutex::new(None),
            connected: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
        }
    }

    /// Connections re-established after a lost one, since start.
    pub(super) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

impl AmqpBus {
    /// Opens a connection, declares the shared topology.
    async fn connect(&self) -> Result<Link, BusError> {
        let conn = timed(
            "connect",
            Connection::connect(&self.inner.connection.url, ConnectionProperties::default()),
        )
        .await?;
        let publish = timed("open channel", conn.create_channel()).await?;
        timed(
            "confirm_select",
            publish.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        self.declare_shared(&publish).await?;
        if self.inner.expiry.is_some() {
            self.declare_anchor(&publish).await?;
        }
        Ok(Link {
            conn,
            publish,
            queues: Declarations::default(),
        })
    }

    /// The live link, reconnecting when it is gone (rate limited, so publishers fail fast
    /// while the broker is down).
    pub(super) async fn link(&self) -> Result<Arc<Link>, BusError> {
        if let Some(link) = self.live_link() {
            return Ok(link);
        }
        let connection = &self.inner.connection;
        let _connecting = connection.connecting.lock().await;
        // Another caller may have connected while this one waited.
        if let Some(link) = self.live_link() {
            return Ok(link);
        }
        {
            let mut last = connection
                .last_attempt
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < RECONNECT_MIN) {
                return Err(unavailable("broker connection lost; reconnecting"));
            }
            *last = Some(Instant::now());
        }
        match self.connect().await {
            Ok(link) => {
                tracing::info!("connected to the broker");
                if connection.connected.swap(true, Ordering::Relaxed) {
                    connection.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                let link = Arc::new(link);
                *self.slot() = Some(link.clone());
                Ok(link)
            }
            Err(e) => {
                *self.slot() = None;
                Err(e)
            }
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Link>>> {
        self.inner
            .connection
            .link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn live_link(&self) -> Option<Arc<Link>> {
        self.slot().as_ref().filter(|l| l.alive()).cloned()
    }

    /// Drops `link` after it failed, so the next call reconnects (unless another caller
    /// already put a new link in its place).
    pub(super) fn drop_link(&self, link: &Arc<Link>) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            *slot = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        let expected = [100, 200, 400, 800, 1600, 3200, 5000, 5000].map(Duration::from_millis);
        assert_eq!(waits, expected);
    }

    #[test]
    fn backoff_starts_over_after_a_good_connection() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(35));
        assert_eq!(b.next_delay(), Duration::from_millis(10));
        assert_eq!(b.next_delay(), Duration::from_millis(20));
        assert_eq!(b.next_delay(), Duration::from_millis(35));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
        assert_eq!(b.next_delay(), Duration::from_millis(20));
    }

    #[test]
    fn backoff_with_a_cap_below_its_start_waits_the_start() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }
}
