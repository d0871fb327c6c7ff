// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The queue worker's walk: popping chains from a ring, handing them to the
//! device, writing used entries, and the in-flight bookkeeping around both
//! (see `inflight.rs`).
//!
//! With an in-flight file mapped (the frontend negotiated
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` and handed the file over):
//!
//! - the first walk of a queue after SET_INFLIGHT_FD recovers it: the next
//!   available position becomes `used_idx + in flight`, and the heads
//!   still marked are resubmitted, in counter order, before any new chain;
//!   then the guest is signalled once, whatever its event index says:
//!   used entries the failed instance published while the frontend was
//!   away were signalled to nobody, and a guest never told of them waits
//!   for ever;
//! - every popped head is marked before anything handles it, and cleared
//!   once its used entry is published;
//! - a request that cannot be answered because the device failed (dropped
//!   by a panic) or no longer admits requests (refused while draining or
//!   stopped) is **left in flight**: no used entry, its mark kept, so that
//!   the next connection (a restarted device, or a new process) resubmits
//!   it. Without the file such a request is answered with the device
//!   type's failure status, as before.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use switchboard_bus::GuestAddr;
use switchboard_runtime::recording::{Entry, RecordKind};
use switchboard_runtime::{MessageKind, State};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use super::codec::{RequestRecord, SegmentLens};
use super::inflight::{self, Inflight, QueueInflight};
use super::{RecordTo, VhostUserServer};
use crate::models::virtio::{Handled, Request, VirtioDevice};

/// Writes `request`'s recording (if it still holds one) to the log as
/// answered with `len` bytes, and gives the emptied recording back to the
/// request ([`Request::spend_recording`]). Called where the request is
/// answered: by the completer on the device's I/O thread, so that the
/// encoding is off the queue worker, or by `finish` for a request answered
/// on the worker.
pub(super) fn record_request(r: &RecordTo, request: &mut Request, len: u32) {
    let Some(trace) = request.take_recording() else {
        return;
    };
    let record = RequestRecord {
        queue: request.queue(),
        head: request.head(),
        readable: SegmentLens(request.readable()),
        writable: SegmentLens(request.writable()),
        trace: &trace,
        len,
    };
    let time = trace.time();
    let queue = usize::from(request.queue());
    let from = r.queues.get(queue).unwrap_or(&r.frontend);
    r.journal.record_body(
        time,
        r.journal.now().saturating_sub(time),
        from,
        &r.id,
        RecordKind::Message(trace.kind()),
        &record,
    );
    request.spend_recording(trace);
}

/// A popped chain's descriptors, `(address, length, device-writable)`.
type Descriptors = (GuestAddr, u32, bool);

impl<D: VirtioDevice> VhostUserServer<D> {
    /// The connection's in-flight file, if one is mapped.
    pub(super) fn inflight(&self) -> Option<Arc<Inflight>> {
        self.shared.inflight.get()
    }

    /// Writes a used entry through the accepted memory (see `Shared::mem`),
    /// with the in-flight bookkeeping around it.
    pub(super) fn add_used(
        &self,
        vring: &VringRwLock,
        tracked: Option<&Inflight>,
        queue: usize,
        head: u16,
        len: u32,
    ) -> std::result::Result<(), virtio_queue::Error> {
        let mem = self.shared.mem.memory();
        let mut state = vring.get_mut();
        let q = tracked.and_then(|t| t.queue(queue));
        if let Some(q) = &q {
            q.before_used(head);
        }
        let written = state.get_queue_mut().add_used(&*mem, head, len);
        if let Some(q) = &q {
            if written.is_ok() {
                q.after_used(head, state.get_queue().next_used());
            }
        }
        written
    }

    /// Writes the used entry, then drops the request (and its leases), then
    /// its ticket: the queue's count goes down only once the answer is in
    /// the ring. A request the device's failure dropped is left in flight
    /// instead when the connection tracks in-flight requests.
    pub(super) fn finish(
        &self,
        vring: &VringRwLock,
        tracked: Option<&Inflight>,
        mut request: Request,
        len: u32,
    ) {
        let ticket = request.answered();
        let queue = usize::from(request.queue());
        if tracked.is_some() && request.dropped_in_panic() {
            tracing::info!(
                queue,
                head = request.head(),
                "request dropped by the device's failure: left in flight for resubmission"
            );
            drop(request);
            drop(ticket);
            return;
        }
        if let Err(e) = self.add_used(vring, tracked, queue, request.head(), len) {
            tracing::error!(queue, head = request.head(), error = %e, "write used entry");
        }
        tracing::trace!(queue, head = request.head(), len, "answered");
        if let Some(r) = self.shared.record.get() {
            record_request(r, &mut request, len);
        }
        request.recycle_recording();
        drop(request);
        self.shared.handled.fetch_add(1, Ordering::Relaxed);
        drop(ticket);
    }

    /// Answers a request the gate refused (the device is draining or
    /// stopped) with the device type's failure status; or, when the
    /// connection tracks in-flight requests, leaves it in flight for the
    /// next connection.
    fn refuse(&self, vring: &VringRwLock, tracked: Option<&Inflight>, mut request: Request) {
        let queue = usize::from(request.queue());
        if tracked.is_some() {
            tracing::debug!(
                queue,
                head = request.head(),
                "request refused: left in flight for resubmission"
            );
            return;
        }
        let writable = request.writable_len();
        let len = match self.shared.device.fail_status() {
            Some(status) if writable > 0 => {
                u32::from(request.write_at(writable - 1, &[status]).is_ok())
            }
            _ => 0,
        };
        if let Err(e) = self.add_used(vring, tracked, queue, request.head(), len) {
            tracing::error!(queue, head = request.head(), error = %e, "write used entry");
        }
        self.shared.handled.fetch_add(1, Ordering::Relaxed);
    }

    /// The first walk after SET_INFLIGHT_FD: moves the ring's next
    /// available position past what is in flight and returns the heads to
    /// resubmit (see `inflight.rs`).
    fn recover(&self, queue: usize, vring: &VringRwLock, q: &QueueInflight<'_>) -> Vec<u16> {
        let mem = self.shared.mem.memory();
        let mut state = vring.get_mut();
        let ring = state.get_queue_mut();
        let used = match ring.used_idx(&*mem, Ordering::Acquire) {
            Ok(u) => u.0,
            Err(e) => {
                tracing::error!(queue, error = %e, "read the used index to recover in-flight requests");
                return Vec::new();
            }
        };
        let found = q.recover(used, ring.size());
        let before = ring.next_avail();
        ring.set_next_avail(found.next_avail);
        if !found.resubmit.is_empty() || before != found.next_avail || found.cleared_last {
            // What a restore from the used index alone would have got
            // wrong: the heads in the ring from `used` on, against the
            // heads really in flight.
            let ring_heads: Option<Vec<u16>> = (0..found.next_avail.wrapping_sub(used))
                .map(|k| {
                    let slot = u64::from(used.wrapping_add(k) % ring.size().max(1));
                    mem.read_obj::<u16>(GuestAddress(ring.avail_ring() + 4 + 2 * slot))
                        .ok()
                        .map(u16::from_le)
                })
                .collect();
            let out_of_ring_order = ring_heads
                .as_deref()
                .map(|heads| out_of_ring_order(heads, &found.resubmit));
            tracing::info!(
                queue,
                used_idx = used,
                next_avail = found.next_avail,
                frontend_base = before,
                resubmit = ?found.resubmit,
                out_of_ring_order = ?out_of_ring_order,
                cleared_last = found.cleared_last,
                "in-flight requests recovered"
            );
            self.note(
                RecordKind::Resubmit,
                serde_json::json!({ "queue": queue, "heads": found.resubmit, "next_avail": found.next_avail }),
                serde_json::Value::Null,
            );
        }
        found.resubmit
    }

    pub(super) fn process_queue(&self, queue: usize, vring: &VringRwLock) -> io::Result<()> {
        if self.shared.gate.state() == State::Stopped {
            // A failed or stopped device walks no ring; its frontend is
            // being disconnected.
            return Ok(());
        }
        let mem = &self.shared.mem;
        if mem.memory().num_regions() == 0 {
            return Ok(());
        }
        let event_idx = self.shared.event_idx.load(Ordering::Acquire);
        let inflight = self.inflight();
        let tracked = inflight.as_deref();
        let q = tracked.and_then(|t| t.queue(queue));
        if let Some(q) = &q {
            if q.take_recover() {
                let heads = self.recover(queue, vring, q);
                let (table, size) = {
                    let state = vring.get_ref();
                    (state.get_queue().desc_table(), state.get_queue().size())
                };
                let time = self.delivery_time();
                for head in heads {
                    let descriptors = inflight::chain_at(&mem.memory(), table, size, head);
                    tracing::debug!(queue, head, descriptors = descriptors.len(), "resubmitting");
                    let last = descriptors.last().copied();
                    let chain = (head, descriptors, || last);
                    self.take_chain(queue, vring, tracked, time, chain);
                }
                self.contain(
                    || format!("queue {queue}: end of batch"),
                    |d| d.end_batch(queue as u16),
                );
                // Used entries published while the frontend was away (by
                // the instance that failed, finishing what it had) were
                // signalled to nobody: the guest is told once, whatever its
                // event index asks, or it waits for them for ever.
                if let Err(e) = vring.signal_used_queue() {
                    tracing::warn!(error = %e, "signal the guest after recovery");
                }
            }
        }
        loop {
            if event_idx {
                vring
                    .get_mut()
                    .get_queue_mut()
                    .disable_notification(&*mem.memory())
                    .map_err(io::Error::other)?;
            }
            let chains: Vec<_> = {
                let mut state = vring.get_mut();
                match state.get_queue_mut().iter(mem.memory()) {
                    Ok(iter) => iter.collect(),
                    Err(e) => {
                        tracing::error!(queue, error = %e, "read the available ring; queue stopped");
                        return Ok(());
                    }
                }
            };
            // Marked in the order they were popped, before any is handled:
            // a death at any point leaves the unmarked ones a suffix of
            // the popped ones, which recovery pops again.
            if let Some(q) = &q {
                for chain in &chains {
                    q.mark(chain.head_index());
                }
            }
            let mut used = false;
            // One clock read per batch: the chains of a batch were all
            // delivered when the ring was read.
            let time = self.delivery_time();
            for chain in chains {
                let head = chain.head_index();
                // Walked straight into the request: no allocation per chain.
                let descriptors = chain
                    .clone()
                    .map(|d| (GuestAddr(d.addr().0), d.len(), d.is_write_only()));
                // Walked again only for a malformed chain.
                let last = || {
                    chain
                        .clone()
                        .last()
                        .map(|d| (GuestAddr(d.addr().0), d.len(), d.is_write_only()))
                };
                used |= self.take_chain(queue, vring, tracked, time, (head, descriptors, last));
            }
            self.contain(
                || format!("queue {queue}: end of batch"),
                |d| d.end_batch(queue as u16),
            );
            if used {
                self.signal(vring);
            }
            if !event_idx
                || !vring
                    .get_mut()
                    .get_queue_mut()
                    .enable_notification(&*mem.memory())
                    .map_err(io::Error::other)?
            {
                break;
            }
        }
        Ok(())
    }

    /// The delivery time of the chains read from a ring now, for their
    /// records (0 when not recording).
    fn delivery_time(&self) -> u64 {
        self.shared.record.get().map_or(0, |r| r.journal.now())
    }

    /// One popped (or resubmitted) chain `(head, descriptors, last)`,
    /// delivered at `time`: admitted and handed to the device, refused, or
    /// answered as malformed. Whether a used entry was written.
    fn take_chain(
        &self,
        queue: usize,
        vring: &VringRwLock,
        tracked: Option<&Inflight>,
        time: u64,
        (head, descriptors, last): (
            u16,
            impl IntoIterator<Item = Descriptors>,
            impl FnOnce() -> Option<Descriptors>,
        ),
    ) -> bool {
        let completer = self.completer(queue);
        let fail_status = self.shared.device.fail_status();
        let seq = self.shared.runtime.next_seq();
        let admitted = self.shared.gate.admit(queue, seq, MessageKind::Request);
        let memreq = self.shared.bus.guest_memory().request();
        let record = self.shared.record.get();
        match Request::new(queue as u16, head, descriptors, memreq) {
            Ok(mut request) => {
                let ticket = match admitted {
                    Ok(t) => t,
                    Err(refused) => {
                        tracing::debug!(queue, head, %refused, "request refused");
                        self.refuse(vring, tracked, request);
                        return tracked.is_none();
                    }
                };
                request.admitted(ticket, completer, fail_status);
                if let Some(r) = record {
                    if r.hash_only {
                        request.hash_only();
                    } else {
                        request.record(r.mode, time);
                    }
                }
                // A panic drops the request, whose guard answers it
                // through the completer.
                let handled = self.contain(
                    || format!("queue {queue}: handle request {head}"),
                    |d| d.handle(request, completer),
                );
                if let Some(Handled::Done { request, len }) = handled {
                    self.finish(vring, tracked, request, len);
                    return true;
                }
                false
            }
            Err(e) => {
                tracing::warn!(queue, error = %e, "malformed request");
                self.contain(
                    || "reject a malformed request".into(),
                    |d| d.reject(queue as u16, head, &e),
                );
                // The device type's failure status, in the chain's last
                // byte if that is device-writable guest RAM (virtio-blk's
                // status byte): the driver sees the request failed rather
                // than an answer of nothing.
                let len = match (fail_status, last()) {
                    (Some(status), Some((addr, dlen, true))) if dlen > 0 => {
                        let at = GuestAddr(addr.0.wrapping_add(u64::from(dlen) - 1));
                        let mut memreq = self.shared.bus.guest_memory().request();
                        u32::from(memreq.write(at, &[status]).is_ok())
                    }
                    _ => 0,
                };
                if let Some(r) = record {
                    r.journal.record(Entry::json(
                        time,
                        r.journal.now().saturating_sub(time),
                        Arc::clone(&r.queues[queue]),
                        Arc::clone(&r.id),
                        RecordKind::Malformed,
                        serde_json::json!({
                            "queue": queue, "head": head, "error": e.to_string()
                        }),
                        serde_json::json!({ "len": len }),
                    ));
                }
                if let Err(e) = self.add_used(vring, tracked, queue, head, len) {
                    tracing::error!(queue, head, error = %e, "write used entry");
                }
                self.shared.handled.fetch_add(1, Ordering::Relaxed);
                drop(admitted);
                true
            }
        }
    }

    pub(super) fn process_completions(&self, worker: usize, vrings: &[VringRwLock]) {
        let c = &self.shared.completions[worker];
        // Consume the wake-up first, then everything queued: a completion
        // sent after the read re-arms the eventfd.
        let _ = c.event.read();
        // A swap, so that it synchronizes with the completers' swaps.
        c.armed.swap(false, Ordering::AcqRel);
        let inflight = self.inflight();
        let tracked = inflight.as_deref();
        // Vrings to signal, as a bitmask: a worker has at most 64 (the
        // crate's `queues_per_thread` masks are u64).
        let mut touched = 0u64;
        while let Ok((request, len)) = c.rx.try_recv() {
            let queue = usize::from(request.queue());
            let local = self.local_index(queue);
            match vrings.get(local) {
                Some(vring) => {
                    self.finish(vring, tracked, request, len);
                    touched |= 1 << local;
                }
                None => {
                    tracing::error!(
                        queue,
                        worker,
                        "completion for a queue this worker does not own"
                    );
                    drop(request);
                }
            }
        }
        for (i, vring) in vrings.iter().enumerate() {
            if touched & (1 << i) != 0 {
                self.signal(vring);
            }
        }
    }
}

/// The heads in flight (`resubmit`) that are not among `ring_heads`, the
/// available ring's entries from the used index to the recovered next
/// position: the requests a frontend without in-flight tracking, which
/// restores the ring from the used index, would lose (and for each, a
/// completed request it would run again). Zero when the requests completed
/// in ring order.
fn out_of_ring_order(ring_heads: &[u16], resubmit: &[u16]) -> usize {
    resubmit.iter().filter(|h| !ring_heads.contains(h)).count()
}

#[cfg(test)]
mod tests {
    use super::out_of_ring_order;

    #[test]
    fn test_requests_completed_in_ring_order_leave_nothing_out_of_ring_order() {
        // The ring from the used index holds 7, 3, 9; the same heads are
        // in flight, in another counter order.
        assert_eq!(out_of_ring_order(&[7, 3, 9], &[9, 7, 3]), 0);
    }

    #[test]
    fn test_a_request_held_while_later_ones_completed_is_out_of_ring_order() {
        // Heads 5 and 1, before the used index in ring order, are still
        // in flight; 3 and 9, after them, completed. The ring from the
        // used index holds 7, 3, 9, and only 7 of them is in flight.
        assert_eq!(out_of_ring_order(&[7, 3, 9], &[5, 7, 1]), 2);
        assert_eq!(out_of_ring_order(&[], &[]), 0);
    }
}
