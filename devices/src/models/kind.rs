// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device kinds: one registry of the names a user writes in a
//! topology's `kind`, sees in `query-devices` and finds in a message log.
//!
//! Each model owns its name as a spec constant (`blk::KIND`, ...), next to
//! its other spec constants; [`DeviceKind`] lists the models, and every
//! other place that needs a kind (the topology format and its checker, the
//! fleet, replay and `switchboard log`) takes it from here. The registry is
//! in the models, not in the host, because the log tools, which may not use
//! the host, rebuild devices from a log by kind.
//!
//! Adding a device kind: its model (with its `KIND`), a variant here, its
//! spec in the host's topology (`host::topology::DeviceSpec`), and, if its
//! log can be replayed, its rebuild in `log::replay`. Every `match` on a
//! [`DeviceKind`] or a `DeviceSpec` is exhaustive, so the compiler lists
//! what else a new kind must answer.

use std::fmt;
use std::str::FromStr;

use crate::models::{blk, fault, rng, serial, slow};

/// A kind of device, as written in a topology's `kind`.
///
/// ```
/// use switchboard_devices::models::DeviceKind;
///
/// let kind: DeviceKind = "virtio-blk".parse().expect("a kind");
/// assert_eq!(kind, DeviceKind::VirtioBlk);
/// assert_eq!(kind.to_string(), "virtio-blk");
/// assert!(kind.is_vhost_user());
/// assert!("slow-test".parse::<DeviceKind>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKind {
    /// A virtio-blk disk ([`blk`]), served over vhost-user.
    VirtioBlk,
    /// A virtio-rng entropy source ([`rng`]), served over vhost-user.
    VirtioRng,
    /// A 16550A UART ([`serial`]) on a bus.
    Uart16550,
    /// The slow test device ([`slow`]) on a bus.
    TestDevice,
    /// The fault-injection test device ([`fault`]), served over vhost-user.
    VirtioFault,
}

impl DeviceKind {
    /// Every kind, in the order the topology documentation lists them.
    pub const ALL: [DeviceKind; 5] = [
        DeviceKind::VirtioBlk,
        DeviceKind::VirtioRng,
        DeviceKind::Uart16550,
        DeviceKind::TestDevice,
        DeviceKind::VirtioFault,
    ];

    /// The name of every kind, in the order of [`DeviceKind::ALL`].
    pub const NAMES: [&'static str; 5] = {
        let mut names = [""; 5];
        let mut i = 0;
        while i < names.len() {
            names[i] = DeviceKind::ALL[i].as_str();
            i += 1;
        }
        names
    };

    /// The name, as written in `kind` (`"virtio-blk"`): the model's `KIND`.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeviceKind::VirtioBlk => blk::KIND,
            DeviceKind::VirtioRng => rng::KIND,
            DeviceKind::Uart16550 => serial::KIND,
            DeviceKind::TestDevice => slow::KIND,
            DeviceKind::VirtioFault => fault::KIND,
        }
    }

    /// Whether a device of this kind is a virtio device served over
    /// vhost-user (else it has a register region on a bus).
    pub const fn is_vhost_user(self) -> bool {
        match self {
            DeviceKind::VirtioBlk | DeviceKind::VirtioRng | DeviceKind::VirtioFault => true,
            DeviceKind::Uart16550 | DeviceKind::TestDevice => false,
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is no device kind.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Unknown device kind `{0}`")]
pub struct UnknownKind(pub String);

impl FromStr for DeviceKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, UnknownKind> {
        DeviceKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_kind_reads_back_from_its_name() {
        for kind in DeviceKind::ALL {
            assert_eq!(kind.as_str().parse::<DeviceKind>(), Ok(kind));
        }
        let mut names = DeviceKind::NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DeviceKind::ALL.len(), "two kinds share a name");
    }
}
