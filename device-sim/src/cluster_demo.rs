//! `gatehouse-sim demo --cluster`: several gateways, one fleet. Three NATS JetStream nodes on
//! loopback, three gateways sharing their registry, revocations, session ownership and audit
//! chains through them, HAProxy in front (the shipped `deploy/haproxy.cfg`; where HAProxy is
//! not installed, the gateways share one port with SO_REUSEPORT instead), the sample backends
//! and a simulated fleet through the balancer. A device enrolled once is known everywhere; a
//! suspension through one gateway closes the session another one holds; every device's audit
//! chain verifies against the cluster at the end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use gatehouse::admin::client::{AdminClient, Call};
use gatehouse::config::template::Template;
use gatehouse::config::AdminToken;
use gatehouse::model::DeviceStatus;
use gatehouse::session::table::{Filter, LiveSession};
use gatehouse_pki::PkiDir;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::demo::{self, Backends, Pki};
use crate::device::{self, Target};
use crate::fleet;
use crate::haproxy::{self, Haproxy, Upstream};
use crate::nats::{self, NatsCluster};

#[derive(Debug, Clone)]
pub struct ClusterDemoOptions {
    pub sensors: usize,
    pub locks: usize,
    pub duration: Duration,
    pub rate_hz: f64,
    pub keep: bool,
    /// Replicas of every bucket and stream (1 to 3).
    pub replicas: usize,
    /// What is in front of the gateways; by default HAProxy where it is installed, else
    /// SO_REUSEPORT.
    pub balancer: Option<Balancer>,
}

/// What is in front of the gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balancer {
    Haproxy,
    ReusePort,
}

/// A live suspension across gateways.
#[derive(Debug, Clone)]
pub struct Suspension {
    pub device: String,
    pub held_on: String,
    pub suspended_through: String,
    /// The close code and reason the device got, if it got one within 5 s.
    pub close: Option<(u16, String)>,
    pub elapsed: Duration,
}

/// What the cluster demo observed, for callers that check it.
#[derive(Debug, Clone)]
pub struct ClusterDemoSummary {
    pub balancer: Balancer,
    /// Devices each gateway's index held once the fleet was enrolled through the first.
    pub known_per_gateway: Vec<(String, usize)>,
    pub refusals: Vec<(String, Option<device::Refused>)>,
    pub suspension: Suspension,
    /// Sessions each gateway held in the middle of the fleet run.
    pub sessions_per_gateway: Vec<(String, usize)>,
    pub sensors_connected: u64,
    pub locks_connected: u64,
    pub telemetry_sent: u64,
    pub telemetry_delivered: u64,
    pub commands_sent: u64,
    pub commands_answered: u64,
    pub audit_devices_verified: usize,
    pub audit_failures: usize,
    pub audit_records: u64,
}

const NAMES: [&str; 3] = ["gw-a", "gw-b", "gw-c"];

/// One of the three gateways.
struct Gateway {
    name: &'static str,
    devices: SocketAddr,
    admin: SocketAddr,
    client: Arc<AdminClient>,
    registry: Arc<dyn gatehouse::storage::DeviceStore>,
    task: tokio::task::JoinHandle<Result<(), gatehouse::server::ServerError>>,
}

impl Gateway {
    /// One admin API call (the client blocks; the runtime does not).
    async fn api<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        call: Call,
    ) -> anyhow::Result<T> {
        let client = self.client.clone();
        let name = self.name;
        tokio::task::spawn_blocking(move || client.call::<T>(call))
            .await?
            .with_context(|| format!("{name}'s admin API"))
    }

    async fn sessions(&self, filter: &Filter) -> anyhow::Result<Vec<LiveSession>> {
        self.api(Call::get("/v1/sessions").query(filter)).await
    }
}

/// Device listeners: one per gateway behind HAProxy, or one port for all with SO_REUSEPORT.
fn device_listeners(balancer: Balancer) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let bind = |addr| -> anyhow::Result<std::net::TcpListener> {
        Ok(gatehouse::server::bind(addr, balancer == Balancer::ReusePort)?.into_std()?)
    };
    let first = bind(any)?;
    let shared = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..NAMES.len() {
        all.push(bind(match balancer {
            Balancer::Haproxy => any,
            Balancer::ReusePort => shared,
        })?);
    }
    Ok(all)
}

/// [4] Three gateways with the same `[cluster]` section but their own names, each with an
/// admin listener; the fleet enrolled once, through gw-a.
async fn start_gateways(
    dir: &std::path::Path,
    pki: &Pki,
    backends: &Backends,
    nats: &NatsCluster,
    options: &ClusterDemoOptions,
    balancer: Balancer,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<Gateway>> {
    demo::write_schemas(dir)?;
    let token = "demo-cluster-admin-token-0123456789";
    std::fs::write(dir.join("admin.token"), token)?;
    let mut gateways = Vec::new();
    for (name, listener) in NAMES.into_iter().zip(device_listeners(balancer)?) {
        let admin = TcpListener::bind("127.0.0.1:0").await?;
        let admin_addr = admin.local_addr()?;
        let devices = listener.local_addr()?;
        let mut server_lines = vec!["shutdown_grace_ms = 3000".to_string()];
        match balancer {
            // The device's own address comes in the PROXY header, from the balancer only.
            Balancer::Haproxy => {
                server_lines.push("proxy_protocol_from = [\"127.0.0.1/32\"]".into())
            }
            Balancer::ReusePort => server_lines.push("reuse_port = true".into()),
        }
        let text = Template {
            listen: devices.to_string(),
            server: server_lines,
            pki_dir: "pki".into(),
            registry: String::new(),
            cluster: Some(nats.section(name, options.replicas)),
            schemas_dir: "schemas".into(),
            admin: Some((admin_addr.to_string(), "admin.token".into())),
            audit: Some((
                "audit".into(),
                vec![
                    "checkpoint_interval_ms = 1000".into(),
                    "command_timeout_ms = 5000".into(),
                ],
            )),
            routes: demo::routes(backends),
            limits: Vec::new(),
        }
        .render();
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text)?;
        let config = gatehouse::Config::load(&path)?;
        let server = gatehouse::Server::new(config, shutdown.clone())
            .await
            .with_context(|| format!("{name} did not start"))?;
        let registry = server.registry();
        let listener = TcpListener::from_std(listener)?;
        let task = tokio::spawn(server.serve(listener, Some(admin)));
        gateways.push(Gateway {
            name,
            devices,
            admin: admin_addr,
            client: Arc::new(AdminClient::new(admin_addr, AdminToken::new(token)?)),
            registry,
            task,
        });
    }
    // Enrolled once, through gw-a; the retired sensor revoked there too.
    let a = gateways[0].registry.clone();
    let enrollments = pki.enrollments();
    let expected = enrollments.len();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        a.enroll_many(enrollments)?;
        a.set_status("retired-sensor", DeviceStatus::Revoked)?;
        Ok(())
    })
    .await??;
    // Every gateway's index follows the bucket: wait (bounded) until each holds them all.
    let deadline = Instant::now() + Duration::from_secs(10);
    for gw in &gateways {
        while gw.registry.len() < expected
            || gw
                .registry
                .get("retired-sensor")
                .is_none_or(|d| d.status != DeviceStatus::Revoked)
        {
            if Instant::now() >= deadline {
                bail!(
                    "{} knows {} of {expected} devices after 10 s",
                    gw.name,
                    gw.registry.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for gw in &gateways {
        println!(
            "    {}: devices wss://localhost:{}, admin http://{} (config {}.toml)",
            gw.name,
            gw.devices.port(),
            gw.admin,
            gw.name
        );
    }
    println!(
        "    {expected} devices enrolled once, through gw-a; every gateway's index holds all {expected} (retired-sensor revoked)"
    );
    Ok(gateways)
}

/// [7] The last lock holds a control session wherever the balancer put it; an operator
/// suspends it through another gateway's admin API.
async fn suspend_elsewhere(
    target: &Target,
    roots: &Arc<rustls::RootCertStore>,
    pki: &PkiDir,
    gateways: &[Gateway],
    id: &str,
    owners: &mut BTreeMap<String, &'static str>,
) -> anyhow::Result<Suspension> {
    let config = demo::device_config(roots, pki, id)?;
    let (mut ws, _) = device::connect(target, config, "control.v1", None, Duration::from_secs(5))
        .await
        .map_err(|e| anyhow::anyhow!("{id} was refused: {e}"))?;
    let mut holder = None;
    for gw in gateways {
        if let Some(s) = gw.sessions(&Filter::device(id)).await?.first() {
            remember(owners, &s.connection, gw.name);
            holder = Some(gw);
        }
    }
    let holder = holder.context("no gateway lists the session it admitted")?;
    let other = gateways
        .iter()
        .find(|g| g.name != holder.name)
        .context("one gateway only")?;
    println!(
        "[7] {id} holds a control.v1 session on {}; an operator suspends it through {} (`gatehouse --config {}.toml devices suspend {id}`):",
        holder.name, other.name, other.name
    );
    let asked = Instant::now();
    let _: serde_json::Value = other
        .api(Call::post(format!("/v1/devices/{id}/suspend")))
        .await?;
    let close = device::next_close(&mut ws, Duration::from_secs(5)).await;
    let elapsed = asked.elapsed();
    match &close {
        Some((code, reason)) => println!(
            "    {} closed it with {code} \"{reason}\" {:.1} ms after {} accepted the suspension",
            holder.name,
            elapsed.as_secs_f64() * 1000.0,
            other.name
        ),
        None => println!("    its session was NOT closed within 5 s (unexpected)"),
    }
    let _: serde_json::Value = gateways[2]
        .api(Call::post(format!("/v1/devices/{id}/resume")))
        .await?;
    println!("    resumed through gw-c: {id} may connect again, through any gateway");
    Ok(Suspension {
        device: id.to_string(),
        held_on: holder.name.to_string(),
        suspended_through: other.name.to_string(),
        close,
        elapsed,
    })
}

/// Connection ids start with the boot id of the gateway that made them.
fn remember(owners: &mut BTreeMap<String, &'static str>, connection: &str, gateway: &'static str) {
    if let Some((boot, _)) = connection.split_once('-') {
        owners.insert(boot.to_string(), gateway);
    }
}

fn gateway_of<'a>(owners: &BTreeMap<String, &'a str>, connection: &str) -> &'a str {
    connection
        .split_once('-')
        .and_then(|(boot, _)| owners.get(boot).copied())
        .unwrap_or("?")
}

/// [11] Every device's chain, verified against the cluster with the audit public key (what
/// `gatehouse audit verify --all --config gw-a.toml` does once the gateways are stopped), and
/// the suspended lock's chain with the gateway behind each record.
async fn verify_audit(
    dir: &std::path::Path,
    public_key: &std::path::Path,
    lock: &str,
    owners: &BTreeMap<String, &'static str>,
) -> anyhow::Result<gatehouse::audit::DirVerdict> {
    let config = gatehouse::Config::load(&dir.join("gw-a.toml"))?;
    let section = config
        .stores
        .cluster()
        .context("gw-a.toml has no [cluster]")?;
    let cluster = gatehouse::cluster::Cluster::connect(section).await?;
    let reader = gatehouse::cluster::audit::AuditReader::open(&cluster).await?;
    let public = gatehouse::audit::load_public_key(public_key)?;
    let export = reader.export(lock).await?;
    let mut through: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &export.records {
        if let Some(c) = &r.connection {
            *through.entry(gateway_of(owners, c)).or_default() += 1;
        }
    }
    println!(
        "[11] audit chain of {lock} in the cluster: {} records, written through {}",
        export.records.len(),
        through
            .iter()
            .map(|(gw, n)| format!("{gw} ({n})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for r in export.records.iter().rev().take(5).rev() {
        println!(
            "    #{:<4} {:<18} via {}",
            r.seq,
            r.kind.as_str(),
            r.connection
                .as_deref()
                .map(|c| gateway_of(owners, c))
                .unwrap_or("-")
        );
    }
    let verdict = reader.verify(&public, None).await?;
    println!(
        "    `gatehouse audit verify --all --config gw-a.toml`: {} device chains intact, {} failures, {} records in all",
        verdict.verified.len(),
        verdict.failures.len(),
        verdict.verified.iter().map(|v| v.records).sum::<u64>()
    );
    for f in &verdict.failures {
        println!("    FAILED {f}");
    }
    Ok(verdict)
}

pub async fn run(options: ClusterDemoOptions) -> anyhow::Result<ClusterDemoSummary> {
    anyhow::ensure!(
        (1..=3).contains(&options.replicas),
        "--replicas must be 1, 2 or 3 (three NATS nodes)"
    );
    let work = tempfile::Builder::new()
        .prefix("gatehouse-cluster-demo-")
        .tempdir()?;
    let dir = work.path().to_path_buf();
    println!("Gatehouse cluster demo in {}", dir.display());
    let pki_dir = dir.join("pki");
    let demo_options = demo::DemoOptions {
        sensors: options.sensors,
        locks: options.locks,
        duration: options.duration,
        rate_hz: options.rate_hz,
        keep: options.keep,
    };
    let pki = demo::issue_pki(&pki_dir, &demo_options)?;

    let backends = demo::start_backends().await?;
    let started = Instant::now();
    let nats = NatsCluster::start_with(nats::find_or_install()?, 3).await?;
    println!(
        "[3] NATS: three JetStream nodes clustered on loopback ({}), ready in {:.1?}; buckets and streams with {} replica(s)",
        nats.urls().join(", "),
        started.elapsed(),
        options.replicas
    );
    let haproxy_binary = match options.balancer {
        Some(Balancer::ReusePort) => None,
        Some(Balancer::Haproxy) => {
            Some(haproxy::find().context("HAProxy is not installed (`apt-get install haproxy`)")?)
        }
        None => haproxy::find(),
    };
    let balancer = if haproxy_binary.is_some() {
        Balancer::Haproxy
    } else {
        Balancer::ReusePort
    };
    println!("[4] three gateways on one NATS cluster:");
    let shutdown = CancellationToken::new();
    let gateways =
        start_gateways(&dir, &pki, &backends, &nats, &options, balancer, &shutdown).await?;
    let known_per_gateway = gateways
        .iter()
        .map(|g| (g.name.to_string(), g.registry.len()))
        .collect();

    // [5] What is in front.
    let (_proxy, front) = match &haproxy_binary {
        Some(binary) => {
            let front = SocketAddr::from(([127, 0, 0, 1], nats::free_port()?));
            let upstreams: Vec<Upstream> = gateways
                .iter()
                .map(|g| Upstream {
                    name: g.name.to_string(),
                    devices: g.devices,
                    admin: g.admin,
                })
                .collect();
            let proxy = Haproxy::start(binary, &dir, front, &upstreams).await?;
            println!(
                "[5] HAProxy ({}) on {front}: deploy/haproxy.cfg in TCP mode, leastconn, PROXY v2 to the gateways, /readyz as the health check",
                binary.display()
            );
            (Some(proxy), front)
        }
        None => {
            println!(
                "[5] no HAProxy (`apt-get install haproxy` for it): the three gateways share port {} with SO_REUSEPORT, and the kernel spreads the devices",
                gateways[0].devices.port()
            );
            (None, gateways[0].devices)
        }
    };
    let target = Target::parse(&format!("wss://localhost:{}/", front.port()))?;
    let roots = device::roots(&pki_dir.join(PkiDir::CA_CERT))?;
    let refusals = demo::probe_refusals(
        &target,
        &roots,
        &pki.dir,
        "[6] refusals through the balancer, whichever gateway answers:",
    )
    .await?;

    let mut owners = BTreeMap::new();
    let last_lock = pki.last_lock();
    let suspension = suspend_elsewhere(
        &target,
        &roots,
        &pki.dir,
        &gateways,
        &last_lock,
        &mut owners,
    )
    .await?;

    // [8] The fleet, through the balancer; halfway, where its sessions are.
    println!(
        "[8] fleet through the balancer: {} sensors on telemetry.v1 at {} frame(s)/s and {} locks on control.v1, for {:?}",
        options.sensors, options.rate_hz, options.locks, options.duration
    );
    let [(sensor_devices, base), (lock_devices, lock_options)] =
        demo::fleets(&pki_dir, &roots, &target, options.rate_hz, options.duration)?;
    let halfway = async {
        // Not a readiness wait: a look at the cluster while the fleet is connected.
        tokio::time::sleep(options.duration / 2).await;
        let mut seen = Vec::new();
        for gw in &gateways {
            let sessions = gw.sessions(&Filter::default()).await?;
            seen.push((gw.name, sessions));
        }
        anyhow::Ok(seen)
    };
    let (sensor_report, lock_report, seen) = tokio::join!(
        fleet::run(sensor_devices, base, shutdown.child_token()),
        fleet::run(lock_devices, lock_options, shutdown.child_token()),
        halfway,
    );
    let mut sessions_per_gateway = Vec::new();
    let described: Vec<String> = seen?
        .into_iter()
        .map(|(name, sessions)| {
            for s in &sessions {
                remember(&mut owners, &s.connection, name);
            }
            sessions_per_gateway.push((name.to_string(), sessions.len()));
            format!("{name} {}", sessions.len())
        })
        .collect();
    println!(
        "    sessions per gateway halfway through (`GET /v1/sessions` on each): {}",
        described.join(", ")
    );
    sensor_report.print_indented("    ");
    lock_report.print_indented("    ");

    // [9] What the backends saw.
    let delivered = backends.ingest_stats.frames.load(Ordering::Relaxed);
    println!("[9] {}", backends.ingest_stats.summary("ingest backend"));
    println!("    {}", backends.control_stats.summary("control backend"));
    println!(
        "    telemetry: {} sent by sensors, {} received by the ingest backend",
        sensor_report.frames_sent, delivered
    );

    // [10] Shutdown: each gateway closes its sessions and lets go of their ownership entries.
    shutdown.cancel();
    for gw in gateways {
        gw.task
            .await?
            .with_context(|| format!("{} stopped with an error", gw.name))?;
    }
    let commands_sent = backends.control_stats.commands_sent.load(Ordering::Relaxed);
    backends.stop().await;
    println!("[10] gateways stopped cleanly; NATS keeps the registry and the audit chains");

    let verdict = verify_audit(&dir, &pki_dir.join(PkiDir::AUDIT_PUB), &last_lock, &owners).await?;
    drop(nats);
    if options.keep {
        let kept = work.keep();
        println!(
            "    work directory kept: {} (the NATS stores are gone with their servers)",
            kept.display()
        );
    }
    Ok(ClusterDemoSummary {
        balancer,
        known_per_gateway,
        refusals,
        suspension,
        sessions_per_gateway,
        sensors_connected: sensor_report.connected,
        locks_connected: lock_report.connected,
        telemetry_sent: sensor_report.frames_sent,
        telemetry_delivered: delivered,
        commands_sent,
        commands_answered: lock_report.commands_answered,
        audit_devices_verified: verdict.verified.len(),
        audit_failures: verdict.failures.len(),
        audit_records: verdict.verified.iter().map(|v| v.records).sum(),
    })
}
