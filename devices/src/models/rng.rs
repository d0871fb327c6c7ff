// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! virtio-rng (virtio 1.2, 5.4): entropy from the OS, optionally rate limited.
//!
//! One queue; each request is a set of device-writable buffers, filled with
//! bytes from `getrandom`. Without a rate limit a request is answered on the
//! queue worker at once. With one, requests go to a limiter thread that
//! answers each as soon as the byte budget allows, through the
//! [`Completer`]; requests waiting there are in flight, so a GET_VRING_BASE
//! waits for them (at most `max request size / rate` seconds).

use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::models::virtio::{Completer, Handled, Request, VirtioDevice};

/// virtio device ID of an entropy device.
pub const VIRTIO_ID_RNG: u32 = 4;

/// The device kind, as in a topology file and in logs.
pub const KIND: &str = "virtio-rng";

/// Bytes given per request at most: the Linux driver asks for up to a page
/// or so; a guest asking for more gets a short (valid) answer.
const MAX_FILL: u64 = 64 * 1024;

/// A token bucket of bytes.
#[derive(Debug)]
struct Bucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// How long until `n` bytes may be given, after taking them.
    fn take(&mut self, n: u64) -> Duration {
        let now = Instant::now();
        let burst = self.rate as f64;
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * burst).min(burst);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / burst)
        }
    }
}

/// The virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    limiter: Option<Mutex<crossbeam_channel::Sender<(Request, Completer)>>>,
    /// Bytes per second, if limited: also the most one request gets.
    rate: Option<u64>,
}

/// What replay needs to rebuild an [`Rng`] (the log header holds it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngRebuild {
    /// The rate limit in bytes per second, if any.
    pub bytes_per_second: Option<u64>,
}

/// Fills the request's writable buffers (up to `limit` bytes) with entropy;
/// returns the bytes written. The entropy is an input of the request, so
/// it is recorded and a replay gets the same bytes.
fn fill(request: &mut Request, limit: u64) -> u32 {
    thread_local! {
        /// The entropy on its way to the guest: one buffer per thread,
        /// zeroed for each request, so that a request allocates nothing.
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    request.set_kind("entropy");
    let n = request.writable_len().min(limit).min(MAX_FILL) as usize;
    BUF.with_borrow_mut(|buf| {
        // Zeroed, so that no byte of an earlier request's entropy can
        // reach this one's guest.
        buf.clear();
        buf.resize(n, 0);
        // Taken as an input and written to the guest in one step, so that
        // a recording captures (hashes or copies) the entropy once.
        let filled = request.input_into_guest("entropy", 0, buf, 0, |b| {
            getrandom::fill(b).map_err(|e| {
                std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO))
            })
        });
        match filled {
            Ok(()) => n as u32,
            Err(e) => {
                tracing::warn!(error = %e, "fill the request with entropy; answering with no bytes");
                0
            }
        }
    })
}

impl Rng {
    /// An entropy device; `bytes_per_second` limits the rate if given (and
    /// non-zero).
    pub fn new(bytes_per_second: Option<u64>) -> std::io::Result<Self> {
        let Some(rate) = bytes_per_second.filter(|r| *r > 0) else {
            return Ok(Rng {
                limiter: None,
                rate: None,
            });
        };
        let (tx, rx) = crossbeam_channel::unbounded::<(Request, Completer)>();
        thread::Builder::new()
            .name("rng-limiter".into())
            .spawn(move || {
                let mut bucket = Bucket {
                    rate,
                    tokens: rate as f64,
                    last: Instant::now(),
                };
                // Ends when the device (the only sender) is dropped.
                for (mut request, done) in rx {
                    let want = request.writable_len().min(MAX_FILL).min(rate);
                    let wait = bucket.take(want);
                    if !wait.is_zero() {
                        thread::sleep(wait);
                    }
                    let len = fill(&mut request, want);
                    done.complete(request, len);
                }
            })?;
        Ok(Rng {
            limiter: Some(Mutex::new(tx)),
            rate: Some(rate),
        })
    }

    /// What replay needs to rebuild this device.
    pub fn rebuild_info(&self) -> RngRebuild {
        RngRebuild {
            bytes_per_second: self.rate,
        }
    }

    /// A device rebuilt for replay: the same answers, at once (the rate
    /// limit bounds each request's size as it did, but nothing waits).
    pub fn replay(info: &RngRebuild) -> Self {
        Rng {
            limiter: None,
            rate: info.bytes_per_second.filter(|r| *r > 0),
        }
    }
}

impl VirtioDevice for Rng {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn num_queues(&self) -> usize {
        1
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn rebuild_info(&self) -> Result<serde_json::Value, String> {
        serde_json::to_value(Rng::rebuild_info(self)).map_err(|e| e.to_string())
    }

    fn handle(&self, mut request: Request, done: &Completer) -> Handled {
        match &self.limiter {
            None => {
                let len = fill(&mut request, self.rate.unwrap_or(MAX_FILL));
                Handled::Done { request, len }
            }
            Some(tx) => {
                let tx = tx.lock().unwrap_or_else(|e| e.into_inner());
                match tx.send((request, done.clone())) {
                    Ok(()) => Handled::Pending,
                    Err(crossbeam_channel::SendError((request, _))) => {
                        tracing::error!("rng limiter thread is gone");
                        Handled::Done { request, len: 0 }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::models::virtio::mock::{
        Completions, Desc, MockDriver, MockGuest, DATA_BASE, HIGH_RAM_BASE,
    };

    const SENTINEL: u8 = 0x5a;

    /// Whether `b` was overwritten: 16 or more random bytes all equal to the
    /// sentinel have a chance of 2^-128.
    fn filled(b: &[u8]) -> bool {
        b.iter().any(|x| *x != SENTINEL)
    }

    #[test]
    fn test_fills_every_writable_buffer() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let done = Completions::new();
        let bufs = [
            (DATA_BASE, 16),
            (DATA_BASE + 0x1000, 32),
            (HIGH_RAM_BASE, 64),
        ];
        for (addr, len) in bufs {
            guest.fill(addr, len + 16, SENTINEL);
        }
        driver.add_chain(&bufs.map(|(a, l)| Desc::w(a, l as u32)));
        let rng = Rng::new(None).expect("rng");
        let Handled::Done { request, len } = rng.handle(driver.walk_one(), done.completer()) else {
            panic!("an unlimited rng answers at once");
        };
        driver.finish(request, len);
        assert_eq!(len, 112);
        for (addr, len) in bufs {
            let got = guest.read(addr, len + 16);
            assert!(filled(&got[..len]), "buffer at {addr:#x} not filled");
            assert!(filled(&got[len - 16..len]), "end of {addr:#x} not filled");
            assert_eq!(&got[len..], &[SENTINEL; 16], "past the buffer at {addr:#x}");
        }
        assert_eq!(driver.used(), vec![(0, 112)]);
        assert!(done.drain().is_empty());
    }

    #[test]
    fn test_leaves_readable_buffers_alone() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let done = Completions::new();
        guest.fill(DATA_BASE, 32, SENTINEL);
        guest.fill(DATA_BASE + 0x1000, 32, SENTINEL);
        driver.add_indirect_chain(&[Desc::r(DATA_BASE, 32), Desc::w(DATA_BASE + 0x1000, 32)]);
        let rng = Rng::new(None).expect("rng");
        let Handled::Done { request, len } = rng.handle(driver.walk_one(), done.completer()) else {
            panic!("an unlimited rng answers at once");
        };
        driver.finish(request, len);
        assert_eq!(len, 32);
        assert_eq!(guest.read(DATA_BASE, 32), vec![SENTINEL; 32]);
        assert!(filled(&guest.read(DATA_BASE + 0x1000, 32)));
    }

    #[test]
    fn test_gives_at_most_64_kib_per_request() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let done = Completions::new();
        let size = MAX_FILL as usize + 4096;
        guest.fill(DATA_BASE, size, SENTINEL);
        driver.add_chain(&[Desc::w(DATA_BASE, size as u32)]);
        let rng = Rng::new(None).expect("rng");
        let Handled::Done { request, len } = rng.handle(driver.walk_one(), done.completer()) else {
            panic!("an unlimited rng answers at once");
        };
        driver.finish(request, len);
        assert_eq!(u64::from(len), MAX_FILL);
        let got = guest.read(DATA_BASE, size);
        let n = MAX_FILL as usize;
        assert!(filled(&got[n - 16..n]));
        assert_eq!(&got[n..], &vec![SENTINEL; 4096][..]);
    }

    #[test]
    fn test_request_without_writable_buffers_gets_nothing() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let done = Completions::new();
        guest.fill(DATA_BASE, 16, SENTINEL);
        driver.add_chain(&[Desc::r(DATA_BASE, 16)]);
        let rng = Rng::new(None).expect("rng");
        let Handled::Done { request, len } = rng.handle(driver.walk_one(), done.completer()) else {
            panic!("an unlimited rng answers at once");
        };
        driver.finish(request, len);
        assert_eq!(len, 0);
        assert_eq!(guest.read(DATA_BASE, 16), vec![SENTINEL; 16]);
    }

    #[test]
    fn test_rate_limited_request_is_answered_later_with_at_most_the_rate() {
        let guest = MockGuest::new();
        let mut driver = MockDriver::new(&guest, 0);
        let done = Completions::new();
        let gate = switchboard_runtime::Gate::running("t", 1, 8);
        guest.fill(DATA_BASE, 256, SENTINEL);
        driver.add_chain(&[Desc::w(DATA_BASE, 256)]);
        let rng = Rng::new(Some(100)).expect("rng");
        assert_eq!(rng.rebuild_info().bytes_per_second, Some(100));
        let mut request = driver.walk_one();
        let ticket = gate
            .admit(
                0,
                switchboard_runtime::Seq(1),
                switchboard_runtime::MessageKind::Request,
            )
            .expect("admitted");
        request.admitted(ticket, done.completer(), rng.fail_status());
        assert!(matches!(
            rng.handle(request, done.completer()),
            Handled::Pending
        ));
        // The first request fits the initial burst: no wait.
        let (request, len) = done.next();
        assert_eq!(gate.in_flight(), 1);
        driver.finish(request, len);
        assert_eq!(gate.in_flight(), 0);
        assert_eq!(len, 100);
        let got = guest.read(DATA_BASE, 256);
        assert!(filled(&got[84..100]));
        assert_eq!(&got[100..], &[SENTINEL; 156][..]);
        assert!(done.drain().is_empty());
    }

    #[test]
    fn test_bucket_allows_a_burst_then_paces() {
        let mut b = Bucket {
            rate: 1000,
            tokens: 1000.0,
            last: Instant::now(),
        };
        assert_eq!(b.take(1000), Duration::ZERO);
        let wait = b.take(500);
        assert!(
            wait >= Duration::from_millis(490) && wait <= Duration::from_millis(510),
            "{wait:?}"
        );
    }
}
