//! The `gatehouse` binary: parses the command line, installs tracing, and calls the library.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use gatehouse::admin::AdminClient;
use gatehouse::config::Config;
use gatehouse::identity::Fingerprint;
use gatehouse::registry::{Device, DeviceStatus, Enrollment, Registry, RegistryError};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "mTLS WebSocket gateway for device fleets"
)]
struct Cli {
    /// Log format: text or json.
    #[arg(
        long,
        global = true,
        env = "GATEHOUSE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, env = "GATEHOUSE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file and the files it names, without binding any port.
    Check {
        #[arg(long, env = "GATEHOUSE_CONFIG")]
        config: PathBuf,
    },
    /// Show a device's rejected frames (the dead-letter store), oldest first.
    Deadletters {
        #[arg(long, env = "GATEHOUSE_CONFIG")]
        config: PathBuf,
        id: String,
        /// JSON lines instead of a readable listing.
        #[arg(long)]
        json: bool,
    },
    /// Query, verify and export the per-device command audit log.
    Audit {
        #[arg(long, env = "GATEHOUSE_CONFIG")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Ask the running gateway to reload TLS material and schemas (like SIGHUP).
    Reload {
        #[arg(long, env = "GATEHOUSE_CONFIG")]
        config: PathBuf,
    },
    /// Manage the device registry (through the admin API while the gateway runs).
    Devices {
        #[arg(long, env = "GATEHOUSE_CONFIG")]
        config: PathBuf,
        #[command(subcommand)]
        command: DevicesCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// A device's records, oldest first.
    Show {
        device: String,
        /// Only records at or after this time (RFC 3339, e.g. 2026-11-25T10:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Only records about this command id.
        #[arg(long)]
        command: Option<String>,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Verify chains and signed checkpoints: one device, --all, or an export --file.
    Verify {
        device: Option<String>,
        #[arg(long, conflicts_with = "device")]
        all: bool,
        /// Verify an export file instead of the log (needs --key).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Public key file (audit.pub); default: [audit] public_key from the config.
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Write a device's records and checkpoints to a self-contained file.
    Export {
        device: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Enroll one certificate (--id, --type, --cert) or a whole manifest (--manifest).
    Enroll {
        #[arg(long, conflicts_with = "manifest", requires_all = ["device_type", "cert"])]
        id: Option<String>,
        #[arg(long = "type")]
        device_type: Option<String>,
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Label KEY=VALUE, repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long, required_unless_present = "id")]
        manifest: Option<PathBuf>,
    },
    /// List devices.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one device.
    Show { id: String },
    /// Suspend a device: its next handshake is refused.
    Suspend { id: String },
    /// Resume a suspended device.
    Resume { id: String },
    /// Revoke a device (final).
    Revoke { id: String },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} must be KEY=VALUE"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatehouse: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                let signals = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_stop_signal().await;
                    tracing::info!("stop signal received");
                    signals.cancel();
                });
                gatehouse::run(config, shutdown).await
            })
        }
        Command::Check { config: path } => {
            let config = Config::load(&path)?;
            let tls = gatehouse::tls::TlsState::load(&config.tls)?;
            gatehouse::tls::backend_client_config(&config.backend)?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let stale = tls.current().crls.stale(now).count();
            println!("config {} is valid", path.display());
            println!("  listen            {}", config.listen);
            println!("  client CA         {}", config.tls.client_ca.display());
            println!(
                "  CRLs              {} file(s), {} revoked serial(s), {} stale",
                config.tls.crls.len(),
                tls.current().crls.len(),
                stale
            );
            println!("  registry          {}", config.registry_path.display());
            for route in config.routes.iter() {
                println!(
                    "  route {:<12} {} for [{}] -> {}",
                    route.subprotocol,
                    route.kind.as_str(),
                    route.device_types.join(", "),
                    route
                        .backends
                        .iter()
                        .map(|b| b.url.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let schemas = gatehouse::schema::SchemaSet::load(&config.schemas_dir)?;
            for (t, kinds) in schemas.device_types() {
                let names: Vec<&str> = kinds.iter().map(|k| k.file_name()).collect();
                println!("  schemas {:<14} {}", t, names.join(", "));
            }
            let missing = schemas.missing_for(&config.routes);
            for (route, device_type, file) in &missing {
                println!(
                    "error: route {route} allows device type {device_type} but {} is missing",
                    config.schemas_dir.join(device_type).join(file).display()
                );
            }
            if !missing.is_empty() {
                bail!("{} schema file(s) missing: devices of those types would be refused on those routes", missing.len());
            }
            if stale > 0 {
                println!("warning: {stale} CRL(s) are past their next update (tls.stale_crl decides what happens)");
            }
            Ok(())
        }
        Command::Devices { config, command } => devices(&Config::load(&config)?, command),
        Command::Deadletters { config, id, json } => {
            deadletters(&Config::load(&config)?, &id, json)
        }
        Command::Audit { config, command } => audit(config.as_deref(), command),
        Command::Reload { config } => {
            let config = Config::load(&config)?;
            let Some(admin) = &config.admin else {
                bail!("no [admin] section: send SIGHUP to the gateway instead");
            };
            let client = AdminClient::new(admin.listen, admin.token.clone());
            client.reload_tls()?;
            client.reload_schemas()?;
            println!("TLS material and schemas reloaded");
            Ok(())
        }
    }
}

async fn wait_for_stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The registry, through the admin API when a gateway runs, or opened directly.
enum Access {
    Admin(AdminClient),
    Direct(Registry),
}

fn access(config: &Config) -> anyhow::Result<Access> {
    if let Some(admin) = &config.admin {
        if AdminClient::is_up(admin.listen) {
            return Ok(Access::Admin(AdminClient::new(
                admin.listen,
                admin.token.clone(),
            )));
        }
    }
    match Registry::open(&config.registry_path) {
        Ok(r) => Ok(Access::Direct(r)),
        Err(RegistryError::Locked(path)) => bail!(
            "registry {} is held by a running gateway, and {}",
            path.display(),
            match &config.admin {
                Some(a) => format!("its admin API at {} does not answer", a.listen),
                None => "no [admin] section is configured: add one to manage devices while the gateway runs".into(),
            }
        ),
        Err(e) => Err(e.into()),
    }
}

fn cert_fingerprint(path: &Path) -> anyhow::Result<Fingerprint> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(path)
        .with_context(|| format!("{}: not a PEM certificate", path.display()))?;
    gatehouse::identity::PeerCertificate::parse(&der)
        .with_context(|| format!("{}: not an X.509 certificate", path.display()))?;
    Ok(Fingerprint::of(&der))
}

fn manifest_enrollments(path: &Path) -> anyhow::Result<Vec<Enrollment>> {
    let manifest = gatehouse_pki::Manifest::load(path)?;
    if manifest.devices.is_empty() {
        bail!("manifest {} lists no devices", path.display());
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::with_capacity(manifest.devices.len());
    for entry in manifest.devices {
        let cert = base.join(&entry.cert);
        if cert.exists() {
            let actual = cert_fingerprint(&cert)?.to_string();
            if !actual.eq_ignore_ascii_case(&entry.sha256) {
                bail!(
                    "manifest entry {}: certificate {} has sha256 {actual}, the manifest says {}; nothing enrolled",
                    entry.id,
                    cert.display(),
                    entry.sha256
                );
            }
        }
        out.push(Enrollment {
            id: entry.id,
            device_type: entry.device_type,
            sha256: entry.sha256.to_ascii_lowercase(),
            labels: BTreeMap::new(),
        });
    }
    Ok(out)
}

fn audit(config: Option<&Path>, command: AuditCommand) -> anyhow::Result<()> {
    use gatehouse::auditlog;
    let load = || -> anyhow::Result<gatehouse::config::AuditConfig> {
        let Some(path) = config else {
            bail!("give --config (or GATEHOUSE_CONFIG) to find the audit log");
        };
        Config::load(path)?
            .audit
            .ok_or_else(|| anyhow::anyhow!("the config has no [audit] section"))
    };
    match command {
        AuditCommand::Show {
            device,
            since,
            command,
            json,
        } => {
            let cfg = load()?;
            let since_ms = match since {
                Some(t) => Some(
                    (time::OffsetDateTime::parse(
                        &t,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .with_context(|| {
                        format!("--since {t:?} is not an RFC 3339 time, e.g. 2026-11-25T10:00:00Z")
                    })?
                    .unix_timestamp_nanos()
                        / 1_000_000) as i64,
                ),
                None => None,
            };
            let mut contents = auditlog::read(&cfg.dir)?;
            let records = contents.records.remove(&device).unwrap_or_default();
            let matches_command = |r: &gatehouse::audit::Record| match (&command, &r.command_id) {
                (None, _) => true,
                (Some(want), Some(id)) => {
                    id.as_str() == Some(want.as_str())
                        || id.as_u64().is_some_and(|n| want.parse() == Ok(n))
                }
                (Some(_), None) => false,
            };
            let shown: Vec<_> = records
                .iter()
                .filter(|r| since_ms.is_none_or(|s| r.time_ms >= s))
                .filter(|r| matches_command(r))
                .collect();
            if json {
                for r in &shown {
                    println!("{}", serde_json::to_string(r)?);
                }
                return Ok(());
            }
            if shown.is_empty() {
                println!("no records for {device}");
                return Ok(());
            }
            println!(
                "{:>6}  {:<24} {:<18} {:<10} {:<8} {:>9}  DETAIL",
                "SEQ", "TIME (UTC)", "KIND", "COMMAND", "VERDICT", "RTT"
            );
            for r in shown {
                let time = time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(r.time_ms) * 1_000_000,
                )
                .map(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default()
                })
                .unwrap_or_default();
                let id = r
                    .command_id
                    .as_ref()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .unwrap_or_default();
                let rtt = r
                    .rtt_us
                    .map(|us| format!("{:.1} ms", us as f64 / 1000.0))
                    .unwrap_or_default();
                let detail = r
                    .detail
                    .clone()
                    .or_else(|| r.payload.clone())
                    .unwrap_or_default();
                println!(
                    "{:>6}  {:<24} {:<18} {:<10} {:<8} {:>9}  {}",
                    r.seq,
                    time,
                    r.kind.as_str(),
                    id,
                    r.verdict.as_deref().unwrap_or(""),
                    rtt,
                    detail
                );
            }
            Ok(())
        }
        AuditCommand::Verify {
            device,
            all,
            file,
            key,
        } => {
            let key_path = match key {
                Some(k) => k,
                None => load()?.public_key.ok_or_else(|| {
                    anyhow::anyhow!("give --key audit.pub (or set [audit] public_key)")
                })?,
            };
            let public = auditlog::load_public_key(&key_path)?;
            if let Some(file) = file {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("{}", file.display()))?;
                let export: auditlog::Export = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not an audit export", file.display()))?;
                return match auditlog::verify_export(&export, &public) {
                    Ok(v) => {
                        println!(
                            "OK   {}: {} records, signed up to {}",
                            v.device,
                            v.records,
                            v.checkpointed_to
                                .map(|s| s.to_string())
                                .unwrap_or_else(|| "none".into())
                        );
                        Ok(())
                    }
                    Err(f) => bail!("FAILED {f}"),
                };
            }
            if device.is_none() && !all {
                bail!("give a DEVICE, --all, or --file FILE");
            }
            let cfg = load()?;
            let verdict = auditlog::verify_dir(&cfg.dir, &public, device.as_deref())?;
            for v in &verdict.verified {
                println!(
                    "OK     {}: {} records, signed up to {}{}",
                    v.device,
                    v.records,
                    v.checkpointed_to
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "none".into()),
                    if v.unsigned_tail > 0 {
                        format!(
                            " ({} newer records covered by the chain only)",
                            v.unsigned_tail
                        )
                    } else {
                        String::new()
                    }
                );
            }
            for f in &verdict.failures {
                println!("FAILED {f}");
            }
            if let Some(d) = &device {
                if verdict.verified.is_empty() && verdict.failures.is_empty() {
                    bail!("no audit records for {d}");
                }
            }
            if verdict.failures.is_empty() {
                println!("verified: {} device log(s) intact", verdict.verified.len());
                Ok(())
            } else {
                bail!(
                    "{} device log(s) failed verification",
                    verdict.failures.len()
                )
            }
        }
        AuditCommand::Export { device, out } => {
            let cfg = load()?;
            let export = auditlog::export(&cfg.dir, &device)?;
            if export.records.is_empty() {
                bail!("no audit records for {device}");
            }
            gatehouse_pki::write_atomic(
                &out,
                serde_json::to_string_pretty(&export)?.as_bytes(),
                false,
            )?;
            println!(
                "exported {} records and {} checkpoints of {device} to {}",
                export.records.len(),
                export.checkpoints.len(),
                out.display()
            );
            Ok(())
        }
    }
}

fn deadletters(config: &Config, id: &str, json: bool) -> anyhow::Result<()> {
    gatehouse_pki::validate_device_id(id)?;
    let letters = match access(config)? {
        Access::Admin(c) => c.deadletters(id)?,
        Access::Direct(r) => {
            if r.get(id).is_none() {
                bail!(RegistryError::UnknownDevice(id.to_string()));
            }
            gatehouse::deadletter::DeadLetterStore::open(r.db(), config.deadletter.per_device)?
                .list(id)?
        }
    };
    for l in &letters {
        if json {
            println!("{}", serde_json::to_string(l)?);
            continue;
        }
        let payload = l.payload();
        let shown = if l.encoding == "json" {
            String::from_utf8_lossy(&payload).into_owned()
        } else {
            format!("cbor {}", hex::encode(&payload))
        };
        println!(
            "#{} {} {} {} {} at {:?}: {}\n    {}{}",
            l.seq,
            l.time,
            l.route,
            l.direction,
            l.code,
            l.pointer,
            l.message,
            shown,
            if l.truncated {
                format!(" ... ({} bytes in all)", l.payload_len)
            } else {
                String::new()
            }
        );
    }
    if !json && letters.is_empty() {
        println!("no rejected frames stored for {id}");
    }
    Ok(())
}

fn print_device(d: &Device) {
    println!("id           {}", d.id);
    println!("type         {}", d.device_type);
    println!("status       {}", d.status.as_str());
    println!("created      {}", d.created_at);
    println!("updated      {}", d.updated_at);
    for fp in &d.fingerprints {
        println!("cert sha256  {fp}");
    }
    for (k, v) in &d.labels {
        println!("label        {k}={v}");
    }
}

fn devices(config: &Config, command: DevicesCommand) -> anyhow::Result<()> {
    let access = access(config)?;
    let set_status = |id: &str, status: DeviceStatus| -> anyhow::Result<Device> {
        gatehouse_pki::validate_device_id(id)?;
        Ok(match &access {
            Access::Admin(c) => c.set_status(id, status)?,
            Access::Direct(r) => r.set_status(id, status)?,
        })
    };
    match command {
        DevicesCommand::Enroll {
            id,
            device_type,
            cert,
            labels,
            manifest,
        } => {
            let enrollments = match (id, device_type, cert, manifest) {
                (Some(id), Some(device_type), Some(cert), None) => vec![Enrollment {
                    id,
                    device_type,
                    sha256: cert_fingerprint(&cert)?.to_string(),
                    labels: labels.into_iter().collect(),
                }],
                (None, _, _, Some(manifest)) => manifest_enrollments(&manifest)?,
                _ => bail!("give either --id, --type and --cert, or --manifest"),
            };
            let enrolled = match &access {
                Access::Admin(c) => c.enroll(enrollments)?,
                Access::Direct(r) => r.enroll_many(enrollments)?,
            };
            println!("enrolled {} device(s)", enrolled.len());
        }
        DevicesCommand::List { json } => {
            let all: Vec<Device> = match &access {
                Access::Admin(c) => c.list()?,
                Access::Direct(r) => r.list().iter().map(|d| (**d).clone()).collect(),
            };
            if json {
                for d in &all {
                    println!("{}", serde_json::to_string(d)?);
                }
            } else {
                println!(
                    "{:<24} {:<16} {:<10} {:>5}  UPDATED",
                    "ID", "TYPE", "STATUS", "CERTS"
                );
                for d in &all {
                    println!(
                        "{:<24} {:<16} {:<10} {:>5}  {}",
                        d.id,
                        d.device_type,
                        d.status.as_str(),
                        d.fingerprints.len(),
                        d.updated_at
                    );
                }
            }
        }
        DevicesCommand::Show { id } => {
            gatehouse_pki::validate_device_id(&id)?;
            let d = match &access {
                Access::Admin(c) => c.show(&id)?,
                Access::Direct(r) => r
                    .get(&id)
                    .map(|d| (*d).clone())
                    .ok_or_else(|| RegistryError::UnknownDevice(id.clone()))?,
            };
            print_device(&d);
        }
        DevicesCommand::Suspend { id } => {
            let d = set_status(&id, DeviceStatus::Suspended)?;
            println!("device {} is {}", d.id, d.status.as_str());
        }
        DevicesCommand::Resume { id } => {
            let d = set_status(&id, DeviceStatus::Active)?;
            println!("device {} is {}", d.id, d.status.as_str());
        }
        DevicesCommand::Revoke { id } => {
            let d = set_status(&id, DeviceStatus::Revoked)?;
            println!("device {} is {}", d.id, d.status.as_str());
        }
    }
    Ok(())
}
