// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A proptest model of the device actor's lifecycle and drain state machine.
//!
//! The model is a few lines of plain state: the lifecycle [`State`], the set
//! of accepted deferred accesses (by sequence number), the set of drain
//! requests not yet answered (each with the virtual time its deadline
//! expires, if any), a virtual clock, and whether the device failed. Random
//! sequences of operations (realize, start, fast/slow/panicking accesses,
//! opening a slow access's gate normally or with a panic, drains with and
//! without a deadline, advancing the clock, status queries) are run both
//! against the model and against a real `DeviceActor` hosting a test
//! device, and after every operation the two must agree on:
//!
//! - the answer to every access (`Ok`, `NotRunning`, `Draining`, `Gone`,
//!   `Failed`) and to every `Realize`/`Start`;
//! - the answer to every drain: success exactly when the last pending access
//!   is answered (all concurrent drains at once, never early), `Timeout`
//!   listing exactly the pending sequence numbers when its deadline passes
//!   first, `Failed` after a panic (also for every later access), `Gone` once
//!   the actor has drained and stopped;
//! - which answers are still outstanding, and the in-flight count of the
//!   send path;
//! - `status()` (state, pending, handled, refused), or `None` once stopped;
//! - how often the device's hooks ran and that it is dropped exactly once.
//!
//! Together these check the promises of `runtime/DESIGN.md` ("Lifecycle and
//! drain", "Failure containment") and of the send path (every access answered
//! exactly once) on every interleaving the generator reaches.
//!
//! At the end every gate is opened, the device is drained, and every access
//! must have been answered exactly once: by the caller's `Reply`, by the
//! in-flight counter, and by the journal, which must record the same answers.
//!
//! The tokio clock is paused, so deadlines fire only when the test advances
//! it. Deadlines are an odd number of milliseconds and clock steps an even
//! number, so a deadline never falls on a step and the timer wheel's 1 ms
//! rounding cannot decide an outcome.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix::{Actor, Addr, Arbiter, System};
use futures::channel::oneshot;
use futures::FutureExt;
use proptest::prelude::*;
use proptest::sample::Index;
use switchboard_runtime::{
    spawn_device, AccessOp, AccessReply, AccessSize, ActorId, Answer, Completion, Device, DeviceId,
    DeviceRef, DeviceStatus, DrainError, DrainReport, GuestAccess, InvalidTransition,
    JournalRecord, LifecycleError, MemoryJournal, QueryFailures, Refused, RegionOffset, Reply,
    Runtime, State, Supervisor,
};

/// Offset answered at once.
const FAST: u64 = 0x0;
/// Offset answered when the test opens the access's gate.
const SLOW: u64 = 0x10;
/// Offset whose access panics in `Device::access`.
const PANIC: u64 = 0xdead;
/// What a fast read returns.
const FAST_VALUE: u64 = 7;
/// Device id and kind of the device under test.
const NAME: &str = "m";
const KIND: &str = "model";
/// Virtual time allowed for an answer the model says is due. The clock only
/// moves on its own when every task is idle, so this fires only if the
/// answer is never sent.
const GUARD: Duration = Duration::from_secs(3600);

/// How the test opens a slow access's gate.
#[derive(Debug)]
enum GateCmd {
    /// Complete the access with this value.
    Answer(u64),
    /// Panic in the deferred completion.
    Panic,
}

/// What the device shares with the test.
#[derive(Debug, Default)]
struct Probe {
    /// Gates of slow accesses, in the order the device accepted them; the
    /// test takes them after each step. The device keeps each receiver in its
    /// deferred completion; sending on it completes (or panics) the access.
    gates: Vec<oneshot::Sender<GateCmd>>,
    realize_calls: u32,
    access_calls: u64,
    drain_started_calls: u32,
    stopped_calls: u32,
    drops: u32,
}

type SharedProbe = Arc<Mutex<Probe>>;

fn lock(probe: &SharedProbe) -> MutexGuard<'_, Probe> {
    // The device never panics while holding the lock.
    probe.lock().expect("probe lock is never poisoned")
}

struct GatedDevice {
    probe: SharedProbe,
}

impl Device for GatedDevice {
    type Event = ();

    fn kind(&self) -> &'static str {
        KIND
    }

    fn realize(&mut self) -> Result<(), String> {
        lock(&self.probe).realize_calls += 1;
        Ok(())
    }

    fn access(&mut self, access: &GuestAccess) -> Completion {
        let mut probe = lock(&self.probe);
        probe.access_calls += 1;
        match access.offset.0 {
            SLOW => {
                let (tx, rx) = oneshot::channel();
                probe.gates.push(tx);
                Completion::Later(Box::pin(async move {
                    match rx.await {
                        Ok(GateCmd::Answer(value)) => AccessReply::Read { value },
                        Ok(GateCmd::Panic) => panic!("deferred access told to panic"),
                        // Not reached: the test drops a gate only after a failure
                        // has dropped this future.
                        Err(_) => AccessReply::Read { value: u64::MAX },
                    }
                }))
            }
            PANIC => {
                drop(probe);
                panic!("register {PANIC:#x}");
            }
            _ => Completion::Ready(AccessReply::Read { value: FAST_VALUE }),
        }
    }

    fn drain_started(&mut self) {
        lock(&self.probe).drain_started_calls += 1;
    }

    fn stopped(&mut self) {
        lock(&self.probe).stopped_calls += 1;
    }
}

impl Drop for GatedDevice {
    fn drop(&mut self) {
        if let Ok(mut probe) = self.probe.lock() {
            probe.drops += 1;
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Speed {
    Fast,
    Slow,
    Panic,
}

fn read(speed: Speed) -> GuestAccess {
    let offset = match speed {
        Speed::Fast => FAST,
        Speed::Slow => SLOW,
        Speed::Panic => PANIC,
    };
    GuestAccess {
        region: Default::default(),
        offset: RegionOffset(offset),
        size: AccessSize::B4,
        op: AccessOp::Read,
    }
}

#[derive(Clone, Debug)]
enum Op {
    Realize,
    Start,
    Access(Speed),
    /// Opens the gate of one pending access: the oldest (`None`) or any.
    Release {
        which: Option<Index>,
        panic: bool,
    },
    /// A drain; the deadline is an odd number of milliseconds.
    Drain(Option<u64>),
    /// Advances the paused clock by an even number of milliseconds.
    Advance(u64),
    QueryStatus,
}

/// Weights out of 100: slow accesses outnumber releases so that accesses
/// pile up, and each way of failing the device is rare so that most cases
/// get to drain.
fn op() -> impl Strategy<Value = Op> {
    let release = |panic| {
        any::<Index>().prop_map(move |i| Op::Release {
            which: Some(i),
            panic,
        })
    };
    prop_oneof![
        4 => Just(Op::Realize),
        4 => Just(Op::Start),
        12 => Just(Op::Access(Speed::Fast)),
        22 => Just(Op::Access(Speed::Slow)),
        1 => Just(Op::Access(Speed::Panic)),
        8 => Just(Op::Release { which: None, panic: false }),
        8 => release(false),
        1 => release(true),
        8 => Just(Op::Drain(None)),
        12 => prop_oneof![Just(5_u64), Just(15)].prop_map(|d| Op::Drain(Some(d))),
        15 => prop_oneof![Just(2_u64), Just(10)].prop_map(Op::Advance),
        5 => Just(Op::QueryStatus),
    ]
}

/// Up to 30 random operations: most of the time after a realize and start,
/// so that most cases reach `Running`, and starting with up to 10 operations
/// without a drain, so that accesses are pending when the first drain comes.
fn ops() -> impl Strategy<Value = Vec<Op>> {
    let boot = proptest::bool::weighted(0.8);
    let warm_up = proptest::collection::vec(op(), 0..=10);
    let rest = proptest::collection::vec(op(), 0..=20);
    (boot, warm_up, rest).prop_map(|(boot, warm_up, rest)| {
        let boot = if boot {
            &[Op::Realize, Op::Start][..]
        } else {
            &[]
        };
        let warm_up = warm_up.into_iter().filter(|op| !matches!(op, Op::Drain(_)));
        boot.iter().cloned().chain(warm_up).chain(rest).collect()
    })
}

/// A drain's answer, with the parts that depend on wall-clock time left out.
#[derive(Clone, Debug, PartialEq, Eq)]
enum DrainOutcome {
    Done { answered_during_drain: u64 },
    Timeout { pending: Vec<u64> },
    Failed,
    Gone,
}

/// What the model says one step must have answered.
#[derive(Debug, Default)]
struct Expect {
    accesses: Vec<(u64, Answer<AccessReply>)>,
    drains: Vec<(u64, DrainOutcome)>,
    /// The slow access the device must have opened a gate for.
    new_gate: Option<u64>,
}

/// The reference model.
#[derive(Debug)]
struct Model {
    id: DeviceId,
    /// `Stopped` means the actor is gone (the test waits for that to happen
    /// before it sends anything else).
    state: State,
    failed: bool,
    /// Accepted slow accesses not yet answered, by sequence number.
    pending: BTreeSet<u64>,
    /// Drain requests not yet answered, with their deadline in virtual ms.
    drains: BTreeMap<u64, Option<u64>>,
    now_ms: u64,
    pending_at_drain: u64,
    handled: u64,
    refused: u64,
    realize_calls: u32,
    drain_started_calls: u32,
    stopped_calls: u32,
    /// The send path numbers accesses 1, 2, 3, ... per `Runtime`, and only
    /// accesses go through it, so the model knows each access's sequence
    /// number.
    next_seq: u64,
    next_drain: u64,
}

impl Model {
    fn new(id: DeviceId) -> Self {
        Model {
            id,
            state: State::Created,
            failed: false,
            pending: BTreeSet::new(),
            drains: BTreeMap::new(),
            now_ms: 0,
            pending_at_drain: 0,
            handled: 0,
            refused: 0,
            realize_calls: 0,
            drain_started_calls: 0,
            stopped_calls: 0,
            next_seq: 1,
            next_drain: 0,
        }
    }

    fn lifecycle(&mut self, from: State, to: State) -> Result<(), LifecycleError> {
        if self.state == State::Stopped {
            Err(LifecycleError::Gone {
                id: self.id.clone(),
            })
        } else if self.state == from {
            self.state = to;
            Ok(())
        } else {
            Err(LifecycleError::Transition {
                id: self.id.clone(),
                source: InvalidTransition {
                    from: self.state,
                    to,
                },
            })
        }
    }

    fn realize(&mut self) -> Result<(), LifecycleError> {
        let r = self.lifecycle(State::Created, State::Realized);
        if r.is_ok() {
            self.realize_calls += 1;
        }
        r
    }

    fn start(&mut self) -> Result<(), LifecycleError> {
        self.lifecycle(State::Realized, State::Running)
    }

    fn access(&mut self, speed: Speed, ex: &mut Expect) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        match self.state {
            // A device stopped by a failure says so; one that drained is gone.
            State::Stopped if self.failed => ex.accesses.push((seq, Err(Refused::Failed))),
            State::Stopped => ex.accesses.push((seq, Err(Refused::Gone))),
            State::Draining => {
                self.refused += 1;
                ex.accesses.push((seq, Err(Refused::Draining)));
            }
            state @ (State::Created | State::Realized) => {
                self.refused += 1;
                ex.accesses.push((seq, Err(Refused::NotRunning { state })));
            }
            State::Running => {
                self.handled += 1;
                match speed {
                    Speed::Fast => ex
                        .accesses
                        .push((seq, Ok(AccessReply::Read { value: FAST_VALUE }))),
                    Speed::Slow => {
                        self.pending.insert(seq);
                        ex.new_gate = Some(seq);
                    }
                    Speed::Panic => {
                        ex.accesses.push((seq, Err(Refused::Failed)));
                        self.fail(ex);
                    }
                }
            }
        }
        seq
    }

    fn pick(&self, which: Option<&Index>) -> Option<u64> {
        let pending: Vec<u64> = self.pending.iter().copied().collect();
        match which {
            _ if pending.is_empty() => None,
            None => Some(pending[0]),
            Some(i) => Some(*i.get(&pending)),
        }
    }

    fn release(&mut self, seq: u64, panic: bool, ex: &mut Expect) {
        if panic {
            self.fail(ex);
            return;
        }
        self.pending.remove(&seq);
        ex.accesses
            .push((seq, Ok(AccessReply::Read { value: seq })));
        if self.state == State::Draining && self.pending.is_empty() {
            self.finish_drain(ex);
        }
    }

    fn drain(&mut self, deadline: Option<u64>, ex: &mut Expect) -> u64 {
        let id = self.next_drain;
        self.next_drain += 1;
        match self.state {
            State::Stopped => {
                ex.drains.push((id, DrainOutcome::Gone));
                return id;
            }
            State::Created | State::Realized => {
                self.pending_at_drain = 0;
            }
            State::Running => {
                self.state = State::Draining;
                self.drain_started_calls += 1;
                self.pending_at_drain = self.pending.len() as u64;
            }
            State::Draining => {}
        }
        self.drains.insert(id, deadline.map(|d| self.now_ms + d));
        if self.pending.is_empty() {
            self.finish_drain(ex);
        }
        id
    }

    fn advance(&mut self, ms: u64, ex: &mut Expect) {
        self.now_ms += ms;
        let now = self.now_ms;
        let pending: Vec<u64> = self.pending.iter().copied().collect();
        self.drains.retain(|id, deadline| match deadline {
            Some(at) if *at <= now => {
                ex.drains.push((
                    *id,
                    DrainOutcome::Timeout {
                        pending: pending.clone(),
                    },
                ));
                false
            }
            _ => true,
        });
    }

    fn finish_drain(&mut self, ex: &mut Expect) {
        self.stopped_calls += 1;
        self.state = State::Stopped;
        let answered_during_drain = self.pending_at_drain;
        for (id, _) in std::mem::take(&mut self.drains) {
            ex.drains.push((
                id,
                DrainOutcome::Done {
                    answered_during_drain,
                },
            ));
        }
    }

    fn fail(&mut self, ex: &mut Expect) {
        self.state = State::Stopped;
        self.failed = true;
        for seq in std::mem::take(&mut self.pending) {
            ex.accesses.push((seq, Err(Refused::Failed)));
        }
        for (id, _) in std::mem::take(&mut self.drains) {
            ex.drains.push((id, DrainOutcome::Failed));
        }
    }

    fn status(&self) -> Option<DeviceStatus> {
        (self.state != State::Stopped).then(|| DeviceStatus {
            id: self.id.clone(),
            kind: KIND.to_string(),
            state: self.state,
            pending: self.pending.len() as u64,
            handled: self.handled,
            refused: self.refused,
        })
    }
}

type DrainFuture = Pin<Box<dyn Future<Output = Result<DrainReport, DrainError>>>>;

/// Waits for an answer the model says is due.
async fn due<F: Future>(what: impl std::fmt::Display, fut: F) -> Result<F::Output, TestCaseError> {
    tokio::time::timeout(GUARD, fut).await.map_err(|_| {
        TestCaseError::fail(format!(
            "{what}: the model says it is answered, but it never was"
        ))
    })
}

fn outcome(
    id: &DeviceId,
    got: Result<DrainReport, DrainError>,
) -> Result<DrainOutcome, TestCaseError> {
    let (got_id, outcome) = match got {
        Ok(report) => (
            report.id,
            DrainOutcome::Done {
                answered_during_drain: report.answered_during_drain,
            },
        ),
        Err(DrainError::Timeout { id, pending, .. }) => {
            for p in &pending {
                prop_assert_eq!(p.kind.as_str(), "read");
                prop_assert_eq!(p.access, read(Speed::Slow));
            }
            let pending = pending.iter().map(|p| p.seq.0).collect();
            (id, DrainOutcome::Timeout { pending })
        }
        Err(DrainError::Failed { id }) => (id, DrainOutcome::Failed),
        Err(DrainError::Gone { id }) => (id, DrainOutcome::Gone),
    };
    prop_assert_eq!(&got_id, id);
    Ok(outcome)
}

/// One run: the model, the real actor, and every answer not yet received.
struct Case {
    model: Model,
    dev: DeviceRef,
    me: ActorId,
    probe: SharedProbe,
    journal: Arc<MemoryJournal>,
    supervisor: Addr<Supervisor>,
    /// Gates of the model's pending accesses, by sequence number.
    gates: BTreeMap<u64, oneshot::Sender<GateCmd>>,
    /// Access replies not yet received, by sequence number.
    replies: BTreeMap<u64, Reply<AccessReply>>,
    /// Every answer received, for the journal check.
    answered: BTreeMap<u64, Answer<AccessReply>>,
    /// Drains not yet answered, by the model's drain id.
    drains: BTreeMap<u64, DrainFuture>,
}

impl Case {
    fn new() -> Self {
        let probe = SharedProbe::default();
        let journal = Arc::new(MemoryJournal::new());
        let runtime = Runtime::with_journal(journal.clone());
        let supervisor = Supervisor::default().start();
        let id = DeviceId::new(NAME);
        let device = GatedDevice {
            probe: Arc::clone(&probe),
        };
        let spawned = spawn_device(
            &runtime,
            id.clone(),
            device,
            &Arbiter::current(),
            Some(supervisor.clone().recipient()),
        );
        Case {
            model: Model::new(id),
            dev: spawned.device,
            me: ActorId::new("model-test"),
            probe,
            journal,
            supervisor,
            gates: BTreeMap::new(),
            replies: BTreeMap::new(),
            answered: BTreeMap::new(),
            drains: BTreeMap::new(),
        }
    }

    async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let mut ex = Expect::default();
        match op {
            Op::Realize => {
                let got = due("realize", self.dev.realize()).await?;
                prop_assert_eq!(got, self.model.realize(), "realize");
            }
            Op::Start => {
                let got = due("start", self.dev.start()).await?;
                prop_assert_eq!(got, self.model.start(), "start");
            }
            Op::Access(speed) => {
                let reply = self.dev.access(&self.me, read(*speed));
                let seq = self.model.access(*speed, &mut ex);
                self.replies.insert(seq, reply);
            }
            Op::Release { which, panic } => {
                if let Some(seq) = self.model.pick(which.as_ref()) {
                    let gate = self
                        .gates
                        .remove(&seq)
                        .ok_or_else(|| TestCaseError::fail(format!("no gate for #{seq}")))?;
                    let cmd = if *panic {
                        GateCmd::Panic
                    } else {
                        GateCmd::Answer(seq)
                    };
                    prop_assert!(
                        gate.send(cmd).is_ok(),
                        "#{} pending, but its completion is gone",
                        seq
                    );
                    self.model.release(seq, *panic, &mut ex);
                }
            }
            Op::Drain(deadline) => {
                let fut = self.dev.drain(deadline.map(Duration::from_millis));
                let id = self.model.drain(*deadline, &mut ex);
                self.drains.insert(id, Box::pin(fut));
            }
            Op::Advance(ms) => {
                tokio::time::advance(Duration::from_millis(*ms)).await;
                self.model.advance(*ms, &mut ex);
            }
            Op::QueryStatus => {}
        }
        self.check(ex).await
    }

    async fn check(&mut self, ex: Expect) -> Result<(), TestCaseError> {
        // First every answer that is due: receiving one means the actor has
        // handled what caused it (and, if that stopped it, has finished).
        for (seq, want) in ex.accesses {
            let reply = self.replies.remove(&seq).ok_or_else(|| {
                TestCaseError::fail(format!("#{seq} answered twice in the model"))
            })?;
            let got = due(format!("access #{seq}"), reply).await?;
            prop_assert_eq!(got, want, "access #{}", seq);
            self.answered.insert(seq, got);
        }
        for (id, want) in ex.drains {
            let fut = self.drains.remove(&id).ok_or_else(|| {
                TestCaseError::fail(format!("drain {id} answered twice in the model"))
            })?;
            let got = due(format!("drain {id}"), fut).await?;
            prop_assert_eq!(outcome(&self.model.id, got)?, want, "drain {}", id);
        }

        // A round trip: every message sent so far has been handled.
        let status = due("status", self.dev.status()).await?;
        prop_assert_eq!(status, self.model.status(), "status");

        // Let answers sent by the actor travel before checking none came early.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        for (seq, reply) in &mut self.replies {
            prop_assert!(reply.now_or_never().is_none(), "#{} answered early", seq);
        }
        for (id, fut) in &mut self.drains {
            let got = fut.now_or_never();
            prop_assert!(got.is_none(), "drain {} answered early: {:?}", id, got);
        }
        prop_assert_eq!(
            self.replies.keys().copied().collect::<BTreeSet<_>>(),
            self.model.pending.clone()
        );
        prop_assert!(self.drains.keys().eq(self.model.drains.keys()));
        prop_assert_eq!(
            self.dev.sender().in_flight(),
            self.model.pending.len() as u64
        );

        let mut probe = lock(&self.probe);
        let new_gates: Vec<_> = probe.gates.drain(..).collect();
        prop_assert_eq!(
            new_gates.len(),
            usize::from(ex.new_gate.is_some()),
            "gates opened"
        );
        if let (Some(seq), Some(gate)) = (ex.new_gate, new_gates.into_iter().next()) {
            self.gates.insert(seq, gate);
        }
        // A failed device dropped its completions, and with them the gates.
        self.gates.retain(|seq, _| self.model.pending.contains(seq));
        prop_assert_eq!(
            probe.access_calls,
            self.model.handled,
            "device access calls"
        );
        prop_assert_eq!(
            probe.realize_calls,
            self.model.realize_calls,
            "realize calls"
        );
        prop_assert_eq!(
            probe.drain_started_calls,
            self.model.drain_started_calls,
            "drain_started calls"
        );
        prop_assert_eq!(
            probe.stopped_calls,
            self.model.stopped_calls,
            "stopped calls"
        );
        prop_assert_eq!(
            probe.drops,
            u32::from(self.model.state == State::Stopped),
            "drops"
        );
        Ok(())
    }

    /// Opens every gate, drains the device, and checks that everything was
    /// answered exactly once.
    async fn finish(&mut self) -> Result<(), TestCaseError> {
        while !self.model.pending.is_empty() {
            self.step(&Op::Release {
                which: None,
                panic: false,
            })
            .await?;
        }
        if self.model.state != State::Stopped {
            self.step(&Op::Drain(None)).await?;
        }
        prop_assert_eq!(self.model.state, State::Stopped);
        prop_assert!(
            self.replies.is_empty(),
            "unanswered accesses: {:?}",
            self.replies.keys()
        );
        prop_assert!(
            self.drains.is_empty(),
            "unanswered drains: {:?}",
            self.drains.keys().collect::<Vec<_>>()
        );
        prop_assert_eq!(self.dev.sender().in_flight(), 0);
        prop_assert!(!self.dev.connected());

        let sent = self.model.next_seq - 1;
        prop_assert_eq!(self.answered.len() as u64, sent);
        let mut journal_sent = BTreeSet::new();
        let mut journal_replied = BTreeMap::new();
        for record in self.journal.records() {
            match record {
                JournalRecord::Sent { seq, .. } => {
                    prop_assert!(journal_sent.insert(seq.0), "#{} sent twice", seq.0);
                }
                JournalRecord::Replied { seq, reply, .. } => {
                    prop_assert!(
                        journal_sent.contains(&seq.0),
                        "#{} answered before sent",
                        seq.0
                    );
                    let before = journal_replied.insert(seq.0, reply);
                    prop_assert!(before.is_none(), "#{} answered twice", seq.0);
                }
            }
        }
        prop_assert_eq!(journal_sent, (1..=sent).collect::<BTreeSet<_>>());
        prop_assert_eq!(journal_replied.len() as u64, sent);
        for (seq, answer) in &self.answered {
            let recorded = serde_json::to_value(answer).expect("an answer serializes");
            prop_assert_eq!(
                journal_replied.get(seq),
                Some(&recorded),
                "journal answer of #{}",
                seq
            );
        }

        let failures = due("supervisor", self.supervisor.send(QueryFailures))
            .await?
            .expect("the supervisor outlives the case");
        prop_assert_eq!(failures.len(), usize::from(self.model.failed));
        for failure in failures {
            prop_assert_eq!(&failure.id, &self.model.id);
        }
        Ok(())
    }
}

async fn run_case(ops: Vec<Op>) -> Result<(), TestCaseError> {
    tokio::time::pause();
    let mut case = Case::new();
    for op in &ops {
        case.step(op).await?;
    }
    case.finish().await
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn test_drain_state_machine_matches_model(ops in ops()) {
        System::new().block_on(run_case(ops))?;
    }
}
