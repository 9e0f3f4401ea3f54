//! Cluster store costs: `cargo bench --bench cluster`. Starts a three-node NATS JetStream
//! cluster on loopback (the fixture the cluster tests use; `nats-server` from $NATS_SERVER,
//! PATH or target/tools) and measures, with the stores the gateway runs:
//! - the latency of a durable command record (what a command waits for before it is
//!   forwarded) in the local segment files and in JetStream with 1 and 3 replicas, one device
//!   at a time and 16 at once;
//! - how long a status change written through one gateway's registry takes to reach another
//!   gateway's index (the change feed that closes the device's sessions there), p50 and p99.
//!
//! Results are recorded in docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{command, key};
use gatehouse::audit::AuditStore;
use gatehouse::cluster::{Cluster, NatsAudit, NatsRegistry};
use gatehouse::config::cluster::ClusterConfig;
use gatehouse::model::{DeviceStatus, Enrollment};
use gatehouse::storage::DeviceStore;
use hdrhistogram::Histogram;
use tokio_util::sync::CancellationToken;

fn section(urls: Vec<String>, name: &str, prefix: &str, replicas: usize) -> ClusterConfig {
    ClusterConfig {
        servers: urls,
        name: name.into(),
        replicas,
        prefix: prefix.into(),
        max_staleness: Duration::from_secs(300),
        ownership_ttl: Duration::from_secs(15),
        timeout: Duration::from_secs(5),
        credentials: None,
        tls_ca: None,
        tls_client: None,
    }
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64
}

/// Durable records: one device, one command at a time; then 16 devices at once.
async fn audit_latency(label: &str, store: Arc<dyn AuditStore>) {
    let mut one = Histogram::<u64>::new(3).unwrap();
    let n = 2000u64;
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        store
            .record_durable(command("one".into(), i))
            .await
            .unwrap();
        one.record(t.elapsed().as_micros() as u64).unwrap();
    }
    let e = start.elapsed();
    let mut many = Histogram::<u64>::new(3).unwrap();
    let devices = 16u64;
    let per = 250u64;
    let start_many = Instant::now();
    let mut tasks = Vec::new();
    for d in 0..devices {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).unwrap();
            for i in 0..per {
                let t = Instant::now();
                store
                    .record_durable(command(format!("dev-{d}"), i))
                    .await
                    .unwrap();
                h.record(t.elapsed().as_micros() as u64).unwrap();
            }
            h
        }));
    }
    for t in tasks {
        many.add(t.await.unwrap()).unwrap();
    }
    let e_many = start_many.elapsed();
    println!(
        "{label:<22} one device: p50 {:>6.0} us  p99 {:>6.0} us  ({:.0} commands/s) | 16 devices: p50 {:>6.0} us  p99 {:>6.0} us  ({:.0} commands/s in total)",
        us(&one, 0.5),
        us(&one, 0.99),
        n as f64 / e.as_secs_f64(),
        us(&many, 0.5),
        us(&many, 0.99),
        (devices * per) as f64 / e_many.as_secs_f64()
    );
    assert!(store.sync().await);
}

/// A status change through gateway a's registry, until gateway b's index has it.
async fn propagation(
    urls: Vec<String>,
    prefix: &str,
    replicas: usize,
    shutdown: &CancellationToken,
) {
    let a = Cluster::connect(&section(urls.clone(), "a", prefix, replicas))
        .await
        .unwrap();
    let b = Cluster::connect(&section(urls, "b", prefix, replicas))
        .await
        .unwrap();
    let ra: Arc<dyn DeviceStore> =
        Arc::new(NatsRegistry::open(&a, shutdown.clone()).await.unwrap());
    let rb: Arc<dyn DeviceStore> =
        Arc::new(NatsRegistry::open(&b, shutdown.clone()).await.unwrap());
    let n = 500usize;
    let enrollments: Vec<Enrollment> = (0..n)
        .map(|i| Enrollment {
            id: format!("dev-{i:04}"),
            device_type: "env-sensor".into(),
            sha256: format!("{:064x}", i + 1),
            labels: Default::default(),
        })
        .collect();
    let writer = ra.clone();
    tokio::task::spawn_blocking(move || writer.enroll_many(enrollments))
        .await
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rb.len() < n {
        assert!(Instant::now() < deadline, "b never saw the enrollment");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut seen = Histogram::<u64>::new(3).unwrap();
    let mut acked = Histogram::<u64>::new(3).unwrap();
    let mut feed = rb.subscribe();
    for i in 0..n {
        let id = format!("dev-{i:04}");
        let writer = ra.clone();
        let target = id.clone();
        let t = Instant::now();
        let write = tokio::task::spawn_blocking(move || {
            let r = writer.set_status(&target, DeviceStatus::Revoked);
            (r, Instant::now())
        });
        loop {
            let change = tokio::time::timeout(Duration::from_secs(5), feed.recv())
                .await
                .expect("no change reached b within 5 s")
                .unwrap();
            if change.device.id == id && change.device.status == DeviceStatus::Revoked {
                break;
            }
        }
        seen.record(t.elapsed().as_micros() as u64).unwrap();
        let (r, done) = write.await.unwrap();
        r.unwrap();
        acked.record((done - t).as_micros() as u64).unwrap();
    }
    println!(
        "revocation, {replicas} replica(s): written through a p50 {:.0} us p99 {:.0} us; in b's index p50 {:.0} us  p99 {:.0} us  max {:.0} us ({n} devices, one at a time)",
        us(&acked, 0.5),
        us(&acked, 0.99),
        us(&seen, 0.5),
        us(&seen, 0.99),
        seen.max() as f64
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let binary = gatehouse_sim::nats::find_or_install().unwrap();
        let nats = gatehouse_sim::nats::NatsCluster::start_with(binary, 3)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();

        let (_dir, log, _thread) = common::local_log();
        audit_latency("local segments", Arc::new(log)).await;
        for replicas in [1usize, 3] {
            let prefix = format!("bench-r{replicas}");
            let c = Cluster::connect(&section(nats.urls(), "a", &prefix, replicas))
                .await
                .unwrap();
            let store = NatsAudit::open(&c, key(), Duration::from_secs(10), None)
                .await
                .unwrap();
            audit_latency(&format!("JetStream R{replicas}"), Arc::new(store)).await;
        }
        for replicas in [1usize, 3] {
            propagation(
                nats.urls(),
                &format!("prop-r{replicas}"),
                replicas,
                &shutdown,
            )
            .await;
        }
        shutdown.cancel();
    });
}
