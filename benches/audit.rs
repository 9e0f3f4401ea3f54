//! Audit log durability cost: `cargo bench --bench audit`. Commands per second when each one
//! waits for its record to be synced (`fdatasync`), for one device (one command at a time,
//! as a session sends them) and for many devices at once (group commit). Results are
//! recorded in docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use gatehouse::audit::{AuditLog, WriterConfig};

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // Run in the target directory, on the same file system as the build (not tmpfs).
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let dir = tempfile::tempdir_in(base).unwrap();
    let (log, _thread) = AuditLog::open(
        WriterConfig {
            dir: dir.path().to_path_buf(),
            segment_bytes: 64 << 20,
            checkpoint_interval: Duration::from_secs(10),
            retention: None,
            metrics: None,
        },
        common::key(),
    )
    .unwrap();
    runtime.block_on(async {
        let n = 2000u64;
        let start = Instant::now();
        for i in 0..n {
            log.record_durable(common::command("one".into(), i)).await.unwrap();
        }
        let e = start.elapsed();
        println!(
            "one device, sequential: {n} commands in {e:.2?} = {:.0} commands/s ({:.0} us each)",
            n as f64 / e.as_secs_f64(),
            e.as_micros() as f64 / n as f64
        );
        for devices in [16u64, 256, 2048] {
            let per = (20_000 / devices).max(4);
            let start = Instant::now();
            let mut tasks = Vec::new();
            for d in 0..devices {
                let log = log.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..per {
                        log.record_durable(common::command(format!("dev-{d}"), i)).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let e = start.elapsed();
            let total = devices * per;
            println!(
                "{devices} devices at once: {total} commands in {e:.2?} = {:.0} commands/s in total, {:.0} per device",
                total as f64 / e.as_secs_f64(),
                per as f64 / e.as_secs_f64()
            );
        }
    });
}
