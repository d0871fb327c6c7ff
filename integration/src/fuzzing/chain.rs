// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Descriptor chains as a guest writes them, walked by virtio-queue into
//! [`Request`]s, and virtio-blk on top of them.
//!
//! The input is what the guest controls in one split virtqueue of
//! [`QUEUE_SIZE`] descriptors on the devices' mock guest: the descriptor
//! table, raw ([`DESC_TABLE`] bytes, 16 per descriptor: address, length,
//! flags, next, little-endian), the available ring's index (2 bytes) and
//! its [`QUEUE_SIZE`] entries (2 bytes each), and then up to
//! [`DATA_MAX`] bytes placed at [`DATA_BASE`] (request headers, data,
//! indirect tables). A short input is padded with zeros. The queue is
//! walked as the server's queue worker walks it, each chain's descriptors
//! go to [`Request::new`] over a fresh guest-memory request, and each
//! request is answered with a used entry.

use std::cell::RefCell;

use switchboard_bus::GuestAddr;
use switchboard_devices::models::blk::{Blk, BlkOptions};
use switchboard_devices::models::virtio::mock::{
    Completions, MockGuest, DATA_BASE, QUEUE_SIZE, RAM_BASE,
};
use switchboard_devices::models::virtio::{
    ChainError, Handled, Request, VirtioDevice, MAX_CHAIN_BYTES,
};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Bytes of the descriptor table at the start of the input.
pub const DESC_TABLE: usize = QUEUE_SIZE as usize * 16;
/// Bytes of the available ring after it: the index, then the entries.
pub const AVAIL: usize = 2 + QUEUE_SIZE as usize * 2;
/// Most bytes of the input placed at [`DATA_BASE`].
pub const DATA_MAX: usize = 64 << 10;
/// Sectors of the fuzzed disk's image: small, so that a fuzzed sector
/// lands inside it often.
const IMAGE_SECTORS: u64 = 64;

thread_local! {
    /// One guest for every input: making one starts an actix system.
    static GUEST: MockGuest = MockGuest::new();
    /// A writable disk, a read-only one (on their own images), and where
    /// they send what they answer later.
    static DISKS: RefCell<Option<Disks>> = const { RefCell::new(None) };
}

struct Disks {
    rw: Blk,
    ro: Blk,
    done: Completions,
    /// The images; removed when dropped.
    _files: [tempfile::NamedTempFile; 2],
}

fn disk(read_only: bool) -> (tempfile::NamedTempFile, Blk) {
    let file = tempfile::NamedTempFile::new().expect("a temporary image");
    file.as_file()
        .set_len(IMAGE_SECTORS * 512)
        .expect("size the image");
    let options = BlkOptions {
        read_only,
        io_threads: 1,
        serial: Some("fuzz".into()),
        ..BlkOptions::default()
    };
    let blk = Blk::open(file.path(), &options).expect("open the image");
    (file, blk)
}

/// Lays `data` out in the guest's queue as the module docs say, walks the
/// available ring as the server does and hands `each` every chain's
/// outcome: the request, or why there is none. `each` hands back a request
/// with its used length, and then the walk answers it as the server does:
/// writes its used entry, then drops it (and its leases), then its ticket.
fn walk(
    data: &[u8],
    mut each: impl FnMut(u16, Result<Request, ChainError>) -> Option<(Request, u32)>,
) {
    GUEST.with(|guest| {
        // The rings, the indirect-table area and the data area, as no input
        // left them.
        guest.fill(RAM_BASE, DATA_BASE as usize + DATA_MAX, 0);
        let mem = guest.memory();
        let ring = MockSplitQueue::create(mem, GuestAddress(RAM_BASE), QUEUE_SIZE);
        let mut table = [0u8; DESC_TABLE];
        let n = data.len().min(DESC_TABLE);
        table[..n].copy_from_slice(&data[..n]);
        mem.write_slice(&table, ring.desc_table_addr())
            .expect("the descriptor table is in guest RAM");
        let mut avail = [0u8; AVAIL];
        let rest = data.get(DESC_TABLE..).unwrap_or_default();
        let n = rest.len().min(AVAIL);
        avail[..n].copy_from_slice(&rest[..n]);
        let word = |i: usize| u16::from_le_bytes([avail[2 * i], avail[2 * i + 1]]);
        ring.avail().idx().store(word(0));
        for i in 0..usize::from(QUEUE_SIZE) {
            ring.avail()
                .ring()
                .ref_at(i)
                .expect("inside the available ring")
                .store(word(i + 1));
        }
        let payload = rest.get(AVAIL..).unwrap_or_default();
        guest.write(DATA_BASE, &payload[..payload.len().min(DATA_MAX)]);

        let mut queue: Queue = ring.create_queue().expect("a valid mock queue");
        let chains: Vec<_> = match queue.iter(mem) {
            Ok(iter) => iter.collect(),
            // An available index more than a queue ahead: the server stops
            // the queue, as here.
            Err(_) => return,
        };
        for chain in chains {
            let head = chain.head_index();
            let descriptors = chain.map(|d| (GuestAddr(d.addr().0), d.len(), d.is_write_only()));
            let request = Request::new(0, head, descriptors, guest.mem_request());
            if let Some((mut request, len)) = each(head, request) {
                let ticket = request.answered();
                // A head past the queue's size (the available ring says
                // anything) walks as an empty chain and gets no used entry:
                // the server logs that and goes on, as here.
                let _ = queue.add_used(mem, request.head(), len);
                drop(request);
                drop(ticket);
            }
        }
    });
}

/// Descriptor chains into [`Request`]s (see the module docs for the input).
/// Checks what a request promises: its readable buffers come before its
/// writable ones and add up to its lengths, at most [`MAX_CHAIN_BYTES`];
/// all of its readable bytes can be read and all of its writable bytes
/// written, and one byte past either end cannot.
pub fn fuzz_virtio_chain(data: &[u8]) {
    walk(data, |head, request| {
        let mut request = request.ok()?;
        assert_eq!(request.head(), head);
        let sum = |segs: &[switchboard_devices::models::virtio::Segment]| {
            segs.iter().map(|s| u64::from(s.len)).sum::<u64>()
        };
        let (readable, writable) = (request.readable_len(), request.writable_len());
        assert_eq!(sum(request.readable()), readable);
        assert_eq!(sum(request.writable()), writable);
        assert!(readable + writable <= MAX_CHAIN_BYTES);
        // Bounded so that a 64 MiB chain costs no 64 MiB buffer.
        let mut buf = vec![0u8; readable.min(1 << 16) as usize];
        request
            .read_at(readable - buf.len() as u64, &mut buf)
            .expect("the readable bytes read");
        assert!(request.read_at(readable, &mut [0u8]).is_err());
        let mut buf = vec![0xa5u8; writable.min(1 << 16) as usize];
        request
            .write_at(writable - buf.len() as u64, &buf)
            .expect("the writable bytes written");
        assert!(request.write_at(writable, &[0u8]).is_err());
        if readable > 0 {
            buf.truncate(1);
            request
                .read_at(0, &mut buf)
                .expect("the first readable byte");
        }
        let len = u32::try_from(writable).unwrap_or(u32::MAX);
        Some((request, len))
    });
}

/// virtio-blk requests: the first input byte chooses the writable disk
/// (even) or the read-only one (odd); the rest are descriptor chains as
/// for [`fuzz_virtio_chain`], on a 64-sector image. Each request is
/// handled as the server's queue worker does (a malformed chain is
/// rejected), and must be answered, at once or through the completer
/// within [`Completions::TIMEOUT`], with a used length no larger than its
/// writable bytes.
pub fn fuzz_blk_request(data: &[u8]) {
    let Some((&which, chains)) = data.split_first() else {
        return;
    };
    DISKS.with(|disks| {
        let mut disks = disks.borrow_mut();
        let disks = disks.get_or_insert_with(|| {
            let (f0, rw) = disk(false);
            let (f1, ro) = disk(true);
            Disks {
                rw,
                ro,
                done: Completions::new(),
                _files: [f0, f1],
            }
        });
        let blk = if which % 2 == 0 { &disks.rw } else { &disks.ro };
        walk(chains, |head, request| match request {
            Ok(request) => {
                let writable = request.writable_len();
                let (request, len) = match blk.handle(request, disks.done.completer()) {
                    Handled::Done { request, len } => (request, len),
                    Handled::Pending => {
                        blk.end_batch(0);
                        disks.done.next()
                    }
                };
                assert!(u64::from(len) <= writable, "used length past the buffers");
                assert!(disks.done.drain().is_empty(), "answered once");
                Some((request, len))
            }
            Err(e) => {
                blk.reject(0, head, &e);
                None
            }
        });
    });
}
