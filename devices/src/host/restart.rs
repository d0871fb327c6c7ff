// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Supervised restart: a vhost-user device that failed is served again,
//! as a fresh instance on the same socket, as its [`RestartPolicy`] says.
//!
//! A vhost-user device's serving thread runs `serve_supervised`: it
//! serves one instance (a device, its guest-memory bus, its
//! [`VhostUserServer`] and gate) until the instance fails or the device is
//! stopped. After a failure, while the policy allows another restart, it
//! waits the backoff (a stop ends the wait: nothing is restarted), builds
//! a fresh instance (the image opened again for virtio-blk; a new
//! entropy source, fault schedule...) and serves it on the same listening
//! socket. The socket is never closed in between, so its file stays the
//! one that was bound (an inherited socket works too), and a frontend that
//! reconnects during the backoff waits in the listen backlog until the
//! fresh instance accepts it. Every instance's failure reaches the
//! supervisor (`query-failures` lists them all); once the limit is
//! reached, the device stays stopped with its last failure and
//! `restart limit N reached`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::{ArbiterHandle, Recipient};
use switchboard_bus::BusHandle;
use switchboard_runtime::journal::Journal;
use switchboard_runtime::{DeviceFailed, Gate, Runtime, State};

use crate::error_chain;
use crate::host::topology::RestartPolicy;
use crate::models::virtio::VirtioDevice;
use crate::vhost_user::{self, serve_on, BoundSocket, StopHandle, VhostUserServer};

/// What `query-devices` shows for a device waiting to be restarted.
pub const RESTARTING: &str = "restarting";

/// A vhost-user device's server, type-erased.
pub(super) trait Served: Send + Sync {
    fn in_flight(&self) -> u64;
    fn handled(&self) -> u64;
    fn gate(&self) -> &Gate;
}

impl<D: VirtioDevice> Served for VhostUserServer<D> {
    fn in_flight(&self) -> u64 {
        VhostUserServer::in_flight(self)
    }

    fn gate(&self) -> &Gate {
        VhostUserServer::gate(self)
    }

    fn handled(&self) -> u64 {
        VhostUserServer::handled(self)
    }
}

type ServeFn = Box<dyn FnOnce(&mut BoundSocket, &StopHandle) -> vhost_user::Result<()> + Send>;

/// One instance of a device: its server, started, and how to serve it.
pub(super) struct Instance {
    served: Arc<dyn Served>,
    serve: ServeFn,
}

/// Makes a fresh instance of one device (for a restart).
pub(super) type Make = Box<dyn FnMut() -> Result<Instance, String> + Send>;

/// What every instance of one device is built with.
#[derive(Clone)]
pub(super) struct InstanceBuilder {
    pub(super) runtime: Runtime,
    /// Where its guest-memory bus runs.
    pub(super) arbiter: ArbiterHandle,
    pub(super) supervisor: Recipient<DeviceFailed>,
    pub(super) journal: Option<Arc<dyn Journal>>,
    pub(super) id: String,
    pub(super) workers: usize,
}

impl InstanceBuilder {
    /// A server for `device`, told to report its failure to the supervisor,
    /// recording (its `added` record first) if the fleet records, and
    /// started.
    pub(super) fn build<D: VirtioDevice>(&self, device: D) -> Result<Instance, String> {
        let id = self.id.as_str();
        let bus = BusHandle::start(&self.runtime, &format!("{id}-guest-memory"), &self.arbiter);
        let server = VhostUserServer::with_runtime(
            Arc::new(device),
            bus,
            self.workers,
            &self.runtime,
            id.into(),
        )
        .map_err(|e| error_chain(&e))?;
        server.supervise(self.supervisor.clone());
        if let Some(j) = &self.journal {
            server.record_to(Arc::clone(j), id);
        }
        server.start();
        let served: Arc<dyn Served> = Arc::new(server.clone());
        Ok(Instance {
            served,
            serve: Box::new(move |socket, stop| serve_on(server, socket, stop)),
        })
    }
}

/// A vhost-user device's current instance, its policy and its restarts.
pub(super) struct Supervised {
    policy: RestartPolicy,
    current: Mutex<Arc<dyn Served>>,
    restarts: AtomicU64,
    /// Why it stays stopped, once a restart could not be made (the image
    /// is gone, say) and none is left.
    given_up: Mutex<Option<String>>,
}

impl Supervised {
    pub(super) fn new(policy: RestartPolicy, first: &Instance) -> Self {
        Supervised {
            policy,
            current: Mutex::new(Arc::clone(&first.served)),
            restarts: AtomicU64::new(0),
            given_up: Mutex::default(),
        }
    }

    /// The instance serving now (or the last one, failed).
    pub(super) fn current(&self) -> Arc<dyn Served> {
        Arc::clone(&self.current.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Restarts made so far.
    pub(super) fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Acquire)
    }

    /// The state and failure `query-devices` shows: `restarting` for a
    /// failed instance that a restart will replace (unless `stopping`),
    /// and for one that will not, its failure with why it is the last.
    pub(super) fn status(&self, stopping: bool) -> (String, Option<String>) {
        let served = self.current();
        let gate = served.gate();
        let (state, failure) = (gate.state(), gate.failure());
        if let Some(reason) = self
            .given_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return (state.to_string(), Some(reason));
        }
        match (&failure, self.policy) {
            (Some(reason), RestartPolicy::Limited(l)) if state == State::Stopped => {
                if self.restarts() < l.limit && !stopping {
                    (RESTARTING.to_string(), failure)
                } else {
                    (state.to_string(), Some(limit_reached(reason, l.limit)))
                }
            }
            _ => (state.to_string(), failure),
        }
    }
}

fn limit_reached(reason: &str, limit: u64) -> String {
    format!("{reason}; restart limit {limit} reached")
}

/// Serves `first`, then, each time the instance serving fails, a fresh one
/// from `make` on the same socket, as `supervised`'s policy allows, until
/// `stop` is used or no restart is left. The socket is closed (and its
/// file removed, if still ours) only when this returns.
pub(super) fn serve_supervised(
    supervised: &Supervised,
    id: &str,
    mut socket: BoundSocket,
    stop: &StopHandle,
    first: Instance,
    mut make: Make,
) -> vhost_user::Result<()> {
    let mut instance = first;
    loop {
        let gate = instance.served.gate().clone();
        (instance.serve)(&mut socket, stop)?;
        let Some(mut reason) = gate.failure() else {
            return Ok(());
        };
        instance = loop {
            let done = supervised.restarts();
            let limit = supervised.policy.limit();
            // Checked before the stop: a failure with no restart left is
            // reported whenever the stop comes (`serve` stops once it sees
            // the device stopped, which `Supervised::status` says as soon
            // as the gate fails).
            if done >= limit {
                if limit > 0 {
                    let reason = limit_reached(&reason, limit);
                    tracing::error!(device = id, %reason, "the device stays stopped");
                    *supervised
                        .given_up
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(reason);
                }
                return Ok(());
            }
            if stop.stopped() {
                return Ok(());
            }
            let wait = supervised.policy.backoff(done);
            tracing::warn!(device = id, %reason, restart = done + 1, limit, backoff_ms = wait.as_millis() as u64, "restarting a failed device");
            if stop.wait_stopped(wait) {
                tracing::info!(device = id, "stopped during the backoff: not restarted");
                return Ok(());
            }
            // The restart is counted only once it has its outcome: while
            // `make` runs, `status` still sees the failed instance, and
            // with the restart already counted it would say the limit was
            // reached (and `serve`, seeing every device stopped, would end).
            // On success the fresh instance is current before the count.
            match make() {
                Ok(next) => {
                    *supervised.current.lock().unwrap_or_else(|e| e.into_inner()) =
                        Arc::clone(&next.served);
                    supervised.restarts.fetch_add(1, Ordering::AcqRel);
                    tracing::info!(device = id, restart = done + 1, "restarted");
                    break next;
                }
                Err(e) => {
                    supervised.restarts.fetch_add(1, Ordering::AcqRel);
                    tracing::error!(device = id, error = %e, restart = done + 1, "the restart failed");
                    reason = format!("restart {} failed: {e}", done + 1);
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread;

    use super::*;
    use crate::host::topology::RestartLimits;

    struct Fake(Gate);

    impl Served for Fake {
        fn in_flight(&self) -> u64 {
            0
        }
        fn handled(&self) -> u64 {
            0
        }
        fn gate(&self) -> &Gate {
            &self.0
        }
    }

    /// An instance whose serving ends at once, with its gate failed if
    /// `failure` is given.
    fn instance(failure: Option<&str>) -> Instance {
        let gate = Gate::running("fake", 1, 1);
        if let Some(reason) = failure {
            gate.fail(reason);
        }
        Instance {
            served: Arc::new(Fake(gate)),
            serve: Box::new(|_, _| Ok(())),
        }
    }

    #[test]
    fn test_a_device_being_rebuilt_shows_restarting_not_its_limit_reached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = vhost_user::bind(&dir.path().join("d.sock")).expect("bind");
        let first = instance(Some("boom"));
        let mut limits = RestartLimits::new(1);
        limits.backoff_ms = 0;
        let supervised = Supervised::new(RestartPolicy::Limited(limits), &first);
        let stop = StopHandle::default();
        let (building, rebuilt) = (mpsc::channel(), mpsc::channel::<()>());
        let make: Make = Box::new(move || {
            building.0.send(()).expect("send");
            rebuilt.1.recv().expect("recv");
            Ok(instance(None))
        });
        thread::scope(|s| {
            let serving =
                s.spawn(|| serve_supervised(&supervised, "d", socket, &stop, first, make));
            building.1.recv().expect("make is called");
            // The last restart allowed is under way: not yet given up.
            let during = (supervised.status(false), supervised.restarts());
            rebuilt.0.send(()).expect("send");
            serving.join().expect("join").expect("served");
            assert_eq!(during, ((RESTARTING.to_string(), Some("boom".into())), 0));
        });
        assert_eq!(supervised.restarts(), 1);
        let (state, failure) = supervised.status(false);
        assert_eq!((state.as_str(), failure), ("running", None));
    }
}
