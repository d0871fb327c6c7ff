// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Address and access-size types shared by buses and devices.
//!
//! A bus address, an offset inside a region and a guest-physical address are
//! different things that happen to be 64-bit numbers; each gets its own type so
//! that one cannot be passed where another is expected.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An address on a bus (an MMIO or PIO address space).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct BusAddr(pub u64);

/// An offset from the start of one region.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct RegionOffset(pub u64);

impl fmt::Display for BusAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for RegionOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "+{:#x}", self.0)
    }
}

/// The width of one guest access: 1, 2, 4 or 8 bytes.
///
/// Only these four widths exist on the PIO and MMIO paths, so the type cannot
/// hold any other value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum AccessSize {
    /// One byte.
    B1,
    /// Two bytes.
    B2,
    /// Four bytes.
    B4,
    /// Eight bytes.
    B8,
}

/// A byte count that is not a valid access size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Access size {0} is not 1, 2, 4 or 8 bytes")]
pub struct InvalidAccessSize(pub u64);

impl AccessSize {
    /// The width in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            AccessSize::B1 => 1,
            AccessSize::B2 => 2,
            AccessSize::B4 => 4,
            AccessSize::B8 => 8,
        }
    }

    /// A mask with the low `bytes() * 8` bits set: the value an unassigned
    /// read returns, and the bits of a write that are meaningful.
    pub const fn mask(self) -> u64 {
        match self {
            AccessSize::B1 => 0xff,
            AccessSize::B2 => 0xffff,
            AccessSize::B4 => 0xffff_ffff,
            AccessSize::B8 => u64::MAX,
        }
    }
}

impl TryFrom<u64> for AccessSize {
    type Error = InvalidAccessSize;

    fn try_from(value: u64) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(AccessSize::B1),
            2 => Ok(AccessSize::B2),
            4 => Ok(AccessSize::B4),
            8 => Ok(AccessSize::B8),
            other => Err(InvalidAccessSize(other)),
        }
    }
}

impl TryFrom<u8> for AccessSize {
    type Error = InvalidAccessSize;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        AccessSize::try_from(u64::from(value))
    }
}

impl From<AccessSize> for u8 {
    fn from(size: AccessSize) -> u8 {
        // Every width fits in a byte.
        size.bytes() as u8
    }
}

impl fmt::Display for AccessSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_access_size_accepts_only_power_of_two_widths() {
        for n in 0..=16u64 {
            let ok = AccessSize::try_from(n).is_ok();
            assert_eq!(ok, matches!(n, 1 | 2 | 4 | 8), "width {n}");
        }
    }

    #[test]
    fn test_access_size_mask_matches_width() {
        for size in [
            AccessSize::B1,
            AccessSize::B2,
            AccessSize::B4,
            AccessSize::B8,
        ] {
            assert_eq!(u128::from(size.mask()) + 1, 1u128 << (size.bytes() * 8));
        }
    }

    #[test]
    fn test_access_size_serde_round_trip_and_rejects_bad_width() {
        let s = serde_json::to_string(&AccessSize::B4).expect("serialize");
        assert_eq!(s, "4");
        let back: AccessSize = serde_json::from_str(&s).expect("deserialize");
        assert_eq!(back, AccessSize::B4);
        assert!(serde_json::from_str::<AccessSize>("3").is_err());
    }
}
