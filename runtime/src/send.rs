// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The one send path for guest-access messages.
//!
//! Every guest access travels as an [`Envelope`] built by [`Sender::send`] (or
//! [`Sender::forward`]), which
//!
//! 1. gives it the next [`Seq`] of the [`Runtime`],
//! 2. counts it in the receiving actor's in-flight counter,
//! 3. shows it to the runtime's [`Journal`], if any,
//! 4. pushes it into the receiver's mailbox.
//!
//! The envelope carries a [`Responder`]: the only way to answer the message.
//! `Responder::reply` consumes it, so an access is answered at most once by
//! construction; dropping a `Responder` unanswered (because the actor stopped
//! with the message still in its mailbox, say) answers `Refused::Gone`, so it is
//! answered at least once too. Either way the in-flight count goes down exactly
//! when the reply is sent, and the journal sees the reply.
//!
//! The caller holds a [`Reply`]: a future, or [`Reply::wait`] for a plain thread.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use actix::Recipient;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::gate::{Gate, Ticket};
use crate::ids::{ActorId, Seq};
use crate::journal::{Journal, Recordable, Replied, Sent};
use crate::lifecycle::State;

/// A message that travels the send path and expects a reply of type `Reply`.
pub trait Request: Serialize + Send + 'static {
    /// What the receiver answers when it accepts the message.
    type Reply: Serialize + Send + 'static;

    /// A short name of the message type for journals and drain reports.
    fn kind(&self) -> &'static str;
}

/// Why a message got no answer from its receiver's logic.
///
/// These are the runtime's refusals, separate from whatever a device itself
/// answers. Callers decide with [`Refused::is_final`] whether retrying can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "refused", rename_all = "kebab-case")]
pub enum Refused {
    /// The receiver has stopped (or stopped before answering).
    #[error("Receiver is gone")]
    Gone,
    /// The receiver is draining and takes no new work.
    #[error("Receiver is draining")]
    Draining,
    /// The receiver is not running yet.
    #[error("Receiver is not running (state {state})")]
    NotRunning {
        /// The state it is in.
        state: State,
    },
    /// The receiver's handler panicked; the receiver has been stopped.
    #[error("Receiver failed")]
    Failed,
}

impl Refused {
    /// Whether the receiver will never accept this message again: true for
    /// everything but a receiver that has not started yet.
    pub fn is_final(&self) -> bool {
        match self {
            Refused::Gone | Refused::Draining | Refused::Failed => true,
            Refused::NotRunning { .. } => false,
        }
    }
}

/// What the caller of a send eventually gets.
pub type Answer<R> = Result<R, Refused>;

/// Process-wide send-path state: the sequence counter and the journal.
///
/// Cheap to clone; every clone shares the counter.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    next_seq: AtomicU64,
    journal: Option<Arc<dyn Journal>>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("next_seq", &self.inner.next_seq.load(Ordering::Relaxed))
            .field("journal", &self.inner.journal.is_some())
            .finish()
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Self::new()
    }
}

impl Runtime {
    /// A runtime without a journal.
    pub fn new() -> Self {
        Runtime {
            inner: Arc::new(RuntimeInner {
                next_seq: AtomicU64::new(1),
                journal: None,
            }),
        }
    }

    /// A runtime whose every send and reply is shown to `journal`.
    pub fn with_journal(journal: Arc<dyn Journal>) -> Self {
        Runtime {
            inner: Arc::new(RuntimeInner {
                next_seq: AtomicU64::new(1),
                journal: Some(journal),
            }),
        }
    }

    /// A sender to an actor that handles `Envelope<M>` and has no lifecycle
    /// of its own (a bus): its gate is always running.
    pub fn sender<M: Request>(&self, to: ActorId, recipient: Recipient<Envelope<M>>) -> Sender<M> {
        let gate = Gate::running(to.as_str(), 1, 64);
        self.sender_through(to, recipient, gate)
    }

    /// A sender to an actor whose messages are admitted by `gate` (a device
    /// actor's: the gate holds its lifecycle state, so a message to a device
    /// that is not running is refused here, before it reaches the mailbox).
    pub fn sender_through<M: Request>(
        &self,
        to: ActorId,
        recipient: Recipient<Envelope<M>>,
        gate: Gate,
    ) -> Sender<M> {
        Sender {
            inner: Arc::new(SenderInner {
                to,
                recipient,
                runtime: self.clone(),
                gate,
            }),
        }
    }

    /// Shows a one-way message to the journal: one that has no receiver
    /// waiting to answer it, such as an interrupt level a device raised or
    /// an input a device took from outside. It gets the next [`Seq`] and is
    /// journalled as sent and answered at once, with no reply. Without a
    /// journal this is one branch.
    ///
    /// Call it on the thread, and at the moment, the message takes effect
    /// (a device calls it from its own handler): the journal's order of a
    /// device's messages is then the order the device saw them in.
    pub fn notify<M: Request<Reply = ()>>(&self, from: &ActorId, to: &ActorId, msg: &M) {
        let Some(journal) = self.journal() else {
            return;
        };
        let seq = self.next_seq();
        journal.sent(&Sent {
            seq,
            forwarded_from: None,
            from,
            to,
            kind: msg.kind(),
            payload: msg as &dyn Recordable,
        });
        journal.replied(&Replied {
            seq,
            reply: &() as &dyn Recordable,
        });
    }

    /// The next sequence number of this runtime: every message gets one.
    pub fn next_seq(&self) -> Seq {
        Seq(self.inner.next_seq.fetch_add(1, Ordering::Relaxed))
    }

    /// The journal, if one is installed.
    pub fn journal(&self) -> Option<&Arc<dyn Journal>> {
        self.inner.journal.as_ref()
    }
}

/// A message in a mailbox, with the means to answer it.
pub struct Envelope<M: Request> {
    /// Its sequence number.
    pub seq: Seq,
    /// Who sent it.
    pub from: ActorId,
    /// The message.
    pub msg: M,
    /// The only way to answer it.
    pub reply: Responder<M::Reply>,
}

impl<M: Request + fmt::Debug> fmt::Debug for Envelope<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("seq", &self.seq)
            .field("from", &self.from)
            .field("msg", &self.msg)
            .finish()
    }
}

impl<M: Request> actix::Message for Envelope<M> {
    type Result = ();
}

/// Answers one message, exactly once.
///
/// Holds the caller's end of the reply channel and the receiver's in-flight
/// counter. Consumed by [`Responder::reply`]; dropped unanswered it answers
/// [`Refused::Gone`].
pub struct Responder<R: Serialize + Send + 'static> {
    seq: Seq,
    /// `None` once answered.
    tx: Option<oneshot::Sender<Answer<R>>>,
    /// The message's admission on the receiver's gate, dropped (counting the
    /// message out) when the answer goes. `None` for a refused message.
    ticket: Option<Ticket>,
    journal: Option<Arc<dyn Journal>>,
}

impl<R: Serialize + Send + 'static> fmt::Debug for Responder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("seq", &self.seq)
            .field("answered", &self.tx.is_none())
            .finish()
    }
}

impl<R: Serialize + Send + 'static> Responder<R> {
    /// A responder for message `seq`, admitted with `ticket`, and the reply
    /// its caller waits on: for a message that was admitted somewhere other
    /// than [`Sender::send`] (an access run on its caller's thread, see
    /// [`crate::direct`], whose answer comes later).
    pub(crate) fn admitted(
        seq: Seq,
        ticket: Ticket,
        journal: Option<Arc<dyn Journal>>,
    ) -> (Self, Reply<R>) {
        let (tx, rx) = oneshot::channel();
        let responder = Responder {
            seq,
            tx: Some(tx),
            ticket: Some(ticket),
            journal,
        };
        (responder, Reply { rx })
    }

    /// The sequence number of the message this answers.
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// Sends the answer.
    pub fn reply(mut self, answer: Answer<R>) {
        self.answer(answer);
    }

    fn answer(&mut self, answer: Answer<R>) {
        if let Some(tx) = self.tx.take() {
            if let Some(journal) = &self.journal {
                journal.replied(&Replied {
                    seq: self.seq,
                    reply: &answer as &dyn Recordable,
                });
            }
            // The caller may have stopped waiting; the answer is still counted
            // as sent.
            let _ = tx.send(answer);
            self.ticket = None;
        }
    }

    /// Takes the reply channel out, leaving this responder answered without
    /// sending anything. Used only by [`Sender::forward`].
    fn take_channel(&mut self) -> Option<oneshot::Sender<Answer<R>>> {
        let tx = self.tx.take();
        self.ticket = None;
        tx
    }
}

impl<R: Serialize + Send + 'static> Drop for Responder<R> {
    fn drop(&mut self) {
        self.answer(Err(Refused::Gone));
    }
}

/// The caller's side of one send: resolves to the answer.
#[must_use = "a reply that is not awaited is still counted in flight until the receiver answers"]
pub struct Reply<R> {
    rx: oneshot::Receiver<Answer<R>>,
}

impl<R> fmt::Debug for Reply<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply").finish_non_exhaustive()
    }
}

impl<R> Reply<R> {
    /// Blocks the calling thread until the answer comes. For plain threads
    /// only: inside an actor, await the reply instead.
    pub fn wait(self) -> Answer<R> {
        futures::executor::block_on(self)
    }
}

impl<R> Future for Reply<R> {
    type Output = Answer<R>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.get_mut().rx).poll(cx) {
            Poll::Ready(Ok(answer)) => Poll::Ready(answer),
            // A responder always answers before it goes away, so a cancelled
            // channel can only mean the reply channel itself was lost.
            Poll::Ready(Err(_)) => Poll::Ready(Err(Refused::Gone)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Sends one message type to one actor through the send path. Cheap to clone.
pub struct Sender<M: Request> {
    inner: Arc<SenderInner<M>>,
}

struct SenderInner<M: Request> {
    to: ActorId,
    recipient: Recipient<Envelope<M>>,
    runtime: Runtime,
    /// Admits every message to this actor, and counts it until answered.
    gate: Gate,
}

impl<M: Request> Clone for Sender<M> {
    fn clone(&self) -> Self {
        Sender {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<M: Request> fmt::Debug for Sender<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("to", &self.inner.to)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl<M: Request> Sender<M> {
    /// The receiving actor.
    pub fn to(&self) -> &ActorId {
        &self.inner.to
    }

    /// Messages sent to the receiver and not yet answered.
    pub fn in_flight(&self) -> u64 {
        self.inner.gate.in_flight()
    }

    /// The receiver's gate.
    pub fn gate(&self) -> &Gate {
        &self.inner.gate
    }

    /// Whether the receiver's mailbox is still open.
    pub fn connected(&self) -> bool {
        self.inner.recipient.connected()
    }

    /// Sends `msg` and returns the pending answer.
    pub fn send(&self, from: &ActorId, msg: M) -> Reply<M::Reply> {
        let (tx, rx) = oneshot::channel();
        self.dispatch(from, msg, tx, None);
        Reply { rx }
    }

    /// Sends `msg` as the continuation of a message this actor received, so
    /// that the receiver's answer goes straight to the original caller
    /// through `upstream` without passing back through the forwarding actor.
    pub fn forward<U: Serialize + Send + 'static>(
        &self,
        from: &ActorId,
        msg: M,
        mut upstream: Responder<U>,
    ) where
        M: Request<Reply = U>,
    {
        let Some(tx) = upstream.take_channel() else {
            return;
        };
        let forwarded_from = Some(upstream.seq);
        self.dispatch(from, msg, tx, forwarded_from);
    }

    fn dispatch(
        &self,
        from: &ActorId,
        msg: M,
        tx: oneshot::Sender<Answer<M::Reply>>,
        forwarded_from: Option<Seq>,
    ) {
        let inner = &*self.inner;
        let seq = inner.runtime.next_seq();
        // Counted, not listed: a device actor lists its own pending accesses
        // (with the access itself) in its drain reports, and the slot and
        // the clock read would cost this path more than they give.
        let admitted = inner.gate.admit_untracked(0);
        let journal = inner.runtime.journal().cloned();
        if let Some(journal) = &journal {
            journal.sent(&Sent {
                seq,
                forwarded_from,
                from,
                to: &inner.to,
                kind: msg.kind(),
                payload: &msg as &dyn Recordable,
            });
        }
        let ticket = match admitted {
            Ok(t) => t,
            Err(refused) => {
                // Refused at the gate: answered here, never enqueued.
                Responder {
                    seq,
                    tx: Some(tx),
                    ticket: None,
                    journal,
                }
                .reply(Err(refused));
                return;
            }
        };
        let envelope = Envelope {
            seq,
            from: from.clone(),
            msg,
            reply: Responder {
                seq,
                tx: Some(tx),
                ticket: Some(ticket),
                journal,
            },
        };
        // A closed mailbox drops the envelope, whose responder then answers
        // `Gone`: nothing else to do here.
        inner.recipient.do_send(envelope);
    }
}
