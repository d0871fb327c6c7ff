// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The actor lifecycle: `Created -> Realized -> Running -> Draining -> Stopped`.
//!
//! Every device actor carries a [`State`] and changes it only through
//! [`State::transition`], which rejects anything but the edges below with a
//! typed error:
//!
//! ```text
//! Created --realize--> Realized --start--> Running --drain--> Draining --last reply--> Stopped
//!    |                    |                                                            ^
//!    +--------------------+---------------- drain (nothing can be in flight) ---------+
//! any state --failure (panic in a handler)--> Stopped
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where an actor is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Built, not yet realized: no resources acquired, no access accepted.
    Created,
    /// Resources acquired (files opened, regions known); accesses still refused.
    Realized,
    /// Accepting guest accesses.
    Running,
    /// Refusing new accesses; waiting for accepted ones to be answered.
    Draining,
    /// Done. The device state has been dropped.
    Stopped,
}

/// A transition the lifecycle does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("Cannot go from {from} to {to}")]
pub struct InvalidTransition {
    /// The state the actor was in.
    pub from: State,
    /// The state that was asked for.
    pub to: State,
}

impl State {
    /// Whether `self -> to` is an edge of the lifecycle.
    pub fn can_become(self, to: State) -> bool {
        use State::*;
        matches!(
            (self, to),
            (Created, Realized)
                | (Realized, Running)
                | (Running, Draining)
                | (Draining, Stopped)
                | (Created, Stopped)
                | (Realized, Stopped)
                | (Running, Stopped)
        )
    }

    /// Moves to `to` if the lifecycle allows it.
    pub fn transition(&mut self, to: State) -> Result<(), InvalidTransition> {
        if self.can_become(to) {
            *self = to;
            Ok(())
        } else {
            Err(InvalidTransition { from: *self, to })
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            State::Created => "created",
            State::Realized => "realized",
            State::Running => "running",
            State::Draining => "draining",
            State::Stopped => "stopped",
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [State; 5] = [
        State::Created,
        State::Realized,
        State::Running,
        State::Draining,
        State::Stopped,
    ];

    #[test]
    fn test_forward_path_is_allowed() {
        let mut s = State::Created;
        for next in [
            State::Realized,
            State::Running,
            State::Draining,
            State::Stopped,
        ] {
            s.transition(next).expect("forward edge");
        }
        assert_eq!(s, State::Stopped);
    }

    #[test]
    fn test_no_way_back_and_stopped_is_final() {
        for to in ALL {
            assert!(!State::Stopped.can_become(to), "stopped -> {to}");
            assert!(!State::Draining.can_become(State::Running));
        }
        let mut s = State::Running;
        let err = s.transition(State::Realized).expect_err("backwards");
        assert_eq!(
            err,
            InvalidTransition {
                from: State::Running,
                to: State::Realized
            }
        );
        assert_eq!(
            s,
            State::Running,
            "a refused transition leaves the state alone"
        );
    }

    #[test]
    fn test_self_transitions_are_refused() {
        for s in ALL {
            assert!(!s.can_become(s), "{s} -> {s}");
        }
    }
}
