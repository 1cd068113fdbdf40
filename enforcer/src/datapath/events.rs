//! The verdict events ring buffer, read by the flow log.

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use enforcer_common::VerdictEvent;
use tokio::io::{Interest, unix::AsyncFd};

/// Reads [`VerdictEvent`]s from the EVENTS ring buffer.
pub struct EventReader {
    pub(crate) ring: RingBuf<MapData>,
}

fn decode(bytes: &[u8]) -> Option<VerdictEvent> {
    if bytes.len() < std::mem::size_of::<VerdictEvent>() {
        return None;
    }
    // SAFETY: VerdictEvent is a Pod made of integers; the record holds at least its size.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<VerdictEvent>()) })
}

impl EventReader {
    /// The next event, if one is waiting.
    #[expect(
        clippy::should_implement_trait,
        reason = "not an Iterator: it can resume after None"
    )]
    pub fn next(&mut self) -> Option<VerdictEvent> {
        loop {
            let item = self.ring.next()?;
            if let Some(e) = decode(&item) {
                return Some(e);
            }
        }
    }

    /// Every event waiting now.
    pub fn drain(&mut self) -> Vec<VerdictEvent> {
        std::iter::from_fn(|| self.next()).collect()
    }

    /// An async reader (needs a tokio runtime with IO enabled).
    pub fn into_async(self) -> Result<AsyncEvents> {
        // SAFETY: the RingBuf owns its map fd, which stays open and unchanged for as long as the
        // AsyncFd owns the RingBuf.
        let fd = unsafe { AsyncFd::register_with_interest(self.ring, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("registering EVENTS with tokio: {e}"))?;
        Ok(AsyncEvents { fd })
    }
}

/// [`EventReader`] driven by epoll through tokio's `AsyncFd`.
pub struct AsyncEvents {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl AsyncEvents {
    /// Waits until at least one event is available and returns all waiting events.
    pub async fn next_batch(&mut self) -> Result<Vec<VerdictEvent>> {
        loop {
            let mut guard = self.fd.readable_mut().await.context("waiting on EVENTS")?;
            let ring = guard.get_inner_mut();
            let mut out = Vec::new();
            while let Some(item) = ring.next() {
                if let Some(e) = decode(&item) {
                    out.push(e);
                }
            }
            guard.clear_ready();
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}
