// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The one admission gate and drain primitive, with the lifecycle state it
//! enforces.
//!
//! Every device has one [`Gate`]. Every message to the device (an MMIO
//! access, a virtqueue request, a config-space read, a control request) is
//! admitted through [`Gate::admit`], which hands back a [`Ticket`]; the
//! message counts as in flight until its ticket is dropped, which happens
//! exactly when it has been answered (or, if it is dropped unanswered, when
//! its drop guard has answered it with an error). Nothing else counts
//! messages, and nothing else drains.
//!
//! # Lanes
//!
//! A gate is split into lanes, one per independent stream of messages (one
//! per virtqueue, plus one for control and config messages), so that two
//! queue workers never write the same cache line, and so that GET_VRING_BASE
//! can wait for one queue alone ([`Gate::wait_idle`] with [`Lanes::One`]).
//! A lane is one atomic word, `CLOSED | WATCHED | count`, and a small table
//! of pending-message slots for drain reports.
//!
//! # Admission: a few atomic operations, no lock
//!
//! [`Gate::admit`] adds one to the lane word; if the `CLOSED` bit was set it
//! undoes that and refuses with a [`Refused`] that names the state. Then it
//! claims a free slot for the message (a compare-and-swap, retried on a
//! handful of neighbours) and stores the admission time. Dropping the ticket
//! frees the slot and subtracts one. Only when the count reaches zero with the
//! `WATCHED` bit set (someone waits) does it take the waiters' lock.
//!
//! # The drain path, field by field
//!
//! - `state` (one atomic byte) is the device's lifecycle [`State`]. Every
//!   lane is `CLOSED` in every state but `Running`, so admission refuses
//!   with `NotRunning`, `Draining`, `Gone` or `Failed` without a lock.
//! - [`Gate::drain`] moves `Running -> Draining` (closing every lane in the
//!   same step: from then on nothing new is admitted), notes the time and
//!   the count in flight, and waits until every lane is at zero. The caller
//!   that sees zero first moves `Draining -> Stopped`; every concurrent
//!   drain waits for the same moment and gets the same [`DrainReport`].
//! - `waiters` (a mutex and a condvar) is where drains and [`Gate::wait_idle`]
//!   sleep; the last ticket of a watched lane takes the mutex and wakes them.
//!   A waiter sets `WATCHED` while holding the mutex and only then reads the
//!   count, so a wake-up cannot be lost.
//! - A drain with a deadline that passes returns [`DrainError::Timeout`] with
//!   every message still pending (seq, kind, age); it never claims to be done
//!   and the drain goes on: the gate stays `Draining` and a later drain waits
//!   again.
//! - [`Gate::fail`] moves any state to `Stopped` with a reason (a contained
//!   panic). Waiting drains return [`DrainError::Failed`]; tickets still held
//!   are answered by their owners' drop guards, and the count still reaches
//!   zero, so [`Gate::wait_idle`] returns.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ids::Seq;
use crate::lifecycle::{InvalidTransition, State};
use crate::send::Refused;

/// Set while the lane admits nothing.
const CLOSED: u64 = 1 << 63;
/// Set while somebody waits for the lane to reach zero.
const WATCHED: u64 = 1 << 62;
const COUNT: u64 = WATCHED - 1;

/// How many neighbouring slots an admission tries before it leaves a
/// message untracked (still counted, just not listed in drain reports).
const PROBES: usize = 8;

/// What a message is, as the gate lists it in drain reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum MessageKind {
    /// A virtqueue request.
    Request = 1,
    /// A config-space read (vhost-user GET_CONFIG).
    GetConfig,
    /// A config-space write (vhost-user SET_CONFIG).
    SetConfig,
    /// A control request (vhost-user RESET_DEVICE).
    Control,
}

impl MessageKind {
    const ALL: [MessageKind; 4] = [
        MessageKind::Request,
        MessageKind::GetConfig,
        MessageKind::SetConfig,
        MessageKind::Control,
    ];

    /// The name used in logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Request => "request",
            MessageKind::GetConfig => "get-config",
            MessageKind::SetConfig => "set-config",
            MessageKind::Control => "control",
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u8 == code)
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One message admitted and not yet answered, as a drain report lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Its sequence number.
    pub seq: Seq,
    /// The lane it was admitted on (a queue index, or the control lane).
    pub lane: usize,
    /// What it is.
    pub kind: MessageKind,
    /// Time since it was admitted.
    pub age: Duration,
}

/// A completed drain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// Messages in flight when the drain began (all answered since).
    pub answered_during_drain: u64,
    /// Time from the start of the drain to the last answer.
    pub waited: Duration,
}

/// A drain (or an idle wait) that has not completed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum DrainError {
    /// The deadline passed with messages still in flight. The drain goes on.
    #[error("{name}: not drained after {waited:?}, {in_flight} in flight")]
    Timeout {
        /// The gate's owner.
        name: String,
        /// Time waited.
        waited: Duration,
        /// Messages still in flight, listed or not.
        in_flight: u64,
        /// The in-flight messages the gate could list, oldest first.
        pending: Vec<Pending>,
    },
    /// The device failed (a contained panic) and is stopped.
    #[error("{name} failed: {reason}")]
    Failed {
        /// The gate's owner.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Which lanes a wait covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lanes {
    /// Every lane.
    All,
    /// One lane.
    One(usize),
}

#[derive(Default)]
struct Slot {
    /// `seq << 8 | kind`, or 0 when free.
    tag: AtomicU64,
    /// Admission time, in nanoseconds since the gate's epoch.
    since: AtomicU64,
}

/// One lane, on a cache line of its own.
#[repr(align(64))]
struct Lane {
    /// `CLOSED | WATCHED | count`.
    word: AtomicU64,
    slots: Box<[Slot]>,
}

#[derive(Default)]
struct Waiters {
    /// Blocking waiters currently inside [`Gate::wait_idle`] or a drain.
    sleeping: usize,
    /// Async waiters to wake, taken on every notification.
    wakers: Vec<Waker>,
    /// When the drain began, and how many were in flight then.
    drain: Option<(Instant, u64)>,
    /// The report of the drain that completed.
    report: Option<DrainReport>,
    /// Why the device failed.
    failure: Option<String>,
}

struct Inner {
    name: Arc<str>,
    state: AtomicU8,
    lanes: Box<[Lane]>,
    epoch: Instant,
    refused: AtomicU64,
    /// Messages in flight when the lanes were last closed.
    at_close: AtomicU64,
    waiters: Mutex<Waiters>,
    cond: Condvar,
    /// Called once, with the reason, when the device fails.
    on_fail: Mutex<Vec<FailHook>>,
}

type FailHook = Box<dyn Fn(&str) + Send + Sync>;

/// The admission gate, drain primitive and lifecycle state of one device.
/// Cheap to clone; every clone is the same gate.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("name", &self.inner.name)
            .field("state", &self.state())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

fn state_code(s: State) -> u8 {
    match s {
        State::Created => 0,
        State::Realized => 1,
        State::Running => 2,
        State::Draining => 3,
        State::Stopped => 4,
    }
}

fn state_of(code: u8) -> State {
    match code {
        0 => State::Created,
        1 => State::Realized,
        2 => State::Running,
        3 => State::Draining,
        _ => State::Stopped,
    }
}

impl Gate {
    /// A gate in state `Created` for `name`, with `lanes` lanes (at least
    /// one) of `slots` pending-message slots each (rounded up to a power of
    /// two; messages beyond that are counted but not listed).
    pub fn new(name: impl AsRef<str>, lanes: usize, slots: usize) -> Self {
        let slots = slots.max(1).next_power_of_two();
        let lanes = (0..lanes.max(1))
            .map(|_| Lane {
                word: AtomicU64::new(CLOSED),
                slots: (0..slots).map(|_| Slot::default()).collect(),
            })
            .collect();
        Gate {
            inner: Arc::new(Inner {
                name: Arc::from(name.as_ref()),
                state: AtomicU8::new(state_code(State::Created)),
                lanes,
                epoch: Instant::now(),
                refused: AtomicU64::new(0),
                at_close: AtomicU64::new(0),
                waiters: Mutex::default(),
                cond: Condvar::new(),
                on_fail: Mutex::default(),
            }),
        }
    }

    /// A gate already `Running`: for actors that have no lifecycle of their
    /// own (a bus).
    pub fn running(name: impl AsRef<str>, lanes: usize, slots: usize) -> Self {
        let gate = Gate::new(name, lanes, slots);
        for to in [State::Realized, State::Running] {
            gate.transition(to)
                .expect("a new gate goes Created -> Realized -> Running");
        }
        gate
    }

    /// Whose gate this is.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The number of lanes.
    pub fn lanes(&self) -> usize {
        self.inner.lanes.len()
    }

    /// The lifecycle state.
    pub fn state(&self) -> State {
        state_of(self.inner.state.load(Ordering::Acquire))
    }

    /// Why the device failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    /// Messages refused since the gate was made.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Whether `other` is this same gate.
    pub fn same(&self, other: &Gate) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Messages in flight on every lane.
    pub fn in_flight(&self) -> u64 {
        self.inner
            .lanes
            .iter()
            .map(|l| l.word.load(Ordering::Acquire) & COUNT)
            .sum()
    }

    /// Messages in flight on `lane`.
    pub fn in_flight_on(&self, lane: usize) -> u64 {
        self.inner
            .lanes
            .get(lane)
            .map_or(0, |l| l.word.load(Ordering::Acquire) & COUNT)
    }

    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // Every update under this lock is a single assignment or push; a
        // panic while holding it cannot leave it inconsistent.
        self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves to `to` if the lifecycle allows it. Entering `Running` opens
    /// every lane; entering `Draining` or `Stopped` closes them.
    pub fn transition(&self, to: State) -> Result<(), InvalidTransition> {
        let mut cur = self.inner.state.load(Ordering::Acquire);
        let closing = to != State::Running;
        loop {
            let from = state_of(cur);
            if !from.can_become(to) {
                return Err(InvalidTransition { from, to });
            }
            if closing {
                // Closed before the state says so: whoever sees the new
                // state also finds the lanes closed. The counts at the
                // moment of closing are what a drain has to wait for.
                let mut at_close = 0;
                for lane in self.inner.lanes.iter() {
                    at_close += lane.word.fetch_or(CLOSED, Ordering::AcqRel) & COUNT;
                }
                self.inner.at_close.store(at_close, Ordering::Release);
            }
            match self.inner.state.compare_exchange(
                cur,
                state_code(to),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        if !closing {
            for lane in self.inner.lanes.iter() {
                lane.word.fetch_and(!CLOSED, Ordering::AcqRel);
            }
        }
        self.notify();
        Ok(())
    }

    /// Stops the device for `reason` (a contained panic), from any state.
    /// Returns false if it had already failed or stopped.
    pub fn fail(&self, reason: impl Into<String>) -> bool {
        let stopped = state_code(State::Stopped);
        let prev = self.inner.state.swap(stopped, Ordering::AcqRel);
        for lane in self.inner.lanes.iter() {
            lane.word.fetch_or(CLOSED, Ordering::AcqRel);
        }
        if prev == stopped {
            return false;
        }
        let reason = reason.into();
        self.lock().failure = Some(reason.clone());
        self.notify();
        let hooks =
            std::mem::take(&mut *self.inner.on_fail.lock().unwrap_or_else(|e| e.into_inner()));
        for hook in hooks {
            hook(&reason);
        }
        true
    }

    /// Calls `hook` with the reason when the device fails (once, on the
    /// thread that caught the failure): the owner disconnects the frontend
    /// and tells the supervisor there.
    pub fn on_fail(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        self.inner
            .on_fail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(hook));
    }

    /// The refusal for a message arriving in the current state.
    pub fn refusal(&self) -> Refused {
        match self.state() {
            State::Running | State::Draining => Refused::Draining,
            State::Stopped if self.lock().failure.is_some() => Refused::Failed,
            State::Stopped => Refused::Gone,
            state @ (State::Created | State::Realized) => Refused::NotRunning { state },
        }
    }

    /// Admits message `seq` of kind `kind` on `lane`, or refuses it because
    /// the device is not running. An out-of-range lane is the last lane.
    pub fn admit(&self, lane: usize, seq: Seq, kind: MessageKind) -> Result<Ticket, Refused> {
        let lane = lane.min(self.inner.lanes.len() - 1);
        self.enter(lane)?;
        let l = &self.inner.lanes[lane];
        let tag = (seq.0 << 8) | u64::from(kind as u8);
        let mask = l.slots.len() - 1;
        let start = seq.0 as usize;
        let mut slot = u32::MAX;
        for i in 0..PROBES.min(l.slots.len()) {
            let idx = (start + i) & mask;
            let s = &l.slots[idx];
            if s.tag
                .compare_exchange(0, tag, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                let nanos = self.inner.epoch.elapsed().as_nanos() as u64;
                s.since.store(nanos, Ordering::Release);
                slot = idx as u32;
                break;
            }
        }
        Ok(Ticket {
            gate: self.clone(),
            lane: lane as u32,
            slot,
            seq,
        })
    }

    /// Admits on `lane` without listing it in drain reports (and without a
    /// sequence number): for a holder that is not a message, such as a
    /// guest-memory lease, counted so that a drain waits for it.
    pub fn admit_untracked(&self, lane: usize) -> Result<Ticket, Refused> {
        let lane = lane.min(self.inner.lanes.len() - 1);
        self.enter(lane)?;
        Ok(Ticket {
            gate: self.clone(),
            lane: lane as u32,
            slot: u32::MAX,
            seq: Seq(0),
        })
    }

    /// Admits on `lane`, untracked as [`Gate::admit_untracked`] does, only if
    /// nothing else is in flight on it: one compare-and-swap from an open,
    /// empty lane to a count of one. `Ok(None)` means the lane is busy (a
    /// message is queued, being handled or answered later) and nothing was
    /// counted; a closed lane refuses as [`Gate::enter`] does.
    ///
    /// This is how a caller that runs a message on its own thread (see
    /// [`crate::direct`]) knows that it overtakes nothing admitted before it.
    pub fn admit_if_idle(&self, lane: usize) -> Result<Option<Ticket>, Refused> {
        let lane = lane.min(self.inner.lanes.len() - 1);
        let l = &self.inner.lanes[lane];
        let mut word = l.word.load(Ordering::Acquire);
        loop {
            if word & CLOSED != 0 {
                self.inner.refused.fetch_add(1, Ordering::Relaxed);
                return Err(self.refusal());
            }
            if word & COUNT != 0 {
                return Ok(None);
            }
            match l
                .word
                .compare_exchange_weak(word, word + 1, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) => {
                    return Ok(Some(Ticket {
                        gate: self.clone(),
                        lane: lane as u32,
                        slot: u32::MAX,
                        seq: Seq(0),
                    }))
                }
                Err(now) => word = now,
            }
        }
    }

    /// Counts one holder in on `lane`, as [`Gate::admit_untracked`] does,
    /// without a ticket: for a holder that keeps the gate alive itself (a
    /// guest-memory lease holds its region, which owns the gate) and so
    /// needs no reference of its own. Every `Ok` must be paired with exactly
    /// one [`Gate::leave`] on the same lane; a missing one holds every drain
    /// of this gate for ever, an extra one miscounts.
    pub fn enter(&self, lane: usize) -> Result<(), Refused> {
        let lane = lane.min(self.inner.lanes.len() - 1);
        let l = &self.inner.lanes[lane];
        // A closed lane refuses without touching the count, so a drain's
        // snapshot of the count is not inflated by refusals.
        if l.word.load(Ordering::Acquire) & CLOSED != 0 {
            self.inner.refused.fetch_add(1, Ordering::Relaxed);
            return Err(self.refusal());
        }
        if l.word.fetch_add(1, Ordering::Acquire) & CLOSED != 0 {
            self.release(lane);
            self.inner.refused.fetch_add(1, Ordering::Relaxed);
            return Err(self.refusal());
        }
        Ok(())
    }

    /// Counts out a holder [`Gate::enter`] counted in.
    pub fn leave(&self, lane: usize) {
        self.release(lane.min(self.inner.lanes.len() - 1));
    }

    fn release(&self, lane: usize) {
        let prev = self.inner.lanes[lane].word.fetch_sub(1, Ordering::AcqRel);
        if prev & WATCHED != 0 && prev & COUNT == 1 {
            self.notify();
        }
    }

    fn notify(&self) {
        let wakers = {
            let mut w = self.lock();
            self.inner.cond.notify_all();
            std::mem::take(&mut w.wakers)
        };
        for w in wakers {
            w.wake();
        }
    }

    fn selected(&self, lanes: Lanes) -> &[Lane] {
        match lanes {
            Lanes::All => &self.inner.lanes,
            Lanes::One(i) => {
                let i = i.min(self.inner.lanes.len() - 1);
                &self.inner.lanes[i..=i]
            }
        }
    }

    fn idle(&self, lanes: Lanes) -> bool {
        self.selected(lanes)
            .iter()
            .all(|l| l.word.load(Ordering::Acquire) & COUNT == 0)
    }

    fn watch(&self, lanes: Lanes) {
        for l in self.selected(lanes) {
            l.word.fetch_or(WATCHED, Ordering::AcqRel);
        }
    }

    /// Every message still in flight that the gate could list, oldest first.
    pub fn pending(&self) -> Vec<Pending> {
        let now = self.inner.epoch.elapsed().as_nanos() as u64;
        let mut out = Vec::new();
        for (lane, l) in self.inner.lanes.iter().enumerate() {
            for s in l.slots.iter() {
                let tag = s.tag.load(Ordering::Acquire);
                if tag == 0 {
                    continue;
                }
                let since = s.since.load(Ordering::Acquire);
                if s.tag.load(Ordering::Acquire) != tag {
                    continue;
                }
                let Some(kind) = MessageKind::from_code(tag as u8) else {
                    continue;
                };
                out.push(Pending {
                    seq: Seq(tag >> 8),
                    lane,
                    kind,
                    age: Duration::from_nanos(now.saturating_sub(since)),
                });
            }
        }
        out.sort_by_key(|p| p.seq);
        out
    }

    fn timeout(&self, lanes: Lanes, waited: Duration) -> DrainError {
        let pending = self
            .pending()
            .into_iter()
            .filter(|p| matches!(lanes, Lanes::All) || Lanes::One(p.lane) == lanes)
            .collect();
        let in_flight = self
            .selected(lanes)
            .iter()
            .map(|l| l.word.load(Ordering::Acquire) & COUNT)
            .sum();
        DrainError::Timeout {
            name: self.inner.name.to_string(),
            waited,
            in_flight,
            pending,
        }
    }

    /// Blocks until `lanes` have nothing in flight, without closing them
    /// (GET_VRING_BASE, RESET_DEVICE and a disconnect quiesce a queue this
    /// way; the device keeps running). With a deadline that passes first,
    /// reports what is still pending. Without one, waits as long as it takes,
    /// logging every 5 s.
    pub fn wait_idle(&self, lanes: Lanes, deadline: Option<Duration>) -> Result<(), DrainError> {
        let start = Instant::now();
        let mut w = self.lock();
        w.sleeping += 1;
        self.watch(lanes);
        let mut next_log = Duration::from_secs(5);
        let result = loop {
            if self.idle(lanes) {
                break Ok(());
            }
            let waited = start.elapsed();
            let slice = match deadline {
                Some(d) if waited >= d => break Err(self.timeout(lanes, waited)),
                Some(d) => (d - waited).min(Duration::from_secs(1)),
                None => Duration::from_secs(1),
            };
            if deadline.is_none() && waited >= next_log {
                next_log += Duration::from_secs(5);
                tracing::warn!(gate = %self.inner.name, in_flight = self.in_flight(), "still waiting for messages in flight");
            }
            w = self
                .inner
                .cond
                .wait_timeout(w, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        w.sleeping -= 1;
        if w.sleeping == 0 && w.drain.is_none() {
            for l in self.inner.lanes.iter() {
                l.word.fetch_and(!WATCHED, Ordering::AcqRel);
            }
        }
        result
    }

    /// Starts a drain if none has started: `Running -> Draining` (closing
    /// every lane), or `Created`/`Realized -> Stopped` (nothing can be in
    /// flight). Returns the state the gate was in.
    pub fn begin_drain(&self) -> State {
        let before = self.state();
        match before {
            State::Running => {
                if self.transition(State::Draining).is_ok() {
                    let mut w = self.lock();
                    w.drain = Some((Instant::now(), self.inner.at_close.load(Ordering::Acquire)));
                    drop(w);
                    self.watch(Lanes::All);
                }
            }
            State::Created | State::Realized => {
                let _ = self.transition(State::Stopped);
                let mut w = self.lock();
                if w.report.is_none() {
                    w.report = Some(DrainReport {
                        answered_during_drain: 0,
                        waited: Duration::ZERO,
                    });
                }
            }
            State::Draining | State::Stopped => {}
        }
        before
    }

    /// If a drain is under way and nothing is in flight, completes it:
    /// `Draining -> Stopped`, and the report every drain gets.
    fn settle(&self) -> Option<Result<DrainReport, DrainError>> {
        if let Some(reason) = self.lock().failure.clone() {
            return Some(Err(DrainError::Failed {
                name: self.inner.name.to_string(),
                reason,
            }));
        }
        match self.state() {
            State::Draining if self.idle(Lanes::All) => {
                let mut w = self.lock();
                if w.report.is_none() {
                    let (start, n) = w.drain.unwrap_or((Instant::now(), 0));
                    w.report = Some(DrainReport {
                        answered_during_drain: n,
                        waited: start.elapsed(),
                    });
                }
                drop(w);
                let _ = self.transition(State::Stopped);
                self.lock().report.clone().map(Ok)
            }
            State::Stopped => Some(Ok(self.lock().report.clone().unwrap_or(DrainReport {
                answered_during_drain: 0,
                waited: Duration::ZERO,
            }))),
            _ => None,
        }
    }

    /// Drains the device: refuses new messages from now on, waits until
    /// every message admitted earlier has been answered, and stops. Every
    /// concurrent drain waits for the same moment and gets the same report.
    /// A deadline that passes first reports what is still pending; the
    /// drain goes on.
    pub fn drain(&self, deadline: Option<Duration>) -> Result<DrainReport, DrainError> {
        self.begin_drain();
        let start = Instant::now();
        loop {
            if let Some(r) = self.settle() {
                return r;
            }
            let left = match deadline {
                Some(d) => match d.checked_sub(start.elapsed()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Err(self.timeout(Lanes::All, start.elapsed())),
                },
                None => None,
            };
            // The idle wait ends at zero, or reports a timeout we re-check.
            match self.wait_idle(Lanes::All, left) {
                Ok(()) => {}
                Err(_) if self.state() == State::Stopped => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The drain as a future, for an actor that must not block its thread:
    /// resolves when [`Gate::drain`] would return without a deadline.
    pub fn drained(&self) -> Drained {
        self.begin_drain();
        Drained { gate: self.clone() }
    }
}

/// See [`Gate::drained`].
#[must_use = "a drain future does nothing unless polled"]
pub struct Drained {
    gate: Gate,
}

impl fmt::Debug for Drained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drained").field("gate", &self.gate).finish()
    }
}

impl Future for Drained {
    type Output = Result<DrainReport, DrainError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let gate = &self.gate;
        if let Some(r) = gate.settle() {
            return Poll::Ready(r);
        }
        {
            let mut w = gate.lock();
            w.wakers.push(cx.waker().clone());
        }
        gate.watch(Lanes::All);
        // Re-check after registering: the last ticket may have gone between
        // the first check and the registration.
        match gate.settle() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }
}

/// A panic's message, for a failure reason.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// One admitted message. Dropping it answers for the message on the gate:
/// the count goes down and its slot is freed. Hold it until the message has
/// been answered (the used entry written, the reply sent).
pub struct Ticket {
    gate: Gate,
    lane: u32,
    /// Index of its pending slot, or `u32::MAX` if untracked.
    slot: u32,
    seq: Seq,
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("gate", &self.gate.inner.name)
            .field("lane", &self.lane)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Ticket {
    /// The message's sequence number.
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// The lane it was admitted on.
    pub fn lane(&self) -> usize {
        self.lane as usize
    }

    /// The gate it was admitted by.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let lane = self.lane as usize;
        if let Some(s) = self.gate.inner.lanes[lane].slots.get(self.slot as usize) {
            s.tag.store(0, Ordering::Release);
        }
        self.gate.release(lane);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(lanes: usize) -> Gate {
        Gate::running("dev", lanes, 16)
    }

    #[test]
    fn test_admission_refused_until_running_with_the_state_named() {
        let g = Gate::new("dev", 1, 4);
        assert_eq!(
            g.admit(0, Seq(1), MessageKind::Request)
                .expect_err("created"),
            Refused::NotRunning {
                state: State::Created
            }
        );
        g.transition(State::Realized).expect("realize");
        g.transition(State::Running).expect("start");
        let t = g.admit(0, Seq(2), MessageKind::Request).expect("running");
        assert_eq!(g.in_flight(), 1);
        drop(t);
        assert_eq!(g.in_flight(), 0);
        assert_eq!(g.refused(), 1);
    }

    #[test]
    fn test_admit_if_idle_admits_only_an_empty_open_lane() {
        let g = Gate::new("dev", 1, 16);
        assert_eq!(
            g.admit_if_idle(0).expect_err("created"),
            Refused::NotRunning {
                state: State::Created
            }
        );
        g.transition(State::Realized).expect("realize");
        g.transition(State::Running).expect("start");
        let first = g.admit_if_idle(0).expect("running").expect("idle");
        assert_eq!(g.in_flight(), 1);
        assert!(
            g.admit_if_idle(0).expect("running").is_none(),
            "busy: one in flight"
        );
        assert_eq!(g.in_flight(), 1, "a busy lane counts nothing in");
        drop(first);
        let queued = g.admit_untracked(0).expect("running");
        assert!(g.admit_if_idle(0).expect("running").is_none());
        drop(queued);
        let last = g.admit_if_idle(0).expect("running").expect("idle again");
        let g2 = g.clone();
        let drainer = std::thread::spawn(move || g2.drain(None));
        while g.state() != State::Draining {
            std::thread::yield_now();
        }
        assert_eq!(g.admit_if_idle(0).expect_err("draining"), Refused::Draining);
        drop(last);
        drainer.join().expect("thread").expect("drained");
        assert_eq!(g.admit_if_idle(0).expect_err("stopped"), Refused::Gone);
    }

    #[test]
    fn test_drain_waits_for_the_last_ticket_and_refuses_new_ones() {
        let g = running(2);
        let t1 = g.admit(0, Seq(1), MessageKind::Request).expect("admit");
        let t2 = g.admit(1, Seq(2), MessageKind::Request).expect("admit");
        let g2 = g.clone();
        let drainer = std::thread::spawn(move || g2.drain(None));
        while g.state() != State::Draining {
            std::thread::yield_now();
        }
        assert_eq!(
            g.admit(0, Seq(3), MessageKind::Request)
                .expect_err("draining"),
            Refused::Draining
        );
        drop(t1);
        assert!(!drainer.is_finished() || g.in_flight() == 0);
        drop(t2);
        let report = drainer.join().expect("thread").expect("drained");
        assert_eq!(report.answered_during_drain, 2);
        assert_eq!(g.state(), State::Stopped);
        assert_eq!(
            g.admit(0, Seq(4), MessageKind::Request)
                .expect_err("stopped"),
            Refused::Gone
        );
    }

    #[test]
    fn test_drain_deadline_reports_what_is_pending_and_never_claims_done() {
        let g = running(2);
        let _t = g.admit(1, Seq(7), MessageKind::GetConfig).expect("admit");
        let err = g
            .drain(Some(Duration::from_millis(20)))
            .expect_err("still in flight");
        let DrainError::Timeout {
            in_flight, pending, ..
        } = err
        else {
            panic!("not a timeout: {err:?}");
        };
        assert_eq!(in_flight, 1);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].seq, Seq(7));
        assert_eq!(pending[0].lane, 1);
        assert_eq!(pending[0].kind, MessageKind::GetConfig);
        assert!(pending[0].age >= Duration::from_millis(20));
        assert_eq!(g.state(), State::Draining, "the drain goes on");
    }

    #[test]
    fn test_concurrent_drains_share_one_report() {
        let g = running(1);
        let t = g.admit(0, Seq(1), MessageKind::Control).expect("admit");
        let drains: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || g.drain(None))
            })
            .collect();
        while g.state() != State::Draining {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(5));
        drop(t);
        let reports: Vec<_> = drains
            .into_iter()
            .map(|d| d.join().expect("thread").expect("drained"))
            .collect();
        assert!(reports.windows(2).all(|w| w[0] == w[1]), "{reports:?}");
    }

    #[test]
    fn test_wait_idle_on_one_lane_ignores_the_others_and_keeps_running() {
        let g = running(2);
        let busy = g.admit(1, Seq(1), MessageKind::Request).expect("admit");
        let t0 = g.admit(0, Seq(2), MessageKind::Request).expect("admit");
        let g2 = g.clone();
        let waiter = std::thread::spawn(move || g2.wait_idle(Lanes::One(0), None));
        drop(t0);
        waiter.join().expect("thread").expect("lane 0 idle");
        assert_eq!(g.state(), State::Running);
        assert!(g.admit(0, Seq(3), MessageKind::Request).is_ok());
        match g.wait_idle(Lanes::One(1), Some(Duration::from_millis(5))) {
            Err(DrainError::Timeout {
                in_flight, pending, ..
            }) => {
                assert_eq!(in_flight, 1);
                assert_eq!(pending.iter().map(|p| p.seq).collect::<Vec<_>>(), [Seq(1)]);
            }
            other => panic!("lane 1 is busy: {other:?}"),
        }
        drop(busy);
    }

    #[test]
    fn test_fail_stops_refuses_with_failed_and_idle_waits_still_end() {
        let g = running(1);
        let t = g.admit(0, Seq(1), MessageKind::Request).expect("admit");
        assert!(g.fail("queue worker: boom"));
        assert!(!g.fail("again"), "a second failure is not news");
        assert_eq!(g.state(), State::Stopped);
        assert_eq!(g.failure().as_deref(), Some("queue worker: boom"));
        assert_eq!(
            g.admit(0, Seq(2), MessageKind::Request)
                .expect_err("failed"),
            Refused::Failed
        );
        assert!(matches!(g.drain(None), Err(DrainError::Failed { .. })));
        drop(t);
        g.wait_idle(Lanes::All, Some(Duration::from_secs(1)))
            .expect("the dropped ticket brought the count to zero");
    }

    #[test]
    fn test_drained_future_resolves_when_the_last_ticket_goes() {
        let g = running(1);
        let t = g.admit(0, Seq(1), MessageKind::Request).expect("admit");
        let mut fut = Box::pin(g.drained());
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        drop(t);
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(r)) => assert_eq!(r.answered_during_drain, 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_more_messages_than_slots_are_counted_but_not_listed() {
        let g = Gate::running("dev", 1, 2);
        let tickets: Vec<_> = (1..=5)
            .map(|i| g.admit(0, Seq(i), MessageKind::Request).expect("admit"))
            .collect();
        assert_eq!(g.in_flight(), 5);
        assert_eq!(g.pending().len(), 2);
        drop(tickets);
        assert_eq!(g.in_flight(), 0);
        assert!(g.pending().is_empty());
    }
}
