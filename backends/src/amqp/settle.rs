//! Settling a consumer channel's deliveries in as few frames as the contract allows.
//!
//! Each delivery on a channel has a tag, one more than the last (1, 2, 3, … from the
//! channel's opening, whatever queue it came from). A `basic.ack` with `multiple` covers
//! every delivery still outstanding up to its tag, so it may only be sent for a
//! **contiguous settled prefix**: every tag from the lowest unsettled one up to it is
//! acknowledged by the worker and not yet sent. Builds finish out of order, so:
//!
//! - an ack at the lowest unsettled tag goes out at once, as one `multiple` ack with the
//!   acks held just above it (the run);
//! - an ack above a delivery still in hand is held until that one is settled, at most
//!   [`Settler::hold`] of them (beyond that, the held ones go out one by one, so a slow
//!   build holds up at most that many of the broker's prefetch window);
//! - a nack (requeue or reject) goes out at once on its own and breaks the run: a run
//!   never spans it, and it is pushed before any ack above it, so a later `multiple` ack
//!   cannot reach it;
//! - frames are queued on the channel in the order the state decides them (under the
//!   lock), which is the order the broker reads them.
//!
//! Frames go straight onto the channel (`Channel::basic_ack`), not through lapin's
//! per-delivery `Acker`, which hops through its internal RPC task and a spawned future.
//! Held acks are only held: when the channel closes first, their deliveries go back to
//! the queue (the bus contract allows it; builds are idempotent), and when the consumer
//! is dropped they are sent one by one ([`Settler::flush`]).

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use lapin::options::{BasicAckOptions, BasicNackOptions};
use tessera_protocol::bus::BusError;

use super::{OP_TIMEOUT, unavailable};

/// A frame queued on the channel, to await for the broker's socket write.
pub(super) type Sent = Pin<Box<dyn Future<Output = lapin::Result<()>> + Send>>;

/// What the settler decided for one tag: frames to send, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Frame {
    /// `basic.ack` of `tag`, covering every outstanding tag up to it when `multiple`.
    Ack { tag: u64, multiple: bool },
    /// `basic.nack` of `tag` alone.
    Nack { tag: u64, requeue: bool },
}

/// The settled state of a channel's tags, without I/O: which frames each settle sends.
#[derive(Debug)]
pub(super) struct Tags {
    /// The lowest tag not settled yet; every tag below it was sent.
    floor: u64,
    /// Acknowledged above `floor`, not sent yet.
    held: BTreeSet<u64>,
    /// Sent on their own above `floor` (nacks, and acks sent one by one).
    alone: BTreeSet<u64>,
    /// Most acks held before they go out one by one.
    hold: usize,
}

impl Tags {
    pub(super) fn new(hold: usize) -> Self {
        Self {
            floor: 1,
            held: BTreeSet::new(),
            alone: BTreeSet::new(),
            hold,
        }
    }

    /// The worker acknowledged `tag`: the frames to send now (none while it is held).
    pub(super) fn ack(&mut self, tag: u64) -> Vec<Frame> {
        if tag < self.floor || self.held.contains(&tag) || self.alone.contains(&tag) {
            return Vec::new(); // settled already: a second ack would close the channel
        }
        self.held.insert(tag);
        let mut frames = self.advance();
        if self.held.len() > self.hold {
            // A slow delivery below: let these go one by one rather than starve the
            // prefetch window.
            for tag in std::mem::take(&mut self.held) {
                frames.push(Frame::Ack {
                    tag,
                    multiple: false,
                });
                self.alone.insert(tag);
            }
        }
        frames
    }

    /// The worker gave `tag` up: its nack, then any run it unblocked.
    pub(super) fn nack(&mut self, tag: u64, requeue: bool) -> Vec<Frame> {
        if tag < self.floor || self.held.contains(&tag) || self.alone.contains(&tag) {
            return Vec::new();
        }
        self.alone.insert(tag);
        let mut frames = vec![Frame::Nack { tag, requeue }];
        frames.extend(self.advance());
        frames
    }

    /// Every held ack, one by one (the consumer is going).
    pub(super) fn flush(&mut self) -> Vec<Frame> {
        let held = std::mem::take(&mut self.held);
        held.into_iter()
            .map(|tag| {
                self.alone.insert(tag);
                Frame::Ack {
                    tag,
                    multiple: false,
                }
            })
            .collect()
    }

    /// Moves `floor` up over settled tags: each run of held acks becomes one ack
    /// (`multiple` when it covers more than one); a tag sent alone ends a run.
    fn advance(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut run: Option<(u64, u64)> = None; // (first, last)
        loop {
            if self.held.remove(&self.floor) {
                run = Some((run.map_or(self.floor, |(first, _)| first), self.floor));
            } else if self.alone.remove(&self.floor) {
                frames.extend(run.take().map(run_frame));
            } else {
                break;
            }
            self.floor += 1;
        }
        frames.extend(run.map(run_frame));
        frames
    }
}

fn run_frame((first, last): (u64, u64)) -> Frame {
    Frame::Ack {
        tag: last,
        multiple: last > first,
    }
}

/// One consumer channel's settles ([`Tags`] and the channel they go out on).
pub(super) struct Settler {
    channel: lapin::Channel,
    tags: Mutex<Tags>,
}

impl std::fmt::Debug for Settler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settler")
            .field("channel", &self.channel.id())
            .finish()
    }
}

impl Settler {
    /// Settles on `channel`, holding at most `hold` acks (see the module docs).
    pub(super) fn new(channel: lapin::Channel, hold: usize) -> Self {
        Self {
            channel,
            tags: Mutex::new(Tags::new(hold)),
        }
    }

    /// The most acks held for a prefetch window of `prefetch` deliveries: a quarter of
    /// it, so a slow build keeps three quarters of the window for the others.
    pub(super) fn hold(prefetch: usize) -> usize {
        (prefetch / 4).max(1)
    }

    /// Acknowledges `tag`; resolves once the frame covering it is written (at once when
    /// it is held).
    pub(super) async fn ack(&self, tag: u64) -> Result<(), BusError> {
        let sent = self.decide(|tags| tags.ack(tag))?;
        wait(sent).await
    }

    /// Gives `tag` back (`requeue`) or to the dead-letter exchange.
    pub(super) async fn nack(&self, tag: u64, requeue: bool) -> Result<(), BusError> {
        let sent = self.decide(|tags| tags.nack(tag, requeue))?;
        wait(sent).await
    }

    /// Like [`nack`](Self::nack), for a caller that cannot wait: the frame is queued
    /// before this returns, and its write is awaited in a task when there is a runtime.
    pub(super) fn nack_now(&self, tag: u64) {
        if let Ok(sent) = self.decide(|tags| tags.nack(tag, true))
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move {
                let _ = wait(sent).await;
            });
        }
    }

    /// Sends every held ack one by one.
    pub(super) fn flush(&self) {
        let _ = self.decide(Tags::flush);
    }

    /// Decides the frames under the lock and queues them on the channel there, in order.
    fn decide(&self, f: impl FnOnce(&mut Tags) -> Vec<Frame>) -> Result<Vec<Sent>, BusError> {
        let mut tags = self.tags.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut tags)
            .into_iter()
            .map(|frame| self.queue(frame))
            .collect()
    }

    /// Queues `frame` on the channel now (the first poll of lapin's call pushes it) and
    /// returns the rest of the call, which resolves once it is written.
    fn queue(&self, frame: Frame) -> Result<Sent, BusError> {
        let channel = self.channel.clone();
        let mut call: Sent = match frame {
            Frame::Ack { tag, multiple } => {
                Box::pin(async move { channel.basic_ack(tag, BasicAckOptions { multiple }).await })
            }
            Frame::Nack { tag, requeue } => Box::pin(async move {
                let options = BasicNackOptions {
                    requeue,
                    multiple: false,
                };
                channel.basic_nack(tag, options).await
            }),
        };
        match call.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Err(e)) => Err(unavailable(e)),
            Poll::Ready(Ok(())) => Ok(Box::pin(std::future::ready(Ok(())))),
            Poll::Pending => Ok(call),
        }
    }
}

/// Waits (bounded) until every frame of `sent` is written.
async fn wait(sent: Vec<Sent>) -> Result<(), BusError> {
    for call in sent {
        match tokio::time::timeout(OP_TIMEOUT, call).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(unavailable(e)),
            Err(_) => {
                return Err(unavailable(format!(
                    "settle: not written within {OP_TIMEOUT:?}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(tag: u64, multiple: bool) -> Frame {
        Frame::Ack { tag, multiple }
    }

    #[test]
    fn acks_in_order_go_out_at_once() {
        let mut tags = Tags::new(8);
        assert_eq!(tags.ack(1), vec![ack(1, false)]);
        assert_eq!(tags.ack(2), vec![ack(2, false)]);
    }

    #[test]
    fn acks_above_a_delivery_in_hand_wait_for_it_then_go_as_one() {
        let mut tags = Tags::new(8);
        assert_eq!(tags.ack(2), vec![]);
        assert_eq!(tags.ack(4), vec![]);
        assert_eq!(tags.ack(3), vec![]);
        assert_eq!(tags.ack(1), vec![ack(4, true)]);
        assert_eq!(tags.ack(5), vec![ack(5, false)]);
    }

    #[test]
    fn a_nack_breaks_the_run() {
        let mut tags = Tags::new(8);
        assert_eq!(tags.ack(2), vec![]);
        assert_eq!(tags.ack(4), vec![]);
        assert_eq!(tags.ack(5), vec![]);
        // 3 goes back: alone, at once; 4–5 still wait for 1.
        assert_eq!(
            tags.nack(3, true),
            vec![Frame::Nack {
                tag: 3,
                requeue: true
            }]
        );
        // 1 settles: the run 1–2 ends before 3, and 4–5 is a run of its own.
        assert_eq!(tags.ack(1), vec![ack(2, true), ack(5, true)]);
    }

    #[test]
    fn a_nack_at_the_floor_releases_the_run_above_it() {
        let mut tags = Tags::new(8);
        assert_eq!(tags.ack(2), vec![]);
        assert_eq!(tags.ack(3), vec![]);
        assert_eq!(
            tags.nack(1, false),
            vec![
                Frame::Nack {
                    tag: 1,
                    requeue: false
                },
                ack(3, true)
            ]
        );
    }

    #[test]
    fn past_the_hold_held_acks_go_one_by_one_and_the_floor_passes_them() {
        let mut tags = Tags::new(2);
        assert_eq!(tags.ack(2), vec![]);
        assert_eq!(tags.ack(3), vec![]);
        assert_eq!(
            tags.ack(4),
            vec![ack(2, false), ack(3, false), ack(4, false)]
        );
        assert_eq!(tags.ack(6), vec![]);
        // 1 settles: 2–4 were sent alone, so it goes alone; 5 is still in hand.
        assert_eq!(tags.ack(1), vec![ack(1, false)]);
        assert_eq!(tags.ack(5), vec![ack(6, true)]);
    }

    #[test]
    fn a_tag_is_settled_once() {
        let mut tags = Tags::new(8);
        assert_eq!(tags.ack(1), vec![ack(1, false)]);
        assert_eq!(tags.ack(1), vec![]);
        assert_eq!(tags.nack(1, true), vec![]);
        assert_eq!(tags.ack(3), vec![]);
        assert_eq!(tags.ack(3), vec![]);
        assert_eq!(tags.flush(), vec![ack(3, false)]);
        assert_eq!(tags.ack(2), vec![ack(2, false)]);
    }
}
