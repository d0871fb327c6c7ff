// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A frontend's memory table, checked before anything touches it, and the
//! SIGBUS registry's entries for the mappings of files that can shrink.
//!
//! The vhost-user-backend crate maps every region of a SET_MEM_TABLE or an
//! ADD_MEM_REG as the frontend describes it, then calls the backend's
//! `update_memory`. Nothing reads the new mappings before that call returns
//! (the ring walker reads rings only through the memory the server
//! accepted, see `Shared::mem`), so the server checks them there:
//!
//! - each new region against its file ([`check_region`]): the file must be
//!   a regular file (a memfd, tmpfs or hugetlbfs file), and `mmap_offset +
//!   size` must neither overflow nor pass the file's size, so that no page
//!   of the mapping lies past the end of the file (an access there raises
//!   SIGBUS). The vhost crate already refuses a SET_MEM_TABLE region whose
//!   guest, user or file end overflows; its ADD_MEM_REG checks none of it.
//! - the table against the limits: at most [`MAX_MEM_SLOTS`] regions (what
//!   the crate answers to GET_MAX_MEM_SLOTS), and at most
//!   [`MAX_TABLE_REGIONS`] sent at once in a SET_MEM_TABLE.
//!
//! A refused table is answered with an error (the crate then NACKs the
//! message and closes the connection), and the crate's memory is put back
//! as it was, so the refused mappings are unmapped at once.
//!
//! A file can still shrink after it was checked, unless it is sealed
//! against it (`F_SEAL_SHRINK`; QEMU's `memory-backend-memfd` seals its
//! memfds by default, `seal=on`). The mappings of an unsealed file are
//! entered in the SIGBUS registry (`sigbus.rs`) for as long as they are
//! mapped: [`Guard`] holds each one with its registration, and lets go of
//! both (registration first) only once nothing else holds the mapping.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use switchboard_bus::RamRegion;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use super::sigbus::{Owner, Poisoned, Registration};

/// The most regions a memory table may hold: what vhost-user-backend
/// answers to VHOST_USER_GET_MAX_MEM_SLOTS (509, the KVM limit of old).
pub const MAX_MEM_SLOTS: usize = 509;

/// The most regions one SET_MEM_TABLE may carry: QEMU's
/// `VHOST_MEMORY_BASELINE_NREGIONS`, the most it ever sends at once (with
/// CONFIGURE_MEM_SLOTS it sends larger tables one ADD_MEM_REG at a time).
pub const MAX_TABLE_REGIONS: usize = 8;

/// Why a memory table was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The region was given without a file.
    #[error("Memory region {index} (guest {gpa:#x}, {size:#x} bytes) has no file")]
    NoFile {
        /// Its place in the table, by guest address.
        index: usize,
        /// Guest-physical address.
        gpa: u64,
        /// Size in bytes.
        size: u64,
    },
    /// fstat on the region's file failed.
    #[error("Inspect the file of memory region {index} (guest {gpa:#x}, {size:#x} bytes)")]
    Stat {
        /// Its place in the table, by guest address.
        index: usize,
        /// Guest-physical address.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The region's file is not a regular file.
    #[error(
        "Memory region {index} (guest {gpa:#x}, {size:#x} bytes, file offset {offset:#x}): \
         its file is not a regular file"
    )]
    NotRegular {
        /// Its place in the table, by guest address.
        index: usize,
        /// Guest-physical address.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// Offset into the file.
        offset: u64,
    },
    /// The region's guest or file end overflows.
    #[error(
        "Memory region {index} (guest {gpa:#x}, {size:#x} bytes, file offset {offset:#x}): \
         its end overflows"
    )]
    Overflow {
        /// Its place in the table, by guest address.
        index: usize,
        /// Guest-physical address.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// Offset into the file.
        offset: u64,
    },
    /// The region reaches past the end of its file.
    #[error(
        "Memory region {index} (guest {gpa:#x}, {size:#x} bytes, file offset {offset:#x}) \
         ends past the end of its file ({file_size:#x} bytes)"
    )]
    PastEnd {
        /// Its place in the table, by guest address.
        index: usize,
        /// Guest-physical address.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// Offset into the file.
        offset: u64,
        /// The file's size.
        file_size: u64,
    },
    /// The table holds more regions than the slots advertised.
    #[error("The memory table would hold {regions} regions, more than the {max} slots advertised")]
    TooManySlots {
        /// Regions in the table.
        regions: usize,
        /// The limit.
        max: usize,
    },
    /// A SET_MEM_TABLE carried more regions than one may.
    #[error("SET_MEM_TABLE carried {regions} regions, more than {max}")]
    TooManyInTable {
        /// Regions in the message.
        regions: usize,
        /// The limit.
        max: usize,
    },
    /// No room was left in the SIGBUS registry for the region's mapping.
    #[error(
        "Memory region {index} (guest {gpa:#x}): no room left to guard its mapping \
         against its file shrinking"
    )]
    RegistryFull {
        /// Its place in the table, by guest address.
        index: usize,
        /// Guest-physical address.
        gpa: u64,
    },
}

/// Result of checking a memory table.
pub(crate) type Result<T> = std::result::Result<T, Error>;

/// Checks region `index` of a table against its file; returns whether the
/// file is sealed against shrinking.
pub(crate) fn check_region(index: usize, region: &GuestRegionMmap) -> Result<bool> {
    let (gpa, size) = (region.start_addr().0, region.len());
    let fo = region
        .file_offset()
        .ok_or(Error::NoFile { index, gpa, size })?;
    let offset = fo.start();
    let stat = rustix::fs::fstat(fo.file()).map_err(|e| Error::Stat {
        index,
        gpa,
        size,
        source: e.into(),
    })?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(Error::NotRegular {
            index,
            gpa,
            size,
            offset,
        });
    }
    let end = match (gpa.checked_add(size), offset.checked_add(size)) {
        (Some(_), Some(end)) => end,
        _ => {
            return Err(Error::Overflow {
                index,
                gpa,
                size,
                offset,
            })
        }
    };
    let file_size = u64::try_from(stat.st_size).unwrap_or(0);
    if end > file_size {
        return Err(Error::PastEnd {
            index,
            gpa,
            size,
            offset,
            file_size,
        });
    }
    Ok(sealed(fo.file()))
}

/// Whether `file` can no longer shrink (`F_SEAL_SHRINK`). A file that is
/// not a memfd (or a tmpfs or hugetlbfs file with seals) has no seals.
pub(crate) fn sealed(file: impl AsFd) -> bool {
    rustix::fs::fcntl_get_seals(file).is_ok_and(|s| s.contains(rustix::fs::SealFlags::SHRINK))
}

/// Checks `table` (as the crate mapped it) against the limits, and each of
/// its regions that `accepted` (the table accepted before it) does not
/// hold against its file. Returns the new regions whose files can shrink,
/// by their place in `table`.
pub(crate) fn check_table(
    table: &GuestMemoryMmap,
    accepted: &GuestMemoryMmap,
) -> Result<Vec<usize>> {
    if table.num_regions() > MAX_MEM_SLOTS {
        return Err(Error::TooManySlots {
            regions: table.num_regions(),
            max: MAX_MEM_SLOTS,
        });
    }
    // The crate maps every region of a SET_MEM_TABLE anew, and an
    // ADD_MEM_REG adds one: more than one new mapping is a SET_MEM_TABLE.
    let known: HashSet<usize> = accepted.iter().map(|r| r.as_ptr() as usize).collect();
    let new: Vec<(usize, &GuestRegionMmap)> = table
        .iter()
        .enumerate()
        .filter(|(_, r)| !known.contains(&(r.as_ptr() as usize)))
        .collect();
    if new.len() > MAX_TABLE_REGIONS {
        return Err(Error::TooManyInTable {
            regions: new.len(),
            max: MAX_TABLE_REGIONS,
        });
    }
    let mut unsealed = Vec::new();
    for (index, region) in new {
        if !check_region(index, region)? {
            unsealed.push(index);
        }
    }
    Ok(unsealed)
}

/// What keeps a guarded mapping mapped.
enum Mapping {
    /// The crate's mapping, which the ring walker reads.
    Ring(Arc<GuestRegionMmap>),
    /// The guest-memory bus's mapping, which requests' buffers are read and
    /// written through.
    Bus(Arc<RamRegion>),
}

impl Mapping {
    /// Whether anyone but the guard holds it (no weak references to
    /// either exist, so nobody can get it back once this is false).
    fn shared(&self) -> bool {
        match self {
            Mapping::Ring(r) => Arc::strong_count(r) > 1,
            Mapping::Bus(r) => Arc::strong_count(r) > 1,
        }
    }
}

/// A mapping held together with its registration.
struct Guarded {
    /// Declared first: dropped (the slot retired) before the mapping.
    _registration: Registration,
    mapping: Mapping,
}

/// One server's guarded mappings, and the owner their poisoning is
/// reported to.
pub(crate) struct Guard {
    owner: Owner,
    held: Mutex<Vec<Guarded>>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("owner", &self.owner)
            .field("held", &self.held.lock().map(|h| h.len()).unwrap_or(0))
            .finish()
    }
}

impl Guard {
    /// A guard whose `on_poison` runs (on the SIGBUS watcher's thread) for
    /// each of its mappings that lost its file's pages.
    pub(crate) fn new(on_poison: impl Fn(Poisoned) + Send + Sync + 'static) -> Guard {
        Guard {
            owner: Owner::new(on_poison),
            held: Mutex::new(Vec::new()),
        }
    }

    /// Guards the crate's mapping of region `index` of `table`.
    pub(crate) fn ring(&self, table: &GuestMemoryMmap, index: usize) -> Result<()> {
        let Some(region) = table.iter().nth(index) else {
            return Ok(());
        };
        let (gpa, len) = (region.start_addr(), region.len());
        // The table holds its regions as `Arc`s and hands them out only
        // through a removal (of a copy of the table).
        let Ok((_, region)) = table.remove_region(gpa, len) else {
            return Ok(());
        };
        let start = region.as_ptr() as usize;
        self.hold(
            index,
            gpa.0,
            start,
            region.len() as usize,
            Mapping::Ring(region),
        )
    }

    /// Guards the bus's mapping of region `index`, at guest address `gpa`.
    pub(crate) fn bus(&self, index: usize, gpa: u64, region: Arc<RamRegion>) -> Result<()> {
        let (start, len) = (region.host_addr(), region.size() as usize);
        self.hold(index, gpa, start, len, Mapping::Bus(region))
    }

    fn hold(
        &self,
        index: usize,
        gpa: u64,
        start: usize,
        len: usize,
        mapping: Mapping,
    ) -> Result<()> {
        let registration = Registration::new(&self.owner, start, len, gpa)
            .ok_or(Error::RegistryFull { index, gpa })?;
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Guarded {
                _registration: registration,
                mapping,
            });
        Ok(())
    }

    /// Lets go of every mapping nobody else holds any more: its slot is
    /// retired, then it is unmapped.
    pub(crate) fn sweep(&self) {
        let gone: Vec<Guarded> = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let (keep, gone) = std::mem::take(&mut *held)
                .into_iter()
                .partition(|g| g.mapping.shared());
            *held = keep;
            gone
        };
        drop(gone);
    }

    /// Mappings guarded now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{FileOffset, GuestAddress};

    fn memfd(len: u64, seal: bool) -> std::fs::File {
        let flags = rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING;
        let fd = rustix::fs::memfd_create("memory-test", flags).expect("memfd_create");
        let file = std::fs::File::from(fd);
        file.set_len(len).expect("size the memfd");
        if seal {
            rustix::fs::fcntl_add_seals(&file, rustix::fs::SealFlags::SHRINK).expect("seal");
        }
        file
    }

    fn table(regions: &[(u64, u64, u64, &std::fs::File)]) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges_with_files(regions.iter().map(|&(gpa, size, offset, f)| {
            (
                GuestAddress(gpa),
                size as usize,
                Some(FileOffset::new(f.try_clone().expect("dup"), offset)),
            )
        }))
        .expect("map")
    }

    #[test]
    fn test_a_region_within_its_file_is_accepted() {
        let f = memfd(1 << 20, false);
        let t = table(&[(0, 1 << 20, 0, &f)]);
        assert_eq!(
            check_table(&t, &GuestMemoryMmap::new()).expect("ok"),
            vec![0]
        );
    }

    #[test]
    fn test_a_sealed_file_needs_no_guard() {
        let f = memfd(1 << 20, true);
        let t = table(&[(0, 1 << 20, 0, &f)]);
        assert!(check_table(&t, &GuestMemoryMmap::new())
            .expect("ok")
            .is_empty());
    }

    #[test]
    fn test_a_region_larger_than_its_file_is_refused_with_its_numbers() {
        let f = memfd(1 << 20, false);
        let t = table(&[(0x4000_0000, 2 << 20, 0, &f)]);
        let e = check_table(&t, &GuestMemoryMmap::new()).expect_err("past the end");
        assert!(matches!(
            e,
            Error::PastEnd {
                index: 0,
                gpa: 0x4000_0000,
                size: 0x20_0000,
                offset: 0,
                file_size: 0x10_0000
            }
        ));
        let text = e.to_string();
        assert!(
            text.contains("0x40000000") && text.contains("0x100000"),
            "{text}"
        );
    }

    #[test]
    fn test_an_offset_past_the_end_of_the_file_is_refused() {
        let f = memfd(1 << 20, false);
        let t = table(&[(0, 4096, 2 << 20, &f)]);
        let e = check_table(&t, &GuestMemoryMmap::new()).expect_err("past the end");
        assert!(
            matches!(
                e,
                Error::PastEnd {
                    offset: 0x20_0000,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn test_only_new_regions_are_checked_and_counted_against_the_table_limit() {
        let f = memfd(4096 * 10, false);
        let regions: Vec<_> = (0..9)
            .map(|i| (i * 0x1000, 0x1000, i * 0x1000, &f))
            .collect();
        let nine = table(&regions);
        let e = check_table(&nine, &GuestMemoryMmap::new()).expect_err("nine at once");
        assert!(
            matches!(e, Error::TooManyInTable { regions: 9, max: 8 }),
            "{e}"
        );
        // Eight of them accepted before (the same mappings): one is new.
        let last = nine.iter().last().expect("nine");
        let (eight, _) = nine
            .remove_region(last.start_addr(), last.len())
            .expect("remove the last");
        assert_eq!(check_table(&nine, &eight).expect("ok"), vec![8]);
        assert_eq!(check_table(&nine, &nine).expect("ok"), Vec::<usize>::new());
    }

    #[test]
    fn test_a_guarded_mapping_is_let_go_once_nobody_else_holds_it() {
        let f = memfd(1 << 20, false);
        let t = table(&[(0, 1 << 20, 0, &f)]);
        let guard = Guard::new(|_| {});
        guard.ring(&t, 0).expect("guarded");
        guard.sweep();
        assert_eq!(guard.held(), 1, "the table still holds it");
        drop(t);
        guard.sweep();
        assert_eq!(guard.held(), 0);
    }
}
