// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Containing SIGBUS from guest memory whose file a frontend shrank.
//!
//! Guest RAM reaches a vhost-user backend as file descriptors (memfds,
//! hugetlbfs or tmpfs files) that the backend maps shared. The frontend
//! keeps the file, and can `ftruncate` it after the backend mapped it: the
//! kernel then takes the lost pages out of every mapping, and the next
//! access to one raises SIGBUS, which kills the process by default, and
//! with it every other VM's devices. A size check when the region is mapped
//! (see `memory.rs`) cannot prevent this; only a sealed file
//! (`F_SEAL_SHRINK`) can, and the backend cannot demand one.
//!
//! So the process installs one SIGBUS handler ([`install`]), and every
//! mapping of a frontend's file that can still shrink is entered in a
//! fixed-size, lock-free registry ([`Registration`]) while it is mapped:
//!
//! - **The handler** looks `si_addr` up in the registry. In a registered
//!   mapping, it maps anonymous zero pages over the whole mapping
//!   (`mmap(MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS)`), marks the slot
//!   poisoned, writes the watcher's eventfd and returns: the faulting
//!   access runs again and reads zeros (writes go to memory nobody reads).
//!   Anywhere else, it puts back the disposition it replaced (Rust's own
//!   stack-overflow handler, or the default) and lets the fault happen
//!   again: a real bug still crashes, with the same report as before. A
//!   SIGBUS sent by `kill` or `raise` gets the default disposition and is
//!   raised again: it kills the process, as it would have.
//! - **The watcher**, a thread of its own, wakes on the eventfd and tells
//!   the owner of each newly poisoned slot (a vhost-user server), which
//!   fails its device through its gate, with a reason naming the region.
//!   That disconnects the frontend; every other device keeps serving.
//!
//! Why the handler is async-signal-safe: it takes no lock and allocates
//! nothing. It reads the registry with atomic loads and changes it with
//! atomic compare-and-swaps, and its only calls are thin libc wrappers
//! around one syscall each, touching no user-space state but `errno`
//! (which the handler saves and restores): `mmap` and `write` for a fault
//! it contains; `sigaction`, `signal` and `raise` for one it passes on.
//! All but `mmap` are async-signal-safe in POSIX. `mmap` is not on POSIX's
//! list, but on Linux it is the bare syscall: the locks it takes are the
//! kernel's, and the page fault that raised the signal released them
//! before the signal was delivered.
//!
//! A slot is filled before a mapping is first touched and retired before
//! it is unmapped, and retiring waits until no handler is running
//! (`IN_HANDLER`), so a handler never maps over memory that is no longer
//! the registered mapping.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vmm_sys_util::eventfd::EventFd;

/// Mappings that can be registered at once, in the whole process. A device
/// uses two per region that can shrink (the ring walker's mapping and the
/// guest-memory bus's), so this covers several devices at the advertised
/// 509 slots each. A region that finds the registry full is refused.
const SLOTS: usize = 8192;

/// A slot nobody uses: free to claim.
const FREE: u8 = 0;
/// Claimed by `register`, being filled: the handler ignores it.
const FILLING: u8 = 1;
/// A live mapping: the handler takes faults in it.
const ARMED: u8 = 2;
/// A live mapping the handler zeroed; the watcher has not reported it.
const POISONED: u8 = 3;
/// Zeroed and reported to its owner.
const REPORTED: u8 = 4;
/// Being retired: the handler ignores it, `register` cannot claim it yet.
const RETIRING: u8 = 5;

struct Slot {
    state: AtomicU8,
    /// First byte of the mapping in this process.
    start: AtomicUsize,
    /// Its length in bytes.
    len: AtomicUsize,
    /// The guest-physical address it holds (for the failure reason).
    gpa: AtomicU64,
    /// Who is told when it is poisoned (an [`Owner`]'s id).
    owner: AtomicU64,
}

// A `const` item, so that the array below can repeat it.
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    state: AtomicU8::new(FREE),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    gpa: AtomicU64::new(0),
    owner: AtomicU64::new(0),
};

static REGISTRY: [Slot; SLOTS] = [EMPTY; SLOTS];

/// Handlers running now, on any thread. Retiring a slot waits for zero.
static IN_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// The watcher's eventfd (-1 until [`install`]): written by the handler.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

/// The SIGBUS disposition before ours, put back for a fault that is not in
/// a registered mapping. Set before our handler is installed.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// The result of the one installation.
static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();

/// The callbacks of the owners, by id. Taken only on normal threads (the
/// watcher, and owners coming and going), never in the handler.
type Callback = Arc<dyn Fn(Poisoned) + Send + Sync>;
static OWNERS: Mutex<Option<HashMap<u64, Callback>>> = Mutex::new(None);
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// A registered mapping that lost its file's pages and now reads zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Poisoned {
    /// The guest-physical address of the region.
    pub(crate) gpa: u64,
    /// The mapping's length in bytes.
    pub(crate) len: u64,
}

/// Installs the SIGBUS handler and starts the watcher, once per process;
/// later calls return the first call's result.
pub(crate) fn install() -> io::Result<()> {
    INSTALLED
        .get_or_init(|| install_once().map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL)))
        .map_err(io::Error::from_raw_os_error)
}

fn install_once() -> io::Result<()> {
    let wake = EventFd::new(libc::EFD_CLOEXEC)?;
    let fd = wake.as_raw_fd();
    std::thread::Builder::new()
        .name("sigbus-watch".into())
        .spawn(move || watch(wake))?;
    WAKE_FD.store(fd, Ordering::Release);

    // SAFETY: `sigaction` is plain old data; all-zero is a valid value
    // (no handler, empty mask, no flags), and it is only read by the call
    // below, which fills it in.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into
    // `previous`, a valid, writable `sigaction`.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Stored before the handler can run, which reads it.
    let _ = PREVIOUS.set(previous);

    // SAFETY: as above: all-zero is a valid `sigaction`.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
    action.sa_sigaction = handler as usize;
    // SA_ONSTACK: a fault deep in a thread's stack still gets a stack to
    // run on (Rust gives every thread it starts an alternate signal stack).
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `sa_mask` is a valid `sigset_t` inside `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised and names an `extern "C"`
    // handler with the SA_SIGINFO signature; the old action is not needed
    // (it was read above).
    if unsafe { libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The SIGBUS handler. Async-signal-safe: see the module docs.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: `__errno_location` returns this thread's errno, always valid.
    let errno = unsafe { *libc::__errno_location() };
    IN_HANDLER.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the kernel passes a valid `siginfo_t` to an SA_SIGINFO
    // handler; for SIGBUS its address field is the union member read.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // A positive code is a fault raised by the kernel; zero or less is a
    // signal someone sent, which no mapping can explain.
    let zeroed = code > 0 && zero_registered(addr);
    IN_HANDLER.fetch_sub(1, Ordering::SeqCst);
    if zeroed {
        let fd = WAKE_FD.load(Ordering::Acquire);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to the watcher's
        // eventfd, open for the life of the process. A failed write loses
        // only the wake-up; nothing to do about it here.
        let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    } else {
        chain(sig, code);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// If `addr` is in a registered mapping, maps zero pages over all of it,
/// marks it poisoned and returns true.
fn zero_registered(addr: usize) -> bool {
    for slot in &REGISTRY {
        let state = slot.state.load(Ordering::SeqCst);
        if !matches!(state, ARMED | POISONED | REPORTED) {
            continue;
        }
        let (start, len) = (
            slot.start.load(Ordering::Relaxed),
            slot.len.load(Ordering::Relaxed),
        );
        if addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: [start, start + len) is a live mapping of guest memory:
        // its slot is armed (or poisoned), so it is registered, and it is
        // retired, which waits for this handler to return (IN_HANDLER),
        // before it is unmapped. Replacing it with private zero pages
        // changes what Rust code reading guest memory sees (which is
        // shared with the guest and read only through volatile accesses),
        // not the validity of any Rust object.
        let mapped = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return false;
        }
        let _ = slot
            .state
            .compare_exchange(ARMED, POISONED, Ordering::SeqCst, Ordering::SeqCst);
        return true;
    }
    false
}

/// A fault outside the registry: puts back the disposition ours replaced
/// (Rust's own handler, or the default), and the fault, which runs again
/// when the handler returns, is handled as without us. A sent signal: the
/// default disposition (Rust's handler ignores a SIGBUS that is not a
/// fault), and the signal raised again, delivered once the handler returns.
fn chain(sig: libc::c_int, code: libc::c_int) {
    match PREVIOUS.get() {
        Some(previous) if code > 0 => {
            // SAFETY: `previous` is the action read at installation, a
            // valid `sigaction`.
            unsafe { libc::sigaction(sig, previous, std::ptr::null_mut()) };
        }
        _ => {
            // SAFETY: `signal` with SIG_DFL only sets the disposition.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    if code <= 0 {
        // SAFETY: `raise` only sends the signal to this thread; it is
        // blocked while the handler runs and delivered when it returns.
        unsafe { libc::raise(sig) };
    }
}

/// The watcher: reports each newly poisoned slot to its owner.
fn watch(wake: EventFd) {
    loop {
        // Blocks until the handler writes; a failed read (EINTR) retries.
        let _ = wake.read();
        let mut found = Vec::new();
        for slot in &REGISTRY {
            if slot.state.load(Ordering::SeqCst) != POISONED {
                continue;
            }
            // Read before the exchange: a slot is refilled only after it
            // was retired, which the exchange below would then see.
            let poisoned = Poisoned {
                gpa: slot.gpa.load(Ordering::Relaxed),
                len: slot.len.load(Ordering::Relaxed) as u64,
            };
            let owner = slot.owner.load(Ordering::Relaxed);
            if slot
                .state
                .compare_exchange(POISONED, REPORTED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                found.push((owner, poisoned));
            }
        }
        for (owner, poisoned) in found {
            let callback = OWNERS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .and_then(|m| m.get(&owner).cloned());
            match callback {
                Some(f) => f(poisoned),
                None => tracing::error!(
                    gpa = poisoned.gpa,
                    "guest memory lost its file's pages, and its device is gone"
                ),
            }
        }
    }
}

/// Someone told when a mapping it registered is poisoned. Dropping it
/// forgets the callback.
#[derive(Debug)]
pub(crate) struct Owner {
    id: u64,
}

impl Owner {
    /// An owner whose `on_poison` runs on the watcher thread for each of
    /// its mappings that the handler zeroed.
    pub(crate) fn new(on_poison: impl Fn(Poisoned) + Send + Sync + 'static) -> Owner {
        let id = NEXT_OWNER.fetch_add(1, Ordering::Relaxed);
        OWNERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(id, Arc::new(on_poison));
        Owner { id }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        if let Some(m) = OWNERS.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            m.remove(&self.id);
        }
    }
}

/// A mapping entered in the registry. Drop it before the mapping is
/// unmapped: the drop retires the slot and waits for running handlers.
#[derive(Debug)]
pub(crate) struct Registration {
    slot: usize,
}

impl Registration {
    /// Registers the mapping `[start, start + len)` of the region at
    /// guest address `gpa`, for `owner`. `None` if the registry is full.
    /// The handler must be installed ([`install`]) for it to matter.
    pub(crate) fn new(owner: &Owner, start: usize, len: usize, gpa: u64) -> Option<Registration> {
        for (i, slot) in REGISTRY.iter().enumerate() {
            if slot
                .state
                .compare_exchange(FREE, FILLING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                slot.start.store(start, Ordering::Relaxed);
                slot.len.store(len, Ordering::Relaxed);
                slot.gpa.store(gpa, Ordering::Relaxed);
                slot.owner.store(owner.id, Ordering::Relaxed);
                // Publishes the fields to the handler's load of the state.
                slot.state.store(ARMED, Ordering::SeqCst);
                return Some(Registration { slot: i });
            }
        }
        None
    }

    /// Whether the handler zeroed this mapping.
    #[cfg(test)]
    pub(crate) fn poisoned(&self) -> bool {
        matches!(
            REGISTRY[self.slot].state.load(Ordering::SeqCst),
            POISONED | REPORTED
        )
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let slot = &REGISTRY[self.slot];
        slot.state.store(RETIRING, Ordering::SeqCst);
        // A handler that saw the slot armed incremented IN_HANDLER before
        // that load, so before the store above: wait for it. One that
        // starts now sees RETIRING and leaves the mapping alone.
        while IN_HANDLER.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        slot.state.store(FREE, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;
    use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

    fn memfd(len: u64) -> std::fs::File {
        let fd = rustix::fs::memfd_create("sigbus-test", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd_create");
        let file = std::fs::File::from(fd);
        file.set_len(len).expect("size the memfd");
        file
    }

    #[test]
    fn test_a_shrunk_registered_mapping_reads_zeros_and_its_owner_is_told() {
        install().expect("install the handler");
        let file = memfd(1 << 20);
        let region = MmapRegion::<()>::from_file(
            FileOffset::new(file.try_clone().expect("dup"), 0),
            1 << 20,
        )
        .expect("map");
        region
            .get_ref::<u64>(0x8_0000)
            .expect("in range")
            .store(0x1234);
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let owner = Owner::new(move |p| {
            let _ = tx.lock().expect("sender").send(p);
        });
        let reg = Registration::new(&owner, region.as_ptr() as usize, region.size(), 0x4000_0000)
            .expect("a free slot");
        file.set_len(4096).expect("shrink the memfd");
        // Past the new end of the file: SIGBUS, zeroed, read again.
        let v = region.get_ref::<u64>(0x8_0000).expect("in range").load();
        assert_eq!(v, 0);
        assert!(reg.poisoned());
        let told = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("owner told");
        assert_eq!(
            told,
            Poisoned {
                gpa: 0x4000_0000,
                len: 1 << 20
            }
        );
        // The whole mapping is zeros now, the part the file kept too.
        assert_eq!(region.get_ref::<u64>(0).expect("in range").load(), 0);
        drop(reg);
        drop(region);
    }

    const CHILD: &str = "SWITCHBOARD_SIGBUS_TEST_CHILD";

    /// Runs the test `name` of this binary in a child process with
    /// `CHILD=mode`; returns the signal that ended it.
    fn child(name: &str, mode: &str) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", name, "--test-threads=1"])
            .env(CHILD, mode)
            .output()
            .expect("run the child");
        out.status.signal()
    }

    #[test]
    fn test_a_fault_outside_the_registry_or_a_sent_sigbus_still_kills_the_process() {
        const NAME: &str = "vhost_user::sigbus::tests::\
                            test_a_fault_outside_the_registry_or_a_sent_sigbus_still_kills_the_process";
        match std::env::var(CHILD).as_deref() {
            Ok("fault") => {
                install().expect("install the handler");
                let file = memfd(4096);
                // Two pages of a one-page file, never registered.
                let region =
                    MmapRegion::<()>::from_file(FileOffset::new(file, 0), 8192).expect("map");
                let _ = region.get_ref::<u64>(4096).expect("in range").load();
                std::process::exit(0);
            }
            Ok("sent") => {
                install().expect("install the handler");
                // SAFETY: sends SIGBUS to this (child) process's thread.
                unsafe { libc::raise(libc::SIGBUS) };
                std::process::exit(0);
            }
            _ => {
                assert_eq!(child(NAME, "fault"), Some(libc::SIGBUS), "a fault");
                assert_eq!(child(NAME, "sent"), Some(libc::SIGBUS), "a sent SIGBUS");
            }
        }
    }
}
