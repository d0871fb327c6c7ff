// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Device actors: the [`Device`] trait a device author implements, and the
//! [`DeviceActor`] that hosts it, enforces the lifecycle, drains on unplug and
//! contains panics.
//!
//! # The drain path
//!
//! Unplugging is done by the bus (see the `switchboard-bus` crate): first the
//! bus stops routing to the device, then it sends [`Drain`]. From the moment
//! `Drain` is handled:
//!
//! - every [`GuestAccess`] still arriving is answered [`Refused::Draining`]
//!   without reaching the device;
//! - accesses the device accepted earlier and answers later (those that
//!   returned [`Completion::Later`]) stay in `pending`, keyed by sequence
//!   number, with their [`Responder`];
//! - each completion removes its entry and answers its caller; when `pending`
//!   becomes empty every waiting `Drain` gets its [`DrainReport`] (concurrent
//!   drains all wait for the same moment), the state becomes `Stopped`, the
//!   device value is dropped and the actor stops;
//! - a `Drain` with a deadline that passes first is answered with
//!   [`DrainError::Timeout`] listing what is still pending; the drain itself
//!   goes on and a later `Drain` can wait for it.
//!
//! A panic in any device method is caught: that device's pending accesses are
//! answered [`Refused::Failed`], waiting drains get [`DrainError::Failed`], the
//! supervisor is told, and the actor stops. The arbiter and every other actor
//! on it keep running.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix::ActorFutureExt;
use futures::channel::oneshot;
use futures::FutureExt;
use serde::{Deserialize, Serialize};

use crate::addr::{AccessSize, RegionOffset};
use crate::direct::{Counted, Direct, DirectT, Events, Here, Shared, Via};
use crate::gate::{panic_message, Gate};
use crate::ids::{ActorId, DeviceId, Seq};
use crate::lifecycle::{InvalidTransition, State};
use crate::send::{Envelope, Refused, Reply, Request, Responder, Runtime, Sender};
use crate::supervisor::DeviceFailed;

/// Which of a device's regions an access is for (BAR 0, BAR 2, ...).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceRegion(pub u32);

/// What an access does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum AccessOp {
    /// A read.
    Read,
    /// A write of `value`; only the low `size` bytes are meaningful.
    Write {
        /// The value written.
        value: u64,
    },
}

/// One guest access to one of a device's registers, as the device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestAccess {
    /// The device region.
    pub region: DeviceRegion,
    /// Offset inside that region.
    pub offset: RegionOffset,
    /// Width.
    pub size: AccessSize,
    /// Read or write.
    #[serde(flatten)]
    pub op: AccessOp,
}

impl Request for GuestAccess {
    type Reply = AccessReply;

    fn kind(&self) -> &'static str {
        match self.op {
            AccessOp::Read => "read",
            AccessOp::Write { .. } => "write",
        }
    }
}

/// A device's answer to a [`GuestAccess`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum AccessReply {
    /// The value read, zero-extended from the access size.
    Read {
        /// The value.
        value: u64,
    },
    /// The write was done.
    Written,
}

/// A future completing a deferred access; runs on the device's arbiter (a
/// direct access hands it there: see [`crate::direct`]).
pub type LaterReply = Pin<Box<dyn Future<Output = AccessReply> + Send + 'static>>;

/// How a device answers an access.
pub enum Completion {
    /// Answered now.
    Ready(AccessReply),
    /// Answered when the future completes. The access stays pending (and
    /// delays any drain) until then.
    Later(LaterReply),
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Completion::Ready(r) => f.debug_tuple("Ready").field(r).finish(),
            Completion::Later(_) => f.write_str("Later(..)"),
        }
    }
}

/// Device logic, hosted by a [`DeviceActor`].
///
/// # Lifecycle contract
///
/// - [`realize`](Device::realize) is called once, on `Realize`, before any
///   access. It acquires what the device needs; an error leaves the actor in
///   `Created`.
/// - [`access`](Device::access) and [`event`](Device::event) are called only
///   while the actor is `Running`, one at a time: on the actor's arbiter, or,
///   for an access entered through [`DeviceRef::access_here`], on the
///   caller's thread while the actor waits (see [`crate::direct`]).
/// - [`drain_started`](Device::drain_started) is called once when a drain
///   begins; no `access` follows it. Deferred completions already returned
///   still run.
/// - [`stopped`](Device::stopped) is called once, when the last pending access
///   has been answered (or the actor is stopped before running), right before
///   the value is dropped.
///
/// A panic in any of these fails this device only.
pub trait Device: Send + Unpin + 'static {
    /// Inputs from outside the guest (bytes on a serial line, say), delivered
    /// as messages so they can be journalled.
    type Event: Serialize + Send + 'static;

    /// The device kind, such as `uart-16550`.
    fn kind(&self) -> &'static str;

    /// Acquires resources. The error is reported to whoever sent `Realize`.
    fn realize(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// Handles one guest access.
    fn access(&mut self, access: &GuestAccess) -> Completion;

    /// Handles one external input.
    fn event(&mut self, _event: Self::Event) {}

    /// The device is being unplugged: no more accesses will arrive.
    fn drain_started(&mut self) {}

    /// The device is about to be dropped.
    fn stopped(&mut self) {}
}

/// Moves a device from `Created` to `Realized`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Realize;

impl Message for Realize {
    type Result = Result<(), LifecycleError>;
}

/// Moves a device from `Realized` to `Running`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Start;

impl Message for Start {
    type Result = Result<(), LifecycleError>;
}

/// Asks a device to finish its accepted accesses and stop.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Drain {
    /// How long to wait before answering with what is still pending; `None`
    /// waits as long as it takes.
    pub deadline: Option<Duration>,
}

impl Message for Drain {
    type Result = Result<DrainReport, DrainError>;
}

/// Asks a device for its [`DeviceStatus`].
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct QueryStatus;

impl Message for QueryStatus {
    type Result = DeviceStatus;
}

/// Delivers one external input to a device.
#[derive(Debug, Serialize, Deserialize)]
pub struct Deliver<E>(pub E);

impl<E: Send + 'static> Message for Deliver<E> {
    type Result = Result<(), Refused>;
}

/// A lifecycle request that could not be carried out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum LifecycleError {
    /// The transition is not an edge of the lifecycle.
    #[error("Device {id}: invalid lifecycle transition")]
    Transition {
        /// The device.
        id: DeviceId,
        /// The refused transition.
        #[source]
        source: InvalidTransition,
    },
    /// The device's `realize` failed.
    #[error("Device {id}: realize failed: {reason}")]
    Realize {
        /// The device.
        id: DeviceId,
        /// What the device said.
        reason: String,
    },
    /// The device panicked and has been stopped.
    #[error("Device {id} failed")]
    Failed {
        /// The device.
        id: DeviceId,
    },
    /// The actor is gone.
    #[error("Device {id} is gone")]
    Gone {
        /// The device.
        id: DeviceId,
    },
}

/// An accepted access still waiting for its answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingAccess {
    /// Its sequence number.
    pub seq: Seq,
    /// `read` or `write`.
    pub kind: String,
    /// The access itself.
    pub access: GuestAccess,
    /// Time since the device accepted it.
    pub age: Duration,
}

/// A completed drain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// The device.
    pub id: DeviceId,
    /// Accesses that were pending when the drain began (and were answered).
    pub answered_during_drain: u64,
    /// Time from the drain request to the last answer.
    pub waited: Duration,
}

/// A drain that has not completed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum DrainError {
    /// The deadline passed with accesses still pending. The drain goes on.
    #[error("Device {id}: drain not done after {waited:?}, {} accesses pending", pending.len())]
    Timeout {
        /// The device.
        id: DeviceId,
        /// Time waited.
        waited: Duration,
        /// What is still pending, oldest first.
        pending: Vec<PendingAccess>,
    },
    /// The device panicked; its pending accesses were answered `Failed`.
    #[error("Device {id} failed while draining")]
    Failed {
        /// The device.
        id: DeviceId,
    },
    /// The actor is gone (it had already stopped).
    #[error("Device {id} is gone")]
    Gone {
        /// The device.
        id: DeviceId,
    },
}

/// A snapshot of a device actor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The device.
    pub id: DeviceId,
    /// Its kind.
    pub kind: String,
    /// Its lifecycle state.
    pub state: State,
    /// Accesses accepted and not yet answered.
    pub pending: u64,
    /// Accesses handed to the device since it started.
    pub handled: u64,
    /// Accesses refused (draining, not running).
    pub refused: u64,
}

struct PendingEntry {
    access: GuestAccess,
    accepted: Instant,
    responder: Responder<AccessReply>,
}

struct DrainWaiter {
    token: u64,
    tx: oneshot::Sender<Result<DrainReport, DrainError>>,
}

/// The actor hosting one [`Device`].
pub struct DeviceActor<D: Device> {
    id: DeviceId,
    kind: &'static str,
    /// The device (`None` once dropped) behind the lock the direct entry
    /// shares; the mailbox count; the accesses handled.
    shared: Arc<Shared<D>>,
    /// Admission, in-flight count, lifecycle state and drain: shared with
    /// the [`Sender`] every access comes through, so an access to a device
    /// that is not running is refused before it is enqueued.
    gate: Gate,
    /// Whether the drain future has been spawned.
    drain_spawned: bool,
    /// Accepted deferred accesses, by sequence number. Only this actor touches it.
    pending: HashMap<Seq, PendingEntry>,
    /// Everyone waiting for the drain to complete; answered together.
    drain_waiters: Vec<DrainWaiter>,
    next_drain_token: u64,
    drain_started: Option<Instant>,
    pending_at_drain: u64,
    refused: u64,
    supervisor: Option<Recipient<DeviceFailed>>,
}

impl<D: Device> fmt::Debug for DeviceActor<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceActor")
            .field("id", &self.id)
            .field("state", &self.gate.state())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl<D: Device> DeviceActor<D> {
    fn new(
        id: DeviceId,
        kind: &'static str,
        shared: Arc<Shared<D>>,
        gate: Gate,
        supervisor: Option<Recipient<DeviceFailed>>,
    ) -> Self {
        DeviceActor {
            kind,
            id,
            shared,
            gate,
            drain_spawned: false,
            pending: HashMap::new(),
            drain_waiters: Vec::new(),
            next_drain_token: 0,
            drain_started: None,
            pending_at_drain: 0,
            refused: 0,
            supervisor,
        }
    }

    /// Runs `f` on the device, under its lock, containing a panic. `None`
    /// means the device failed (or was already gone) and the actor is
    /// stopping.
    fn with_device<T>(
        &mut self,
        ctx: &mut Context<Self>,
        what: &str,
        f: impl FnOnce(&mut D) -> T,
    ) -> Option<T> {
        let shared = Arc::clone(&self.shared);
        let mut guard = shared.lock();
        let device = guard.as_mut()?;
        match catch_unwind(AssertUnwindSafe(|| f(device))) {
            Ok(v) => Some(v),
            Err(payload) => {
                drop(guard);
                let reason = format!("{what}: {}", panic_message(payload.as_ref()));
                self.fail(ctx, reason);
                None
            }
        }
    }

    fn has_device(&self) -> bool {
        self.shared.lock().is_some()
    }
    /// Contains a device failure: answers everything, stops the actor.
    pub(crate) fn fail(&mut self, ctx: &mut Context<Self>, reason: String) {
        // A direct access's failure was logged where it was caught.
        if self.gate.fail(reason.clone()) {
            tracing::error!(device = %self.id, %reason, "device failed; stopping it");
        }
        // Dropping a panicked device may panic again; that must not escape.
        let device = self.shared.lock().take();
        if let Some(device) = device {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(device)));
        }
        for (_, entry) in self.pending.drain() {
            entry.responder.reply(Err(Refused::Failed));
        }
        for waiter in self.drain_waiters.drain(..) {
            let _ = waiter.tx.send(Err(DrainError::Failed {
                id: self.id.clone(),
            }));
        }
        if let Some(supervisor) = &self.supervisor {
            supervisor.do_send(DeviceFailed {
                id: self.id.clone(),
                reason,
            });
        }
        ctx.stop();
    }

    fn accept(&mut self, ctx: &mut Context<Self>, env: Envelope<GuestAccess>) {
        let Envelope {
            seq, msg, reply, ..
        } = env;
        self.shared.handled.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&self.shared);
        let mut guard = shared.lock();
        let Some(device) = guard.as_mut() else {
            drop(guard);
            reply.reply(Err(Refused::Failed));
            return;
        };
        match catch_unwind(AssertUnwindSafe(|| device.access(&msg))) {
            // Answered under the lock: a direct access that follows is
            // journalled after this reply.
            Ok(Completion::Ready(r)) => reply.reply(Ok(r)),
            Ok(Completion::Later(fut)) => {
                drop(guard);
                self.defer(ctx, seq, msg, reply, fut);
            }
            Err(payload) => {
                drop(guard);
                let reason = format!("access: {}", panic_message(payload.as_ref()));
                self.fail(ctx, reason);
                reply.reply(Err(Refused::Failed));
            }
        }
    }

    /// Keeps a deferred access pending until its future answers it.
    pub(crate) fn defer(
        &mut self,
        ctx: &mut Context<Self>,
        seq: Seq,
        access: GuestAccess,
        reply: Responder<AccessReply>,
        fut: LaterReply,
    ) {
        self.pending.insert(
            seq,
            PendingEntry {
                access,
                accepted: Instant::now(),
                responder: reply,
            },
        );
        let fut = AssertUnwindSafe(fut).catch_unwind();
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(r) => act.complete(ctx, seq, r),
            Err(payload) => {
                let reason = format!("deferred access: {}", panic_message(payload.as_ref()));
                act.fail(ctx, reason);
            }
        }));
    }

    fn complete(&mut self, ctx: &mut Context<Self>, seq: Seq, r: AccessReply) {
        if let Some(entry) = self.pending.remove(&seq) {
            entry.responder.reply(Ok(r));
        }
        // A drain in progress completes through the gate's drain future,
        // which this answer (its ticket dropped) may just have woken.
        let _ = ctx;
    }

    fn finish_drain(&mut self, ctx: &mut Context<Self>) {
        let waited = self.drain_started.map(|t| t.elapsed()).unwrap_or_default();
        self.with_device(ctx, "stopped", |d| d.stopped());
        let device = self.shared.lock().take();
        if device.is_none() {
            // `stopped` panicked and `fail` already answered everyone.
            return;
        }
        // Dropped outside the lock, as `fail` does.
        let _ = catch_unwind(AssertUnwindSafe(move || drop(device)));
        // The gate's drain already went to Stopped; Created or Realized
        // go there now.
        let _ = self.gate.transition(State::Stopped);
        let report = DrainReport {
            id: self.id.clone(),
            answered_during_drain: self.pending_at_drain,
            waited,
        };
        for waiter in self.drain_waiters.drain(..) {
            let _ = waiter.tx.send(Ok(report.clone()));
        }
        tracing::debug!(device = %self.id, ?waited, "drained and stopped");
        ctx.stop();
    }

    fn pending_list(&self) -> Vec<PendingAccess> {
        let mut list: Vec<PendingAccess> = self
            .pending
            .iter()
            .map(|(seq, e)| PendingAccess {
                seq: *seq,
                kind: e.access.kind().to_string(),
                access: e.access,
                age: e.accepted.elapsed(),
            })
            .collect();
        list.sort_by_key(|p| p.seq);
        list
    }

    fn expire_waiter(&mut self, token: u64) {
        let Some(pos) = self.drain_waiters.iter().position(|w| w.token == token) else {
            return;
        };
        let waiter = self.drain_waiters.swap_remove(pos);
        let waited = self.drain_started.map(|t| t.elapsed()).unwrap_or_default();
        let _ = waiter.tx.send(Err(DrainError::Timeout {
            id: self.id.clone(),
            waited,
            pending: self.pending_list(),
        }));
    }

    fn transition(&mut self, to: State) -> Result<(), LifecycleError> {
        self.gate
            .transition(to)
            .map_err(|source| LifecycleError::Transition {
                id: self.id.clone(),
                source,
            })
    }
}

/// Room for control messages in the mailbox; accesses do not count.
const CONTROL_MAILBOX_CAPACITY: usize = 4096;

impl<D: Device> Actor for DeviceActor<D> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Accesses use `do_send`, which ignores the capacity; control
        // messages (drain, status, region changes) are sent eagerly while
        // fewer than this many wait, and when polled after that.
        ctx.set_mailbox_capacity(CONTROL_MAILBOX_CAPACITY);
    }
}

impl<D: Device> Handler<Envelope<GuestAccess>> for DeviceActor<D> {
    type Result = ();

    fn handle(&mut self, env: Envelope<GuestAccess>, ctx: &mut Context<Self>) {
        match self.gate.state() {
            State::Running => self.accept(ctx, env),
            State::Draining => {
                self.refused += 1;
                env.reply.reply(Err(Refused::Draining));
            }
            State::Stopped => env.reply.reply(Err(Refused::Gone)),
            state @ (State::Created | State::Realized) => {
                self.refused += 1;
                env.reply.reply(Err(Refused::NotRunning { state }));
            }
        }
    }
}

impl<D: Device> Handler<Realize> for DeviceActor<D> {
    type Result = Result<(), LifecycleError>;

    fn handle(&mut self, _: Realize, ctx: &mut Context<Self>) -> Self::Result {
        if !self.gate.state().can_become(State::Realized) {
            return self.transition(State::Realized);
        }
        match self.with_device(ctx, "realize", |d| d.realize()) {
            None => Err(LifecycleError::Failed {
                id: self.id.clone(),
            }),
            Some(Err(reason)) => Err(LifecycleError::Realize {
                id: self.id.clone(),
                reason,
            }),
            Some(Ok(())) => self.transition(State::Realized),
        }
    }
}

impl<D: Device> Handler<Start> for DeviceActor<D> {
    type Result = Result<(), LifecycleError>;

    fn handle(&mut self, _: Start, _: &mut Context<Self>) -> Self::Result {
        self.transition(State::Running)
    }
}

impl<D: Device> Handler<Counted<Drain>> for DeviceActor<D> {
    type Result = ResponseFuture<Result<DrainReport, DrainError>>;

    fn handle(&mut self, msg: Counted<Drain>, ctx: &mut Context<Self>) -> Self::Result {
        let msg = &msg.msg;
        let id = self.id.clone();
        let (tx, rx) = oneshot::channel();
        let token = self.next_drain_token;
        self.next_drain_token += 1;
        self.drain_waiters.push(DrainWaiter { token, tx });
        match self.gate.state() {
            State::Running => {
                // From here the gate refuses every new access; the drain
                // future resolves when the last admitted one is answered.
                self.drain_started = Some(Instant::now());
                self.pending_at_drain = self.pending.len() as u64;
                let drained = self.gate.drained();
                self.with_device(ctx, "drain_started", |d| d.drain_started());
                if !self.drain_spawned && self.has_device() {
                    self.drain_spawned = true;
                    ctx.spawn(drained.into_actor(self).map(|res, act, ctx| {
                        if res.is_ok() && act.has_device() {
                            act.finish_drain(ctx);
                        }
                    }));
                }
            }
            State::Created | State::Realized => {
                self.drain_started = Some(Instant::now());
                self.finish_drain(ctx);
            }
            State::Draining | State::Stopped => {}
        }
        if let Some(deadline) = msg.deadline {
            if !self.drain_waiters.is_empty() {
                ctx.run_later(deadline, move |act, _| act.expire_waiter(token));
            }
        }
        Box::pin(async move { rx.await.unwrap_or(Err(DrainError::Gone { id })) })
    }
}

impl<D: Device> Handler<QueryStatus> for DeviceActor<D> {
    type Result = MessageResult<QueryStatus>;

    fn handle(&mut self, _: QueryStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(DeviceStatus {
            id: self.id.clone(),
            kind: self.kind.to_string(),
            state: self.gate.state(),
            pending: self.pending.len() as u64,
            handled: self.shared.handled.load(Ordering::Relaxed),
            refused: self.refused + self.gate.refused(),
        })
    }
}

impl<D: Device> Handler<Counted<Deliver<D::Event>>> for DeviceActor<D> {
    type Result = Result<(), Refused>;

    fn handle(&mut self, msg: Counted<Deliver<D::Event>>, ctx: &mut Context<Self>) -> Self::Result {
        // Counted in the mailbox until the device has taken the event.
        let (event, _counted) = msg.take();
        match self.gate.state() {
            State::Running => self
                .with_device(ctx, "event", |d| d.event(event.0))
                .ok_or(Refused::Failed),
            State::Draining => Err(Refused::Draining),
            State::Stopped => Err(Refused::Gone),
            state @ (State::Created | State::Realized) => Err(Refused::NotRunning { state }),
        }
    }
}

/// A handle to a device actor, independent of the device's type. Cheap to
/// clone. Sending to a stopped device yields `Gone`, never a panic.
#[derive(Clone)]
pub struct DeviceRef {
    id: DeviceId,
    kind: &'static str,
    access: Sender<GuestAccess>,
    /// The device's direct entry (see [`crate::direct`]).
    direct: Arc<dyn DirectT>,
    /// Counts the drain requests in the mailbox, for the direct entry.
    mailbox: crate::direct::Mailbox,
    realize: Recipient<Realize>,
    start: Recipient<Start>,
    drain: Recipient<Counted<Drain>>,
    status: Recipient<QueryStatus>,
}

impl fmt::Debug for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceRef")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .finish()
    }
}

impl DeviceRef {
    /// The device id.
    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    /// The device kind.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The device's gate: its lifecycle state, in-flight count and drain.
    pub fn gate(&self) -> &Gate {
        self.access.gate()
    }

    /// The send path to this device's accesses.
    pub fn sender(&self) -> &Sender<GuestAccess> {
        &self.access
    }

    /// Sends one access.
    pub fn access(&self, from: &ActorId, access: GuestAccess) -> Reply<AccessReply> {
        self.access.send(from, access)
    }

    /// Runs one access on the calling thread if the device has nothing
    /// queued or in hand, through the same gate and journal as
    /// [`DeviceRef::access`] (see [`crate::direct`]). For plain threads (a
    /// vCPU): an answer the device defers blocks the caller until it comes.
    ///
    /// `via` names the actor that routed the access, for the journal;
    /// `still_routed` is asked once the access is admitted, and `false`
    /// undoes the admission ([`Here::Unrouted`]).
    pub fn access_here(
        &self,
        from: &ActorId,
        via: Option<Via<'_>>,
        access: GuestAccess,
        still_routed: &dyn Fn() -> bool,
    ) -> Here {
        self.direct.access(from, via, access, still_routed)
    }

    /// Realizes the device. Like every control request here, the message is
    /// sent when this is called; the returned future only waits for the answer.
    pub fn realize(&self) -> impl Future<Output = Result<(), LifecycleError>> + 'static {
        let req = self.realize.send(Realize);
        let id = self.id.clone();
        async move { req.await.unwrap_or(Err(LifecycleError::Gone { id })) }
    }

    /// Starts the device.
    pub fn start(&self) -> impl Future<Output = Result<(), LifecycleError>> + 'static {
        let req = self.start.send(Start);
        let id = self.id.clone();
        async move { req.await.unwrap_or(Err(LifecycleError::Gone { id })) }
    }

    /// Realizes then starts the device.
    pub async fn realize_and_start(&self) -> Result<(), LifecycleError> {
        self.realize().await?;
        self.start().await
    }

    /// Drains the device (see the module docs). Call only after the device is
    /// unreachable from every bus, or new accesses will be refused `Draining`.
    pub fn drain(
        &self,
        deadline: Option<Duration>,
    ) -> impl Future<Output = Result<DrainReport, DrainError>> + 'static {
        let req = self.drain.send(self.mailbox.count(Drain { deadline }));
        let id = self.id.clone();
        async move { req.await.unwrap_or(Err(DrainError::Gone { id })) }
    }

    /// The device's status, or `None` if it is gone.
    pub fn status(&self) -> impl Future<Output = Option<DeviceStatus>> + 'static {
        let req = self.status.send(QueryStatus);
        async move { req.await.ok() }
    }

    /// Whether the actor is still alive.
    pub fn connected(&self) -> bool {
        self.access.connected()
    }
}

/// What [`spawn_device`] returns: the untyped handle plus the typed input
/// channel for the device's events.
pub struct SpawnedDevice<E: Send + 'static> {
    /// The device handle.
    pub device: DeviceRef,
    /// Where the device's external inputs go.
    pub events: Events<E>,
}

impl<E: Send + 'static> fmt::Debug for SpawnedDevice<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpawnedDevice")
            .field("device", &self.device)
            .finish()
    }
}

/// Starts `device` as an actor (in state `Created`) on `arbiter`.
///
/// `supervisor` is told if the device fails.
pub fn spawn_device<D: Device>(
    runtime: &Runtime,
    id: DeviceId,
    device: D,
    arbiter: &actix::ArbiterHandle,
    supervisor: Option<Recipient<DeviceFailed>>,
) -> SpawnedDevice<D::Event> {
    let kind = device.kind();
    let actor_id = id.actor_id();
    let gate = Gate::new(id.as_str(), 1, 256);
    let shared = Arc::new(Shared::new(device));
    let mailbox = shared.mailbox.clone();
    let actor_for_arbiter = DeviceActor::new(
        id.clone(),
        kind,
        Arc::clone(&shared),
        gate.clone(),
        supervisor,
    );
    let addr = DeviceActor::start_in_arbiter(arbiter, move |_| actor_for_arbiter);
    let direct = Direct {
        to: actor_id.clone(),
        shared,
        gate: gate.clone(),
        runtime: runtime.clone(),
        adopt: addr.clone().recipient(),
        failed: addr.clone().recipient(),
    };
    SpawnedDevice {
        device: DeviceRef {
            access: runtime.sender_through(actor_id, addr.clone().recipient(), gate),
            direct: Arc::new(direct),
            mailbox: mailbox.clone(),
            realize: addr.clone().recipient(),
            start: addr.clone().recipient(),
            drain: addr.clone().recipient(),
            status: addr.clone().recipient(),
            id,
            kind,
        },
        events: Events {
            recipient: addr.recipient(),
            mailbox,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::journal::{JournalRecord, MemoryJournal};
    use crate::supervisor::{QueryFailures, Supervisor};

    /// Offset 0 answers at once, offset 0x10 answers when the test opens its
    /// gate, offset 0xdead panics, offset 0xbad0 panics in a deferred reply.
    struct Gated {
        gates: Arc<Mutex<Vec<oneshot::Sender<u64>>>>,
    }

    impl Device for Gated {
        type Event = u64;

        fn kind(&self) -> &'static str {
            "gated"
        }

        fn access(&mut self, access: &GuestAccess) -> Completion {
            match access.offset.0 {
                0x10 => {
                    let (tx, rx) = oneshot::channel();
                    self.gates.lock().expect("gates").push(tx);
                    Completion::Later(Box::pin(async move {
                        let value = rx.await.unwrap_or(0);
                        AccessReply::Read { value }
                    }))
                }
                0xdead => panic!("register 0xdead"),
                0xbad0 => Completion::Later(Box::pin(async { panic!("deferred 0xbad0") })),
                _ => Completion::Ready(AccessReply::Read { value: 7 }),
            }
        }

        fn event(&mut self, event: u64) {
            assert_ne!(event, 0, "event 0 is a bug");
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

    type Gates = Arc<Mutex<Vec<oneshot::Sender<u64>>>>;

    fn gated(rt: &Runtime, name: &str, sup: Option<Recipient<DeviceFailed>>) -> (DeviceRef, Gates) {
        let gates = Gates::default();
        let d = Gated {
            gates: Arc::clone(&gates),
        };
        let spawned = spawn_device(rt, DeviceId::new(name), d, &Arbiter::current(), sup);
        (spawned.device, gates)
    }

    fn open_gates(gates: &Gates, value: u64) {
        for tx in gates.lock().expect("gates").drain(..) {
            let _ = tx.send(value);
        }
    }

    fn me() -> ActorId {
        ActorId::new("test")
    }

    #[actix_rt::test]
    async fn test_accesses_refused_until_running() {
        let rt = Runtime::new();
        let (dev, _) = gated(&rt, "d", None);
        let r = dev.access(&me(), read(0)).await;
        assert_eq!(
            r,
            Err(Refused::NotRunning {
                state: State::Created
            })
        );
        dev.realize().await.expect("realize");
        let r = dev.access(&me(), read(0)).await;
        assert_eq!(
            r,
            Err(Refused::NotRunning {
                state: State::Realized
            })
        );
        let err = dev.realize().await.expect_err("realize twice");
        assert!(matches!(err, LifecycleError::Transition { .. }), "{err:?}");
        dev.start().await.expect("start");
        assert_eq!(
            dev.access(&me(), read(0)).await,
            Ok(AccessReply::Read { value: 7 })
        );
    }

    #[actix_rt::test]
    async fn test_drain_replies_only_after_accepted_accesses_are_answered() {
        let rt = Runtime::new();
        let (dev, gates) = gated(&rt, "d", None);
        dev.realize_and_start().await.expect("start");
        let slow_a = dev.access(&me(), read(0x10));
        let slow_b = dev.access(&me(), read(0x10));
        let mut drain = Box::pin(dev.drain(None));
        // The drain is queued behind the two accesses; once a later message
        // has been answered, all three have been handled.
        let status = dev.status().await.expect("status");
        assert_eq!(status.state, State::Draining);
        assert_eq!(status.pending, 2);
        assert_eq!(dev.sender().in_flight(), 2);
        assert!(
            futures::poll!(&mut drain).is_pending(),
            "drain replied early"
        );
        // A new access is refused without reaching the device.
        assert_eq!(dev.access(&me(), read(0)).await, Err(Refused::Draining));
        assert_eq!(gates.lock().expect("gates").len(), 2);

        open_gates(&gates, 5);
        assert_eq!(slow_a.await, Ok(AccessReply::Read { value: 5 }));
        assert_eq!(slow_b.await, Ok(AccessReply::Read { value: 5 }));
        let report = drain.await.expect("drain");
        assert_eq!(report.answered_during_drain, 2);
        assert_eq!(dev.sender().in_flight(), 0);
        // Stopped: sends fail with a typed error.
        assert_eq!(dev.access(&me(), read(0)).await, Err(Refused::Gone));
        assert!(dev.status().await.is_none());
        assert!(matches!(
            dev.drain(None).await,
            Err(DrainError::Gone { .. })
        ));
    }

    #[actix_rt::test]
    async fn test_concurrent_drains_all_get_the_reply() {
        let rt = Runtime::new();
        let (dev, gates) = gated(&rt, "d", None);
        dev.realize_and_start().await.expect("start");
        let slow = dev.access(&me(), read(0x10));
        let d1 = dev.drain(None);
        let d2 = dev.drain(None);
        let d3 = dev.drain(Some(Duration::from_secs(3600)));
        dev.status().await.expect("status");
        open_gates(&gates, 1);
        let (r1, r2, r3) = futures::join!(d1, d2, d3);
        for r in [r1, r2, r3] {
            assert_eq!(r.expect("drain").answered_during_drain, 1);
        }
        assert_eq!(slow.await, Ok(AccessReply::Read { value: 1 }));
    }

    #[actix_rt::test]
    async fn test_drain_deadline_reports_pending_and_does_not_claim_done() {
        let rt = Runtime::new();
        let (dev, gates) = gated(&rt, "d", None);
        dev.realize_and_start().await.expect("start");
        let fast = dev.access(&me(), read(0));
        let slow = dev.access(&me(), read(0x10));
        let err = dev
            .drain(Some(Duration::from_millis(20)))
            .await
            .expect_err("deadline must pass");
        let DrainError::Timeout { pending, .. } = err else {
            panic!("expected a timeout, got {err:?}");
        };
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].kind, "read");
        assert_eq!(pending[0].access.offset, RegionOffset(0x10));
        assert!(pending[0].age >= Duration::from_millis(20));
        assert_eq!(fast.await, Ok(AccessReply::Read { value: 7 }));
        // Still draining, not stopped.
        assert_eq!(dev.status().await.expect("alive").state, State::Draining);
        let again = dev.drain(None);
        open_gates(&gates, 9);
        assert_eq!(slow.await, Ok(AccessReply::Read { value: 9 }));
        again.await.expect("second drain completes");
        assert!(!dev.connected() || dev.status().await.is_none());
    }

    #[actix_rt::test]
    async fn test_drain_before_start_stops_at_once() {
        let rt = Runtime::new();
        let (dev, _) = gated(&rt, "d", None);
        let report = dev.drain(None).await.expect("drain");
        assert_eq!(report.answered_during_drain, 0);
        assert_eq!(dev.access(&me(), read(0)).await, Err(Refused::Gone));
    }

    #[actix_rt::test]
    async fn test_panic_fails_that_device_only() {
        let rt = Runtime::new();
        let sup = Supervisor::default().start();
        let (bad, _bad_gates) = gated(&rt, "bad", Some(sup.clone().recipient()));
        let (good, good_gates) = gated(&rt, "good", Some(sup.clone().recipient()));
        bad.realize_and_start().await.expect("start");
        good.realize_and_start().await.expect("start");
        let good_pending = good.access(&me(), read(0x10));
        let waiting = bad.access(&me(), read(0x10));
        let boom = bad.access(&me(), read(0xdead));
        assert_eq!(boom.await, Err(Refused::Failed));
        assert_eq!(
            waiting.await,
            Err(Refused::Failed),
            "pending accesses of a failed device get errors"
        );
        assert_eq!(
            bad.access(&me(), read(0)).await,
            Err(Refused::Failed),
            "a failed device's gate says so"
        );
        assert!(bad.status().await.is_none());
        // The other device on the same arbiter is untouched, pending work included.
        assert_eq!(
            good.access(&me(), read(0)).await,
            Ok(AccessReply::Read { value: 7 })
        );
        open_gates(&good_gates, 4);
        assert_eq!(good_pending.await, Ok(AccessReply::Read { value: 4 }));
        let failures = sup.send(QueryFailures).await.expect("supervisor");
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].id, DeviceId::new("bad"));
        assert!(
            failures[0].reason.contains("register 0xdead"),
            "{}",
            failures[0].reason
        );
    }

    #[actix_rt::test]
    async fn test_panic_in_deferred_reply_fails_device_and_drain() {
        let rt = Runtime::new();
        let sup = Supervisor::default().start();
        let (dev, _gates) = gated(&rt, "d", Some(sup.clone().recipient()));
        dev.realize_and_start().await.expect("start");
        let other = dev.access(&me(), read(0x10));
        let boom = dev.access(&me(), read(0xbad0));
        let drain = dev.drain(None);
        assert_eq!(boom.await, Err(Refused::Failed));
        assert_eq!(other.await, Err(Refused::Failed));
        assert!(matches!(drain.await, Err(DrainError::Failed { .. })));
        let failures = sup.send(QueryFailures).await.expect("supervisor");
        assert!(failures[0].reason.contains("deferred 0xbad0"));
    }

    #[actix_rt::test]
    async fn test_panic_in_event_fails_device() {
        let rt = Runtime::new();
        let gates = Gates::default();
        let spawned = spawn_device(
            &rt,
            DeviceId::new("e"),
            Gated { gates },
            &Arbiter::current(),
            None,
        );
        spawned.device.realize_and_start().await.expect("start");
        assert_eq!(
            spawned.events.send(Deliver(1)).await.expect("mailbox"),
            Ok(())
        );
        assert_eq!(
            spawned.events.send(Deliver(0)).await.expect("mailbox"),
            Err(Refused::Failed)
        );
        assert_eq!(
            spawned.device.access(&me(), read(0)).await,
            Err(Refused::Failed)
        );
    }

    #[actix_rt::test]
    async fn test_journal_sees_every_send_and_reply_in_order() {
        let journal = Arc::new(MemoryJournal::new());
        let rt = Runtime::with_journal(journal.clone());
        let (dev, gates) = gated(&rt, "j", None);
        dev.realize_and_start().await.expect("start");
        let slow = dev.access(&me(), read(0x10));
        assert_eq!(
            dev.access(&me(), read(0)).await,
            Ok(AccessReply::Read { value: 7 })
        );
        open_gates(&gates, 3);
        slow.await.expect("slow");
        let recs = journal.records();
        let seqs: Vec<(bool, u64)> = recs
            .iter()
            .map(|r| match r {
                JournalRecord::Sent { seq, .. } => (true, seq.0),
                JournalRecord::Replied { seq, .. } => (false, seq.0),
            })
            .collect();
        assert_eq!(seqs, vec![(true, 1), (true, 2), (false, 2), (false, 1)]);
        let JournalRecord::Sent {
            to, kind, payload, ..
        } = &recs[0]
        else {
            panic!("first record is a send");
        };
        assert_eq!(to.as_str(), "dev:j");
        assert_eq!(kind, "read");
        assert_eq!(payload["offset"], 16);
        let JournalRecord::Replied { reply, .. } = &recs[3] else {
            panic!("last record is a reply");
        };
        assert_eq!(reply["Ok"]["value"], 3);
    }
}
