// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The direct entry: a guest access run on its caller's own thread.
//!
//! A vCPU thread blocked in `KVM_RUN` is a plain OS thread. Sending it
//! through a device actor's mailbox puts two sleeping threads (the
//! arbiter's, then the caller's) between the access and its answer. The
//! direct entry ([`DeviceRef::access_here`](crate::DeviceRef::access_here))
//! runs the access on the caller's thread instead, when that overtakes
//! nothing, and through the same gate, journal and device code as the
//! mailbox path:
//!
//! 1. The caller locks the device value. A device actor keeps its device in
//!    a [`Mutex`] shared with the direct entry and holds it for every call
//!    into the device (and, for an access answered at once, until its
//!    reply has been journalled), so the device is still called one access
//!    at a time, and the journal still holds its messages in the order it
//!    handled them.
//! 2. Under the lock it checks that the actor's mailbox holds nothing that
//!    could change the device: no event or drain request (the `queued`
//!    count, raised by every [`Events`] send and every drain request before
//!    the message is pushed, lowered when its handler has run), and no
//!    access (the gate's lane count, which covers every access queued,
//!    being handled, or answered later). The second check and the
//!    admission are one compare-and-swap ([`Gate::admit_if_idle`]). If
//!    either finds something, the answer is [`Here::Busy`] and nothing has
//!    been counted or journalled: the caller takes the mailbox path, which
//!    queues its access behind what was there.
//! 3. A closed gate refuses with the same typed [`Refused`] as a send, and
//!    the refusal is journalled as a send's is.
//! 4. Admitted: the caller's `still_routed` check runs (a bus re-reads its
//!    map's generation, so an access resolved on a map that has since
//!    dropped the device never reaches it: [`Here::Unrouted`]); then the
//!    access is journalled exactly as the bus's forward would journal it,
//!    run under `catch_unwind`, its reply journalled, its ticket dropped and
//!    the lock released, in that order.
//! 5. An answer the device defers ([`Completion::Later`]) cannot be waited
//!    for on the caller's thread: the future goes to the actor (`Adopt`),
//!    which keeps it in its pending list like any deferred access, and the
//!    caller parks on the reply. A panic fails the device here as the actor
//!    would: the gate is failed, the device dropped, the access answered
//!    `Failed`, and the actor told (`DirectFailed`), which answers its
//!    pending accesses and drains, tells the supervisor and stops.
//!
//! The ticket is held from the admission until the reply is journalled, so
//! a drain waits for a direct access exactly as for a queued one.

use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use actix::dev::SendError;
use actix::{Context, Handler, MailboxError, Message, Recipient};

use crate::device::{
    AccessReply, Completion, Deliver, Device, DeviceActor, GuestAccess, LaterReply,
};
use crate::gate::{panic_message, Gate};
use crate::ids::{ActorId, Seq};
use crate::journal::{Recordable, Replied, Sent};
use crate::lifecycle::State;
use crate::send::{Answer, Refused, Request, Responder, Runtime};

/// The actor that routed an access without it passing through that
/// actor's mailbox (a bus that resolved the address from a snapshot of its
/// map on the caller's thread). The journal sees the access as a message
/// to this actor, forwarded to the device, exactly as if the actor had
/// handled it.
#[derive(Clone, Copy)]
pub struct Via<'a> {
    /// The routing actor.
    pub to: &'a ActorId,
    /// The message type as that actor would have received it.
    pub kind: &'static str,
    /// The message as that actor would have received it.
    pub payload: &'a dyn Recordable,
}

impl<'a> Via<'a> {
    /// The routing actor `to`, as if it had received `msg`.
    pub fn new<M: Request>(to: &'a ActorId, msg: &'a M) -> Self {
        Via {
            to,
            kind: msg.kind(),
            payload: msg,
        }
    }
}

impl fmt::Debug for Via<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Via")
            .field("to", &self.to)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// What [`DeviceRef::access_here`](crate::DeviceRef::access_here) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Here {
    /// The access was admitted (or refused) and answered.
    Answered(Answer<AccessReply>),
    /// The device had messages queued or in hand: nothing was counted or
    /// journalled; send the access through the mailbox path.
    Busy,
    /// `still_routed` said no after admission: nothing was journalled and
    /// the device never saw the access; route it again.
    Unrouted,
}

/// Counts the messages in a device actor's mailbox that are not accesses
/// (events, drain requests): raised before each is pushed, lowered when
/// its handler has run (or the message is dropped unhandled).
#[derive(Clone, Debug, Default)]
pub(crate) struct Mailbox(Arc<AtomicU64>);

impl Mailbox {
    pub(crate) fn count<M>(&self, msg: M) -> Counted<M> {
        // SeqCst with the load in `is_empty`: a direct caller that does not
        // see this increment runs before the message is pushed.
        self.0.fetch_add(1, Ordering::SeqCst);
        Counted {
            msg,
            _queued: Queued(Arc::clone(&self.0)),
        }
    }

    fn is_empty(&self) -> bool {
        self.0.load(Ordering::SeqCst) == 0
    }
}

/// Lowers the mailbox count when dropped.
struct Queued(Arc<AtomicU64>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// A message counted in its device actor's mailbox while it waits there
/// (see the module docs): the count goes down when it is dropped, which
/// its handler does after it has run.
pub struct Counted<M> {
    pub(crate) msg: M,
    _queued: Queued,
}

impl<M: fmt::Debug> fmt::Debug for Counted<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Counted").field(&self.msg).finish()
    }
}

impl<M> Counted<M> {
    /// The message, and what keeps it counted until dropped.
    pub(crate) fn take(self) -> (M, impl Drop) {
        (self.msg, self._queued)
    }
}

impl<M: Message> Message for Counted<M> {
    type Result = M::Result;
}

/// Where a device's external inputs go: the device actor's mailbox, each
/// counted so that a direct access does not overtake it. Cheap to clone.
pub struct Events<E: Send + 'static> {
    pub(crate) recipient: Recipient<Counted<Deliver<E>>>,
    pub(crate) mailbox: Mailbox,
}

impl<E: Send + 'static> Clone for Events<E> {
    fn clone(&self) -> Self {
        Events {
            recipient: self.recipient.clone(),
            mailbox: self.mailbox.clone(),
        }
    }
}

impl<E: Send + 'static> fmt::Debug for Events<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("queued", &self.mailbox.0.load(Ordering::Relaxed))
            .finish()
    }
}

impl<E: Send + 'static> Events<E> {
    /// Delivers `msg`, ignoring the mailbox's capacity and the answer.
    pub fn do_send(&self, msg: Deliver<E>) {
        self.recipient.do_send(self.mailbox.count(msg));
    }

    /// Delivers `msg` if the mailbox has room; gives it back if not.
    pub fn try_send(&self, msg: Deliver<E>) -> Result<(), SendError<Deliver<E>>> {
        self.recipient
            .try_send(self.mailbox.count(msg))
            .map_err(|e| match e {
                SendError::Full(c) => SendError::Full(c.msg),
                SendError::Closed(c) => SendError::Closed(c.msg),
            })
    }

    /// Delivers `msg`; the future resolves to the device's answer.
    pub fn send(
        &self,
        msg: Deliver<E>,
    ) -> impl Future<Output = Result<Result<(), Refused>, MailboxError>> + 'static {
        self.recipient.send(self.mailbox.count(msg))
    }

    /// Whether the device actor's mailbox is still open.
    pub fn connected(&self) -> bool {
        self.recipient.connected()
    }
}

/// What a device actor shares with the direct entry.
pub(crate) struct Shared<D> {
    /// The device value; `None` once it has been dropped (stopped, or
    /// failed). Held by the actor for every call into the device, and by a
    /// direct caller for one access. Nobody unwinds while holding it (every
    /// call into the device is under `catch_unwind`), so it is never
    /// poisoned; if it were, the value is still the device's.
    device: Mutex<Option<D>>,
    /// The mailbox's events and drain requests not yet handled.
    pub(crate) mailbox: Mailbox,
    /// Accesses handed to the device, on either path.
    pub(crate) handled: AtomicU64,
}

impl<D> Shared<D> {
    pub(crate) fn new(device: D) -> Self {
        Shared {
            device: Mutex::new(Some(device)),
            mailbox: Mailbox::default(),
            handled: AtomicU64::new(0),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Option<D>> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A deferred answer of a direct access, handed to the device actor to
/// wait for like any deferred access.
pub struct Adopt {
    pub(crate) seq: Seq,
    pub(crate) access: GuestAccess,
    pub(crate) fut: LaterReply,
    pub(crate) reply: Responder<AccessReply>,
}

impl fmt::Debug for Adopt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adopt")
            .field("seq", &self.seq)
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

impl Message for Adopt {
    type Result = ();
}

/// A device failed (panicked) in a direct access: the actor finishes the
/// failure (answers its pending accesses and drains, tells the supervisor,
/// stops).
#[derive(Debug)]
pub struct DirectFailed {
    pub(crate) reason: String,
}

impl Message for DirectFailed {
    type Result = ();
}

impl<D: Device> Handler<Adopt> for DeviceActor<D> {
    type Result = ();

    fn handle(&mut self, msg: Adopt, ctx: &mut Context<Self>) {
        // Admitted and handed to the device already: pending whatever the
        // state now, until its future answers it.
        self.defer(ctx, msg.seq, msg.access, msg.reply, msg.fut);
    }
}

impl<D: Device> Handler<DirectFailed> for DeviceActor<D> {
    type Result = ();

    fn handle(&mut self, msg: DirectFailed, ctx: &mut Context<Self>) {
        self.fail(ctx, msg.reason);
    }
}

/// The direct entry of one device, behind [`DeviceRef`](crate::DeviceRef).
pub(crate) trait DirectT: Send + Sync + 'static {
    fn access(
        &self,
        from: &ActorId,
        via: Option<Via<'_>>,
        access: GuestAccess,
        still_routed: &dyn Fn() -> bool,
    ) -> Here;
}

/// The direct entry of a device of type `D`.
pub(crate) struct Direct<D: Device> {
    /// The device actor's id (the journal's receiver).
    pub(crate) to: ActorId,
    pub(crate) shared: Arc<Shared<D>>,
    /// The device actor's gate.
    pub(crate) gate: Gate,
    pub(crate) runtime: Runtime,
    /// Where deferred answers and failures go.
    pub(crate) adopt: Recipient<Adopt>,
    pub(crate) failed: Recipient<DirectFailed>,
}

impl<D: Device> Direct<D> {
    /// Journals the access as sent (after the routing actor's message, if
    /// any) and returns its sequence number.
    fn sent(&self, from: &ActorId, via: Option<Via<'_>>, access: &GuestAccess) -> Seq {
        let rt = &self.runtime;
        let Some(journal) = rt.journal() else {
            return rt.next_seq();
        };
        let (forwarded_from, sender) = match via {
            Some(v) => {
                let seq = rt.next_seq();
                journal.sent(&Sent {
                    seq,
                    forwarded_from: None,
                    from,
                    to: v.to,
                    kind: v.kind,
                    payload: v.payload,
                });
                (Some(seq), v.to)
            }
            None => (None, from),
        };
        let seq = rt.next_seq();
        journal.sent(&Sent {
            seq,
            forwarded_from,
            from: sender,
            to: &self.to,
            kind: access.kind(),
            payload: access as &dyn Recordable,
        });
        seq
    }

    fn replied(&self, seq: Seq, answer: &Answer<AccessReply>) {
        if let Some(journal) = self.runtime.journal() {
            journal.replied(&Replied {
                seq,
                reply: answer as &dyn Recordable,
            });
        }
    }

    fn refused(
        &self,
        from: &ActorId,
        via: Option<Via<'_>>,
        access: &GuestAccess,
        r: Refused,
    ) -> Here {
        let seq = self.sent(from, via, access);
        let answer = Err(r);
        self.replied(seq, &answer);
        Here::Answered(answer)
    }
}

impl<D: Device> DirectT for Direct<D> {
    fn access(
        &self,
        from: &ActorId,
        via: Option<Via<'_>>,
        access: GuestAccess,
        still_routed: &dyn Fn() -> bool,
    ) -> Here {
        let mut guard = self.shared.lock();
        if !self.shared.mailbox.is_empty() {
            return Here::Busy;
        }
        let ticket = match self.gate.admit_if_idle(0) {
            Ok(Some(t)) => t,
            Ok(None) => return Here::Busy,
            Err(r) => {
                drop(guard);
                return self.refused(from, via, &access, r);
            }
        };
        if !still_routed() {
            return Here::Unrouted;
        }
        // Admitted while a failure or a drain was closing the gate: the
        // actor's handler would refuse it now, and so does this.
        let state = self.gate.state();
        let Some(device) = guard.as_mut().filter(|_| state == State::Running) else {
            drop(guard);
            let r = match state {
                State::Draining => Refused::Draining,
                _ => self.gate.refusal(),
            };
            let here = self.refused(from, via, &access, r);
            drop(ticket);
            return here;
        };
        let seq = self.sent(from, via, &access);
        self.shared.handled.fetch_add(1, Ordering::Relaxed);
        match catch_unwind(AssertUnwindSafe(|| device.access(&access))) {
            Ok(Completion::Ready(r)) => {
                let answer = Ok(r);
                // Journalled under the lock, then counted out: the order
                // the actor's responder keeps.
                self.replied(seq, &answer);
                drop(ticket);
                drop(guard);
                Here::Answered(answer)
            }
            Ok(Completion::Later(fut)) => {
                drop(guard);
                let journal = self.runtime.journal().cloned();
                let (reply, answer) = Responder::admitted(seq, ticket, journal);
                // A closed mailbox drops the message, whose responder then
                // answers `Gone`.
                self.adopt.do_send(Adopt {
                    seq,
                    access,
                    fut,
                    reply,
                });
                Here::Answered(answer.wait())
            }
            Err(payload) => {
                let reason = format!("access: {}", panic_message(payload.as_ref()));
                tracing::error!(device = %self.to, %reason, "device failed; stopping it");
                self.gate.fail(reason.clone());
                // Dropping a panicked device may panic again; that must not
                // escape.
                if let Some(device) = guard.take() {
                    let _ = catch_unwind(AssertUnwindSafe(move || drop(device)));
                }
                let answer = Err(Refused::Failed);
                self.replied(seq, &answer);
                drop(ticket);
                drop(guard);
                self.failed.do_send(DirectFailed { reason });
                Here::Answered(answer)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::thread::{self, ThreadId};
    use std::time::Duration;

    use actix::{Actor, Arbiter, System};
    use futures::channel::oneshot;

    use super::*;
    use crate::addr::{AccessSize, RegionOffset};
    use crate::device::{spawn_device, AccessOp, DeviceRegion, SpawnedDevice};
    use crate::ids::DeviceId;
    use crate::journal::{JournalRecord, MemoryJournal};
    use crate::supervisor::{QueryFailures, Supervisor};
    use crate::DeviceRef;

    type Log = Arc<Mutex<Vec<(String, ThreadId)>>>;
    type Gates = Arc<Mutex<Vec<oneshot::Sender<u64>>>>;

    /// Logs every access and event with the thread it ran on. Offset 0x10
    /// answers when the test opens its gate; offset 0xdead panics.
    struct Probe {
        log: Log,
        gates: Gates,
    }

    impl Device for Probe {
        type Event = u64;

        fn kind(&self) -> &'static str {
            "probe"
        }

        fn access(&mut self, a: &GuestAccess) -> Completion {
            let what = match a.op {
                AccessOp::Read => format!("read {:#x}", a.offset.0),
                AccessOp::Write { value } => format!("write {:#x}={value}", a.offset.0),
            };
            self.log
                .lock()
                .expect("log")
                .push((what, thread::current().id()));
            match a.offset.0 {
                0x10 => {
                    let (tx, rx) = oneshot::channel();
                    self.gates.lock().expect("gates").push(tx);
                    Completion::Later(Box::pin(async move {
                        AccessReply::Read {
                            value: rx.await.unwrap_or(0),
                        }
                    }))
                }
                0xdead => panic!("register 0xdead"),
                _ => Completion::Ready(AccessReply::Read { value: 7 }),
            }
        }

        fn event(&mut self, e: u64) {
            let me = thread::current().id();
            self.log
                .lock()
                .expect("log")
                .push((format!("event {e}"), me));
        }
    }

    fn read(offset: u64) -> GuestAccess {
        GuestAccess {
            region: DeviceRegion(0),
            offset: RegionOffset(offset),
            size: AccessSize::B4,
            op: AccessOp::Read,
        }
    }

    fn me() -> ActorId {
        ActorId::new("vcpu0")
    }

    fn probe(
        rt: &Runtime,
        arbiter: &actix::ArbiterHandle,
        sup: Option<Recipient<crate::DeviceFailed>>,
    ) -> (SpawnedDevice<u64>, Log, Gates) {
        let (log, gates) = (Log::default(), Gates::default());
        let device = Probe {
            log: Arc::clone(&log),
            gates: Arc::clone(&gates),
        };
        let spawned = spawn_device(rt, DeviceId::new("p"), device, arbiter, sup);
        (spawned, log, gates)
    }

    fn here(dev: &DeviceRef, access: GuestAccess) -> Here {
        dev.access_here(&me(), None, access, &|| true)
    }

    fn entries(log: &Log) -> Vec<String> {
        log.lock()
            .expect("log")
            .iter()
            .map(|(w, _)| w.clone())
            .collect()
    }

    #[actix_rt::test]
    async fn test_an_idle_device_answers_on_the_callers_thread() {
        let rt = Runtime::new();
        let (spawned, log, _) = probe(&rt, &Arbiter::current(), None);
        let dev = spawned.device;
        dev.realize_and_start().await.expect("start");
        let answer = thread::scope(|s| {
            s.spawn(|| (here(&dev, read(4)), thread::current().id()))
                .join()
                .expect("thread")
        });
        assert_eq!(answer.0, Here::Answered(Ok(AccessReply::Read { value: 7 })));
        assert_eq!(log.lock().expect("log")[0].1, answer.1, "ran on the caller");
        assert_eq!(dev.status().await.expect("status").handled, 1);
        assert_eq!(dev.gate().in_flight(), 0);
    }

    #[actix_rt::test]
    async fn test_a_queued_access_or_event_makes_the_direct_entry_step_aside() {
        let rt = Runtime::new();
        let (spawned, log, _) = probe(&rt, &Arbiter::current(), None);
        let dev = spawned.device;
        dev.realize_and_start().await.expect("start");
        // This arbiter is the test's: nothing queued runs until it awaits.
        let queued = dev.access(&me(), read(1));
        assert_eq!(here(&dev, read(2)), Here::Busy, "behind a queued access");
        assert_eq!(queued.await, Ok(AccessReply::Read { value: 7 }));
        spawned.events.do_send(Deliver(5));
        assert_eq!(here(&dev, read(3)), Here::Busy, "behind a queued event");
        let drain = dev.drain(None);
        dev.status().await.expect("status");
        drop(drain);
        assert_eq!(
            entries(&log),
            ["read 0x1", "event 5"],
            "nothing busy reached the device"
        );
        assert_eq!(dev.gate().in_flight(), 0, "a busy entry counts nothing in");
    }

    #[actix_rt::test]
    async fn test_a_queued_drain_makes_the_direct_entry_step_aside() {
        let rt = Runtime::new();
        let (spawned, _, _) = probe(&rt, &Arbiter::current(), None);
        let dev = spawned.device;
        dev.realize_and_start().await.expect("start");
        let drain = dev.drain(None);
        assert_eq!(here(&dev, read(2)), Here::Busy);
        drain.await.expect("drained");
        assert_eq!(here(&dev, read(2)), Here::Answered(Err(Refused::Gone)));
    }

    #[actix_rt::test]
    async fn test_a_device_not_running_refuses_with_the_sends_typed_error() {
        let rt = Runtime::new();
        let (spawned, log, _) = probe(&rt, &Arbiter::current(), None);
        let dev = spawned.device;
        let not_running = Here::Answered(Err(Refused::NotRunning {
            state: State::Created,
        }));
        assert_eq!(here(&dev, read(0)), not_running);
        dev.realize_and_start().await.expect("start");
        dev.drain(None).await.expect("drained");
        assert_eq!(here(&dev, read(0)), Here::Answered(Err(Refused::Gone)));
        assert!(entries(&log).is_empty());
    }

    #[actix_rt::test]
    async fn test_an_access_unrouted_after_admission_is_undone_unseen() {
        let journal = Arc::new(MemoryJournal::new());
        let rt = Runtime::with_journal(journal.clone());
        let (spawned, log, _) = probe(&rt, &Arbiter::current(), None);
        let dev = spawned.device;
        dev.realize_and_start().await.expect("start");
        let r = dev.access_here(&me(), None, read(0), &|| false);
        assert_eq!(r, Here::Unrouted);
        assert!(entries(&log).is_empty());
        assert!(journal.records().is_empty());
        assert_eq!(dev.gate().in_flight(), 0);
    }

    #[actix_rt::test]
    async fn test_a_direct_access_is_journalled_as_the_bus_forward_would_be() {
        let journal = Arc::new(MemoryJournal::new());
        let rt = Runtime::with_journal(journal.clone());
        let (spawned, _, _) = probe(&rt, &Arbiter::current(), None);
        let dev = spawned.device;
        dev.realize_and_start().await.expect("start");
        let bus = ActorId::new("bus:b");
        let payload = read(4);
        let via = Via::new(&bus, &payload);
        let r = dev.access_here(&me(), Some(via), read(4), &|| true);
        assert_eq!(r, Here::Answered(Ok(AccessReply::Read { value: 7 })));
        let shape: Vec<String> = journal
            .records()
            .iter()
            .map(|r| match r {
                JournalRecord::Sent {
                    seq,
                    forwarded_from,
                    from,
                    to,
                    kind,
                    ..
                } => format!("sent {} {forwarded_from:?} {from} {to} {kind}", seq.0),
                JournalRecord::Replied { seq, reply, .. } => format!("replied {} {reply}", seq.0),
            })
            .collect();
        assert_eq!(
            shape,
            [
                "sent 1 None vcpu0 bus:b read",
                "sent 2 Some(Seq(1)) bus:b dev:p read",
                r#"replied 2 {"Ok":{"reply":"read","value":7}}"#,
            ]
        );
    }

    #[test]
    fn test_a_deferred_direct_access_is_adopted_and_holds_the_drain() {
        let sys = System::new();
        let arbiter = Arbiter::new();
        let rt = Runtime::new();
        let (spawned, _, gates) = probe(&rt, &arbiter.handle(), None);
        let dev = spawned.device;
        sys.block_on(dev.realize_and_start()).expect("start");
        thread::scope(|s| {
            let slow = s.spawn(|| here(&dev, read(0x10)));
            while gates.lock().expect("gates").is_empty() {
                thread::yield_now();
            }
            let mut drain = Box::pin(dev.drain(None));
            // Its mailbox is handled in order: the drain has begun.
            sys.block_on(dev.status()).expect("status");
            assert_eq!(here(&dev, read(0)), Here::Answered(Err(Refused::Draining)));
            thread::sleep(Duration::from_millis(20));
            assert!(!slow.is_finished(), "answered before the device did");
            assert!(
                sys.block_on(async { futures::poll!(&mut drain) })
                    .is_pending(),
                "drained with a direct access in flight"
            );
            for tx in gates.lock().expect("gates").drain(..) {
                let _ = tx.send(9);
            }
            let answer = slow.join().expect("thread");
            assert_eq!(answer, Here::Answered(Ok(AccessReply::Read { value: 9 })));
            let report = sys.block_on(drain).expect("drained");
            assert_eq!(report.id, DeviceId::new("p"));
        });
        assert_eq!(here(&dev, read(0)), Here::Answered(Err(Refused::Gone)));
        arbiter.stop();
    }

    #[test]
    fn test_a_panic_on_the_callers_thread_fails_that_device_as_the_actor_would() {
        let sys = System::new();
        let arbiter = Arbiter::new();
        let rt = Runtime::new();
        let sup = sys.block_on(async { Supervisor::default().start() });
        let (spawned, _, _) = probe(&rt, &arbiter.handle(), Some(sup.clone().recipient()));
        let dev = spawned.device;
        sys.block_on(dev.realize_and_start()).expect("start");
        let pending = dev.access(&me(), read(0x10));
        sys.block_on(dev.status()).expect("status");
        let boom = thread::scope(|s| s.spawn(|| here(&dev, read(0xdead))).join());
        // Busy behind the deferred access: it took the mailbox path.
        assert_eq!(boom.expect("contained"), Here::Busy);
        // Once nothing is in flight the panic happens on this thread.
        drop(pending);
        let (spawned, _, _) = probe(&rt, &arbiter.handle(), Some(sup.clone().recipient()));
        let dev = spawned.device;
        sys.block_on(dev.realize_and_start()).expect("start");
        let boom = thread::scope(|s| s.spawn(|| here(&dev, read(0xdead))).join());
        assert_eq!(
            boom.expect("contained"),
            Here::Answered(Err(Refused::Failed))
        );
        assert_eq!(here(&dev, read(0)), Here::Answered(Err(Refused::Failed)));
        let failures = sys.block_on(async {
            // The actor finishes the failure from its mailbox.
            while dev.status().await.is_some() {}
            sup.send(QueryFailures).await.expect("supervisor")
        });
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].reason.contains("register 0xdead"));
        assert!(!dev.connected() || sys.block_on(dev.status()).is_none());
        arbiter.stop();
    }
}
