//! The fleet simulator against a real gateway over TLS: worker processes whose reports merge,
//! the payload generator's frames through validation, reconnects after a gateway restart,
//! the never-reconnect share, and Retry-After read from a real refusal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gatehouse::config::template::{Template, TemplateRoute};
use gatehouse::model::Enrollment;
use gatehouse_pki::PkiDir;
use gatehouse_sim::backends::{self, BackendStats, Kind};
use gatehouse_sim::device::{self, Refused, Target};
use gatehouse_sim::fleet::{self, Backoff, FleetOptions, FleetReport, Live};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn schemas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas")
}

/// A pki directory with `n` env-sensors, a sample ingest backend, and what a gateway needs.
struct Lab {
    dir: tempfile::TempDir,
    pki: PkiDir,
    enrollments: Vec<Enrollment>,
    ingest: SocketAddr,
    ingest_stats: Arc<BackendStats>,
    stop: CancellationToken,
}

impl Lab {
    async fn new(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut pki = PkiDir::init(&dir.path().join("pki"), false).unwrap();
        pki.issue_server(&["localhost".into()], &["127.0.0.1".parse().unwrap()])
            .unwrap();
        let (fleet, _) = pki.issue_fleet("env-sensor", n, "s").unwrap();
        let enrollments = fleet
            .devices
            .iter()
            .map(|e| Enrollment {
                id: e.id.clone(),
                device_type: e.device_type.clone(),
                sha256: e.sha256.clone(),
                labels: Default::default(),
            })
            .collect();
        let stop = CancellationToken::new();
        let ingest_stats = Arc::new(BackendStats::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ingest = listener.local_addr().unwrap();
        tokio::spawn(backends::serve(
            listener,
            Kind::Ingest,
            ingest_stats.clone(),
            stop.clone(),
        ));
        Self {
            dir,
            pki,
            enrollments,
            ingest,
            ingest_stats,
            stop,
        }
    }

    /// A gateway on `listener` with its own registry `name`, every device enrolled.
    async fn gateway(&self, name: &str, listener: TcpListener, server: &[&str]) -> Gateway {
        let text = Template {
            listen: listener.local_addr().unwrap().to_string(),
            server: server.iter().map(|s| s.to_string()).collect(),
            pki_dir: self.dir.path().join("pki").display().to_string(),
            registry: self.dir.path().join(name).display().to_string(),
            cluster: None,
            schemas_dir: schemas().display().to_string(),
            admin: None,
            audit: None,
            routes: vec![TemplateRoute {
                subprotocol: "telemetry.v1".into(),
                kind: "telemetry".into(),
                device_types: vec!["env-sensor".into()],
                backends: vec![format!("ws://{}/ingest", self.ingest)],
            }],
            limits: Vec::new(),
        }
        .render();
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let stop = CancellationToken::new();
        let server = gatehouse::Server::new(gatehouse::Config::load(&path).unwrap(), stop.clone())
            .await
            .unwrap();
        server
            .registry()
            .enroll_many(self.enrollments.clone())
            .unwrap();
        let task = tokio::spawn(server.serve(listener, None));
        Gateway { stop, task }
    }

    fn target(&self, addr: SocketAddr) -> Target {
        Target::parse(&format!("wss://localhost:{}/", addr.port())).unwrap()
    }

    fn devices(&self) -> Vec<fleet::FleetDevice> {
        let roots = device::roots(&self.pki.dir().join("ca.pem")).unwrap();
        fleet::from_pki_dir(self.pki.dir(), &roots, None).unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Gateway {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), gatehouse::server::ServerError>>,
}

impl Gateway {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_run_one_fleet_and_their_reports_merge() {
    let lab = Lab::new(40).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gateway = lab.gateway("registry", listener, &[]).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gatehouse-sim"))
        .args([
            "fleet",
            "--url",
            &format!("wss://localhost:{}/", addr.port()),
        ])
        .arg("--dir")
        .arg(lab.pki.dir())
        .arg("--schemas")
        .arg(schemas())
        .args(["--workers", "2", "--rate", "10", "--seconds", "3"])
        .args(["--format", "mix", "--invalid-share", "0.1", "--seed", "5"])
        .args(["--backend-stats", &format!("ws://{}", lab.ingest), "--json"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("over 2 worker processes"), "{stderr}");
    assert!(stderr.contains("connected 40/40"), "{stderr}");
    let report: FleetReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report.processes, 2);
    assert_eq!(report.devices, 40);
    assert_eq!(report.connected, 40);
    assert_eq!(report.sessions, 40);
    assert_eq!(report.handshake.count(), 40);
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.closes.get(&1000), Some(&40));
    // About 30 frames per device; a tenth of them invalid, each answered by an error frame
    // and none delivered.
    assert!(report.frames_sent >= 40 * 25, "{}", report.frames_sent);
    let invalid_share = report.invalid_sent as f64 / report.frames_sent as f64;
    assert!((0.05..0.15).contains(&invalid_share), "{invalid_share}");
    assert_eq!(report.error_frames, report.invalid_sent);
    let valid = report.frames_sent - report.invalid_sent;
    let backends = report.backends.as_ref().expect("backend figures");
    assert_eq!(backends.frames, valid);
    assert_eq!(backends.telemetry.count(), valid);
    assert!(backends.telemetry.quantile_ms(0.5) < 100.0);
    assert_eq!(
        lab.ingest_stats
            .frames
            .load(std::sync::atomic::Ordering::Relaxed),
        valid
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_gets_the_whole_fleet_back_except_those_that_never_reconnect() {
    let lab = Lab::new(30).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = lab.gateway("registry-a", listener, &[]).await;
    let live = Arc::new(Live::default());
    let options = FleetOptions {
        rate_hz: 2.0,
        duration: Duration::from_secs(10),
        connect_rate: 200,
        connect_timeout: Duration::from_secs(5),
        reconnect: Some(Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(800),
            never_share: 0.3,
            ..Backoff::default()
        }),
        seed: 11,
        ..FleetOptions::new(lab.target(addr), "telemetry.v1")
    };
    let fleet = tokio::spawn(fleet::run_with(
        lab.devices(),
        options,
        live.clone(),
        CancellationToken::new(),
    ));
    until("the fleet connected", || live.progress().connected == 30).await;
    // Sessions old enough that measuring from their start would break the bound below.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Restart: every session gets 1001; nobody listens for a moment; then a new gateway on
    // the same address.
    first.stop().await;
    until("every session ended", || live.progress().connected == 0).await;
    let listener = TcpListener::bind(addr).await.unwrap();
    let second = lab.gateway("registry-b", listener, &[]).await;
    let report = fleet.await.unwrap();
    assert_eq!(report.closes.get(&1001), Some(&30), "{report:?}");
    assert!(
        report.gave_up > 0 && report.gave_up < 30,
        "{}",
        report.gave_up
    );
    let back = 30 - report.gave_up;
    assert_eq!(report.reconnects, back);
    assert_eq!(report.sessions, 30 + back);
    assert_eq!(report.reconnect.count(), back);
    // Back within the backoff ceiling plus the restart: counted from the loss, not from the
    // first session's start.
    assert!(
        report.reconnect.max_ms() < 3000.0,
        "{}",
        report.reconnect.summary()
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_carries_the_gateways_retry_after() {
    let lab = Lab::new(2).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gateway = lab
        .gateway("registry", listener, &["max_connections = 1"])
        .await;
    let devices = lab.devices();
    let target = lab.target(addr);
    let connect = |d: &fleet::FleetDevice| {
        device::connect(
            &target,
            d.config.clone(),
            "telemetry.v1",
            None,
            Duration::from_secs(5),
        )
    };
    let held = connect(&devices[0]).await.unwrap();
    let Err(refused) = connect(&devices[1]).await else {
        panic!("the second device was admitted past max_connections = 1")
    };
    assert_eq!(
        refused,
        Refused::Http {
            status: 503,
            code: "over-capacity".into(),
            retry_after: Some(Duration::from_secs(5)),
        }
    );
    assert_eq!(refused.retry_after(), Some(Duration::from_secs(5)));
    drop(held);
    gateway.stop().await;
}
