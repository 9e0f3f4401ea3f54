//! Audit log durability cost: `cargo bench --bench audit`. Commands per second when each one
//! waits for its record to be synced (`fdatasync`), for one device (one command at a time,
//! as a session sends them) and for many devices at once (group commit). Results are
//! recorded in docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Instant;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_dir, log, _thread) = common::local_log();
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
