//! `gatehouse-sim demo`: the whole product in one process, in a temporary directory: a CA and
//! fleet certificates, a registry, the gateway, both sample backends and a simulated fleet,
//! plus the refusals an operator should expect. Prints what happened.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse::config::template::{Template, TemplateRoute};
use gatehouse::model::{DeviceStatus, Enrollment};
use gatehouse_pki::{DeviceCertOptions, PkiDir};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backends::{self, BackendStats, Kind};
use crate::device::{self, Target};
use crate::fleet::{self, FleetOptions};

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub sensors: usize,
    pub locks: usize,
    pub duration: Duration,
    pub rate_hz: f64,
    pub keep: bool,
}

/// The shipped schemas, embedded so the demo runs from any directory.
const SCHEMAS: &[(&str, &str, &str)] = &[
    (
        "env-sensor",
        "telemetry.schema.json",
        include_str!("../../schemas/env-sensor/telemetry.schema.json"),
    ),
    (
        "door-lock",
        "telemetry.schema.json",
        include_str!("../../schemas/door-lock/telemetry.schema.json"),
    ),
    (
        "door-lock",
        "command.schema.json",
        include_str!("../../schemas/door-lock/command.schema.json"),
    ),
    (
        "door-lock",
        "response.schema.json",
        include_str!("../../schemas/door-lock/response.schema.json"),
    ),
];

fn enrollment(entry: &gatehouse_pki::ManifestEntry) -> Enrollment {
    Enrollment {
        id: entry.id.clone(),
        device_type: entry.device_type.clone(),
        sha256: entry.sha256.clone(),
        labels: Default::default(),
    }
}

/// What the demo observed, for callers that check it.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    /// (device id, verdict) for each probe that should be refused.
    pub refusals: Vec<(String, Option<device::Refused>)>,
    pub sensors_connected: u64,
    pub locks_connected: u64,
    pub telemetry_sent: u64,
    pub telemetry_delivered: u64,
    pub commands_sent: u64,
    pub commands_answered: u64,
    pub responses_delivered: u64,
    pub audit_devices_verified: usize,
    pub audit_failures: usize,
    pub lock_commands_recorded: usize,
    /// What the faulty sensor got back for each frame.
    pub faulty_replies: Vec<String>,
    /// Dead letters stored for the faulty sensor.
    pub dead_letters: usize,
    /// The close code lock-00002's open session got when it was suspended.
    pub suspension_close: Option<u16>,
}

struct Faulty {
    /// (what was sent, what came back).
    exchanges: Vec<(String, String)>,
}

/// Connects sensor-00001 alone and sends frames the schema refuses, then a valid one.
async fn faulty_sensor(
    target: &Target,
    roots: &Arc<rustls::RootCertStore>,
    pki: &PkiDir,
) -> anyhow::Result<Faulty> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let config = device_config(roots, pki, "sensor-00001")?;
    let (mut ws, _) = device::connect(target, config, "telemetry.v1", None, Duration::from_secs(5))
        .await
        .map_err(|r| anyhow::anyhow!("faulty sensor refused: {r}"))?;
    let mut cbor_bad = Vec::new();
    ciborium::into_writer(
        &serde_json::json!({"id": 7, "type": "reading", "seq": "seven", "ts": 1, "temperature_c": 20, "humidity_pct": 30}),
        &mut cbor_bad,
    )?;
    let frames = vec![
        (
            "JSON, temperature 999".to_string(),
            Message::text(
                r#"{"id":"r-1","type":"reading","seq":1,"ts":1,"temperature_c":999,"humidity_pct":40}"#,
            ),
        ),
        ("CBOR, seq is text".to_string(), Message::binary(cbor_bad)),
        (
            "JSON with a duplicate key".to_string(),
            Message::text(
                r#"{"type":"reading","seq":3,"seq":4,"ts":1,"temperature_c":20,"humidity_pct":40}"#,
            ),
        ),
    ];
    let mut exchanges = Vec::new();
    for (what, frame) in frames {
        ws.send(frame).await?;
        let got = match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => format!("error frame (JSON) {t}"),
            Ok(Some(Ok(Message::Binary(b)))) => {
                let v: serde_json::Value = ciborium::from_reader(b.as_ref())?;
                format!("error frame (CBOR) {v}")
            }
            other => format!("unexpected: {other:?}"),
        };
        exchanges.push((what, got));
    }
    ws.send(Message::text(crate::fleet::telemetry(
        "env-sensor",
        "sensor-00001",
        5,
    )))
    .await?;
    exchanges.push((
        "a valid reading".into(),
        "forwarded to the ingest backend (no reply)".into(),
    ));
    ws.close(None).await?;
    while let Some(Ok(_)) = ws.next().await {}
    Ok(Faulty { exchanges })
}

/// The demo's certificates: a CA, the gateway's, both fleets and three outsiders.
pub(crate) struct Pki {
    pub(crate) dir: PkiDir,
    pub(crate) sensors: gatehouse_pki::Manifest,
    pub(crate) locks: gatehouse_pki::Manifest,
    pub(crate) stolen: gatehouse_pki::ManifestEntry,
    pub(crate) retired: gatehouse_pki::ManifestEntry,
}

impl Pki {
    /// Every device the registry should know: both fleets, the stolen lock (its certificate
    /// is revoked in the CRL, not in the registry) and the retired sensor.
    pub(crate) fn enrollments(&self) -> Vec<Enrollment> {
        let mut all: Vec<Enrollment> = self
            .sensors
            .devices
            .iter()
            .chain(self.locks.devices.iter())
            .map(enrollment)
            .collect();
        all.push(enrollment(&self.stolen));
        all.push(enrollment(&self.retired));
        all
    }

    /// The last lock: the one whose session is suspended live (so that lock-00001's log,
    /// shown at the end, is about commands).
    pub(crate) fn last_lock(&self) -> String {
        self.locks
            .devices
            .last()
            .map(|d| d.id.clone())
            .unwrap_or_default()
    }
}

/// [1] A CA, the server certificate, both fleets, the intruder, the stolen lock (revoked in
/// the CRL), the retired sensor, and the audit key.
pub(crate) fn issue_pki(dir: &std::path::Path, options: &DemoOptions) -> anyhow::Result<Pki> {
    let started = Instant::now();
    let mut pki = PkiDir::init(dir, false)?;
    pki.issue_server(&["localhost".into()], &["127.0.0.1".parse::<IpAddr>()?])?;
    let (sensors, _) = pki.issue_fleet("env-sensor", options.sensors, "sensor")?;
    let (locks, _) = pki.issue_fleet("door-lock", options.locks, "lock")?;
    pki.issue_device(
        "intruder",
        "env-sensor",
        false,
        &DeviceCertOptions::default(),
    )?;
    let stolen = pki.issue_device(
        "stolen-lock",
        "door-lock",
        false,
        &DeviceCertOptions::default(),
    )?;
    let retired = pki.issue_device(
        "retired-sensor",
        "env-sensor",
        false,
        &DeviceCertOptions::default(),
    )?;
    pki.revoke("stolen-lock")?;
    pki.issue_audit_key(false)?;
    println!(
        "[1] pki: CA, server certificate, {} env-sensor and {} door-lock certificates, CRL revoking stolen-lock ({:.0?})",
        sensors.devices.len(),
        locks.devices.len(),
        started.elapsed()
    );
    Ok(Pki {
        dir: pki,
        sensors,
        locks,
        stolen,
        retired,
    })
}

/// The sample backends and what they saw.
pub(crate) struct Backends {
    pub(crate) ingest_url: String,
    pub(crate) control_url: String,
    pub(crate) ingest_stats: Arc<BackendStats>,
    pub(crate) control_stats: Arc<BackendStats>,
    pub(crate) stop: CancellationToken,
    pub(crate) tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Backends {
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// [2] The ingest and control backends on free loopback ports.
pub(crate) async fn start_backends() -> anyhow::Result<Backends> {
    let stop = CancellationToken::new();
    let ingest_stats = Arc::new(BackendStats::default());
    let control_stats = Arc::new(BackendStats::default());
    let ingest_listener = TcpListener::bind("127.0.0.1:0").await?;
    let control_listener = TcpListener::bind("127.0.0.1:0").await?;
    let ingest_url = format!("ws://{}/ingest", ingest_listener.local_addr()?);
    let control_url = format!("ws://{}/control", control_listener.local_addr()?);
    let tasks = vec![
        tokio::spawn(backends::serve(
            ingest_listener,
            Kind::Ingest,
            ingest_stats.clone(),
            stop.clone(),
        )),
        tokio::spawn(backends::serve(
            control_listener,
            Kind::Control {
                interval: Duration::from_millis(500),
            },
            control_stats.clone(),
            stop.clone(),
        )),
    ];
    println!("[2] backends: ingest {ingest_url}, control {control_url}");
    Ok(Backends {
        ingest_url,
        control_url,
        ingest_stats,
        control_stats,
        stop,
        tasks,
    })
}

/// The running gateway.
struct Gateway {
    addr: std::net::SocketAddr,
    dead_letters: Arc<dyn gatehouse::storage::DeadLetterStore>,
    registry: Arc<dyn gatehouse::storage::DeviceStore>,
    task: tokio::task::JoinHandle<Result<(), gatehouse::server::ServerError>>,
}

/// The TLS client configuration of device `id` of the demo's pki directory.
pub(crate) fn device_config(
    roots: &Arc<rustls::RootCertStore>,
    pki: &PkiDir,
    id: &str,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let cert = std::fs::read(pki.device_cert_path(id))?;
    let key = std::fs::read(pki.device_key_path(id))?;
    device::client_config(roots.clone(), &cert, &key)
}

/// The shipped schemas, written into `dir/schemas`.
pub(crate) fn write_schemas(dir: &std::path::Path) -> anyhow::Result<()> {
    for (device_type, file, text) in SCHEMAS {
        std::fs::create_dir_all(dir.join("schemas").join(device_type))?;
        std::fs::write(dir.join("schemas").join(device_type).join(file), text)?;
    }
    Ok(())
}

/// The demo's two routes: telemetry from both types to ingest, control for locks.
pub(crate) fn routes(backends: &Backends) -> Vec<TemplateRoute> {
    let route = |subprotocol: &str, kind: &str, types: &[&str], backend: &str| TemplateRoute {
        subprotocol: subprotocol.into(),
        kind: kind.into(),
        device_types: types.iter().map(|t| t.to_string()).collect(),
        backends: vec![backend.to_string()],
    };
    vec![
        route(
            "telemetry.v1",
            "telemetry",
            &["env-sensor", "door-lock"],
            &backends.ingest_url,
        ),
        route(
            "control.v1",
            "control",
            &["door-lock"],
            &backends.control_url,
        ),
    ]
}

/// The demo's two fleets and how each runs: sensors sending telemetry, locks on control.v1
/// answering commands (one in ten with an error).
pub(crate) fn fleets(
    pki_dir: &std::path::Path,
    roots: &Arc<rustls::RootCertStore>,
    target: &Target,
    rate_hz: f64,
    duration: Duration,
) -> anyhow::Result<[(Vec<fleet::FleetDevice>, FleetOptions); 2]> {
    let sensors = FleetOptions {
        rate_hz,
        duration,
        connect_rate: 200,
        connect_timeout: Duration::from_secs(5),
        response_delay: Duration::from_millis(5),
        error_rate: 0.1,
        ..FleetOptions::new(target.clone(), "telemetry.v1")
    };
    let locks = FleetOptions {
        protocols: "control.v1, telemetry.v1".into(),
        rate_hz: 0.0,
        ..sensors.clone()
    };
    Ok([
        (
            fleet::from_manifest(&pki_dir.join("fleet-sensor.json"), roots)?,
            sensors,
        ),
        (
            fleet::from_manifest(&pki_dir.join("fleet-lock.json"), roots)?,
            locks,
        ),
    ])
}

/// [3] The schemas, the configuration (from the shared template), the registry with both
/// fleets enrolled and the retired sensor revoked, and the gateway serving.
async fn start_gateway(
    dir: &std::path::Path,
    pki: &Pki,
    backends: &Backends,
    shutdown: &CancellationToken,
) -> anyhow::Result<Gateway> {
    write_schemas(dir)?;
    let config_text = Template {
        listen: "127.0.0.1:0".into(),
        server: vec!["shutdown_grace_ms = 3000".into()],
        pki_dir: "pki".into(),
        registry: "registry".into(),
        schemas_dir: "schemas".into(),
        admin: None,
        audit: Some((
            "audit".into(),
            vec![
                "checkpoint_interval_ms = 1000".into(),
                "command_timeout_ms = 5000".into(),
            ],
        )),
        cluster: None,
        routes: routes(backends),
        limits: Vec::new(),
    }
    .render();
    let config_path = dir.join("gatehouse.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = gatehouse::Config::load(&config_path)?;
    let server = gatehouse::Server::new(config, shutdown.clone()).await?;
    let registry = server.registry();
    let dead_letters = server.deadletters();
    registry.enroll_many(pki.enrollments())?;
    registry.set_status("retired-sensor", DeviceStatus::Revoked)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(server.serve(listener, None));
    println!(
        "[3] gateway: wss://localhost:{} with {} enrolled devices (retired-sensor revoked in the registry; intruder never enrolled)",
        addr.port(),
        registry.len()
    );
    Ok(Gateway {
        addr,
        dead_letters,
        registry: registry.clone(),
        task,
    })
}

/// [4] What the gateway refuses, one probe each.
pub(crate) async fn probe_refusals(
    target: &Target,
    roots: &Arc<rustls::RootCertStore>,
    pki: &PkiDir,
    heading: &str,
) -> anyhow::Result<Vec<(String, Option<device::Refused>)>> {
    println!("{heading}");
    let mut refusals = Vec::new();
    let probes = [
        (
            "intruder",
            "a valid certificate that is not enrolled",
            "telemetry.v1",
        ),
        ("stolen-lock", "revoked in the CRL", "control.v1"),
        ("retired-sensor", "revoked in the registry", "telemetry.v1"),
        (
            "sensor-00001",
            "a sensor asking for the control route",
            "control.v1",
        ),
    ];
    for (id, what, proto) in probes {
        let config = device_config(roots, pki, id)?;
        let result = device::connect(target, config, proto, None, Duration::from_secs(5)).await;
        let verdict = match &result {
            Ok(_) => "ADMITTED (unexpected)".to_string(),
            Err(refused) => format!("refused: {refused}"),
        };
        println!("    {id:<16} {what:<44} -> {verdict}");
        refusals.push((id.to_string(), result.err().clone()));
    }
    Ok(refusals)
}

/// [5] A faulty sensor: what its invalid frames get back, and the dead letters stored.
async fn show_faulty_sensor(
    target: &Target,
    roots: &Arc<rustls::RootCertStore>,
    pki: &PkiDir,
    dead_letters: &Arc<dyn gatehouse::storage::DeadLetterStore>,
) -> anyhow::Result<(Faulty, usize)> {
    println!("[5] a faulty sensor (sensor-00001) sends three invalid frames and one valid one:");
    let faulty = faulty_sensor(target, roots, pki).await?;
    for (sent, got) in &faulty.exchanges {
        println!("    sent {sent}");
        println!("      -> {got}");
    }
    let mut stored = dead_letters.stored();
    let _ = tokio::time::timeout(Duration::from_secs(5), stored.wait_for(|n| *n >= 3)).await;
    let letters = dead_letters.list("sensor-00001")?;
    println!("    dead-letter store for sensor-00001 (`gatehouse deadletters sensor-00001`):");
    for l in &letters {
        println!(
            "      #{} {} {} at {:?}: {}",
            l.seq, l.encoding, l.code, l.pointer, l.message
        );
    }
    Ok((faulty, letters.len()))
}

/// [6] Live session control: an open session ends the moment its device is suspended.
pub(crate) async fn show_live_suspension(
    target: &Target,
    roots: &Arc<rustls::RootCertStore>,
    pki: &PkiDir,
    registry: &Arc<dyn gatehouse::storage::DeviceStore>,
    id: &str,
) -> anyhow::Result<Option<u16>> {
    println!("[6] live session control: {id} holds a control.v1 session; an operator suspends it (`gatehouse devices suspend {id}`):");
    let config = device_config(roots, pki, id)?;
    let (mut ws, _) = device::connect(target, config, "control.v1", None, Duration::from_secs(5))
        .await
        .map_err(|e| anyhow::anyhow!("{id} was refused: {e}"))?;
    let asked = std::time::Instant::now();
    let (r, owned) = (registry.clone(), id.to_string());
    tokio::task::spawn_blocking(move || r.set_status(&owned, DeviceStatus::Suspended)).await??;
    let close = device::next_close(&mut ws, Duration::from_secs(5)).await;
    match &close {
        Some((code, reason)) => println!(
            "    its open session closed with {code} \"{reason}\" {:.1} ms after the suspension (its backend got the same close; the close is in its audit log)",
            asked.elapsed().as_secs_f64() * 1000.0
        ),
        None => println!("    its session was NOT closed within 5 s (unexpected)"),
    }
    let (r, owned) = (registry.clone(), id.to_string());
    tokio::task::spawn_blocking(move || r.set_status(&owned, DeviceStatus::Active)).await??;
    println!("    resumed: {id} may connect again");
    Ok(close.map(|(code, _)| code))
}

/// [10] One lock's audit log, and verification of every device log with the public key.
fn show_audit(
    audit_dir: &std::path::Path,
    public_key: &std::path::Path,
) -> anyhow::Result<(Vec<gatehouse::audit::Record>, gatehouse::audit::DirVerdict)> {
    let lock_log = gatehouse::audit::read_device(audit_dir, "lock-00001")?
        .records
        .remove("lock-00001")
        .unwrap_or_default();
    println!(
        "[10] audit log of lock-00001 (`gatehouse audit show lock-00001`), {} records, last 8:",
        lock_log.len()
    );
    for r in lock_log.iter().rev().take(8).rev() {
        let id = r
            .command_id
            .as_ref()
            .map(|v| v.to_string())
            .unwrap_or_default();
        let what = match (&r.verdict, r.rtt_us, &r.detail) {
            (Some(v), Some(rtt), _) => format!("verdict {v}, {:.1} ms", rtt as f64 / 1000.0),
            (_, _, Some(d)) => d.clone(),
            _ => r.payload.clone().unwrap_or_default(),
        };
        println!(
            "    #{:<4} {:<18} {:<6} {}",
            r.seq,
            r.kind.as_str(),
            id,
            what
        );
    }
    let public = gatehouse::audit::load_public_key(public_key)?;
    let verdict = gatehouse::audit::verify_dir(audit_dir, &public, None)?;
    println!(
        "    `gatehouse audit verify --all`: {} device logs intact, {} failures ({} records in all, every chain signed up to its last record: {})",
        verdict.verified.len(),
        verdict.failures.len(),
        verdict.verified.iter().map(|v| v.records).sum::<u64>(),
        verdict.verified.iter().all(|v| v.unsigned_tail == 0)
    );
    Ok((lock_log, verdict))
}

pub async fn run(options: DemoOptions) -> anyhow::Result<DemoSummary> {
    let work = tempfile::Builder::new()
        .prefix("gatehouse-demo-")
        .tempdir()?;
    let dir = work.path().to_path_buf();
    println!("Gatehouse demo in {}", dir.display());
    let pki_dir = dir.join("pki");
    let pki = issue_pki(&pki_dir, &options)?;
    let backends = start_backends().await?;
    let shutdown = CancellationToken::new();
    let gateway = start_gateway(&dir, &pki, &backends, &shutdown).await?;
    let target = Target::parse(&format!("wss://localhost:{}/", gateway.addr.port()))?;
    let roots = device::roots(&pki_dir.join(PkiDir::CA_CERT))?;
    let refusals = probe_refusals(&target, &roots, &pki.dir, "[4] refusals:").await?;
    let (faulty, dead_letters) =
        show_faulty_sensor(&target, &roots, &pki.dir, &gateway.dead_letters).await?;
    let last_lock = pki.last_lock();
    let suspension_close =
        show_live_suspension(&target, &roots, &pki.dir, &gateway.registry, &last_lock).await?;

    // [7] The fleet.
    println!(
        "[7] fleet: {} sensors on telemetry.v1 at {} frame(s)/s and {} locks on control.v1 answering commands, for {:?}",
        options.sensors, options.rate_hz, options.locks, options.duration
    );
    let [(sensor_devices, base), (lock_devices, lock_options)] =
        fleets(&pki_dir, &roots, &target, options.rate_hz, options.duration)?;
    let (sensor_report, lock_report) = tokio::join!(
        fleet::run(sensor_devices, base, shutdown.child_token()),
        fleet::run(lock_devices, lock_options, shutdown.child_token()),
    );
    sensor_report.print_indented("    ");
    lock_report.print_indented("    ");

    // [8] What the backends saw.
    println!("[8] {}", backends.ingest_stats.summary("ingest backend"));
    println!("    {}", backends.control_stats.summary("control backend"));
    let delivered = backends.ingest_stats.frames.load(Ordering::Relaxed);
    println!(
        "    telemetry: {} sent by sensors, {} received by the ingest backend",
        sensor_report.frames_sent, delivered
    );

    // [9] Shutdown.
    shutdown.cancel();
    gateway.task.await??;
    let commands_sent = backends.control_stats.commands_sent.load(Ordering::Relaxed);
    let responses_delivered = backends.control_stats.responses.load(Ordering::Relaxed);
    backends.stop().await;
    println!("[9] gateway stopped cleanly (sessions closed with 1001, audit log synced and signed, registry flushed)");

    let (lock_log, verdict) = show_audit(&dir.join("audit"), &pki_dir.join(PkiDir::AUDIT_PUB))?;
    if options.keep {
        let kept = work.keep();
        println!("    work directory kept: {}", kept.display());
    }
    Ok(DemoSummary {
        refusals,
        sensors_connected: sensor_report.connected,
        locks_connected: lock_report.connected,
        telemetry_sent: sensor_report.frames_sent,
        telemetry_delivered: delivered,
        audit_devices_verified: verdict.verified.len(),
        audit_failures: verdict.failures.len(),
        lock_commands_recorded: lock_log
            .iter()
            .filter(|r| r.kind == gatehouse::audit::RecordKind::CommandSent)
            .count(),
        faulty_replies: faulty
            .exchanges
            .iter()
            .map(|(_, got)| got.clone())
            .collect(),
        dead_letters,
        suspension_close,
        commands_sent,
        commands_answered: lock_report.commands_answered,
        responses_delivered,
    })
}
