// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What hashing a 4 KiB block costs recording (`--record-data hash`), in
//! time, against copying the same block in the same run:
//!
//! - `copy_4k`: the block copied into a buffer (the baseline);
//! - `hash_4k`: the block hashed as recording hashes it
//!   (`switchboard_runtime::recording::hash`, XXH3-128).
//!
//! Callgrind counts the hash's instructions (about 1,340 for 4 KiB with
//! AVX2), but they are wide ones: this gives the time they take.
//!
//! Run: `cargo bench -p switchboard-integration --bench record_hash`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn block() -> Vec<u8> {
    // Not all one byte: blk_bench's blocks are patterned too.
    (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn bench(c: &mut Criterion) {
    let data = block();
    let mut g = c.benchmark_group("record_hash");
    g.throughput(Throughput::Bytes(data.len() as u64));
    let mut out = vec![0u8; data.len()];
    g.bench_function("copy_4k", |b| {
        b.iter(|| {
            out.copy_from_slice(black_box(&data));
            black_box(&out);
        })
    });
    g.bench_function("hash_4k", |b| {
        b.iter(|| black_box(switchboard_runtime::recording::hash(black_box(&data))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
