//! `gatehouse devices ...` and `gatehouse deadletters`: through the admin API while a
//! gateway runs, or on the embedded storage directly when none does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use gatehouse::admin::{AdminClient, Call};
use gatehouse::config::Config;
use gatehouse::model::{Device, DeviceStatus, Enrollment, Fingerprint};
use gatehouse::storage::{Embedded, RegistryError};

use super::rfc3339;

#[derive(Subcommand)]
pub enum DevicesCommand {
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
        /// Only devices of this type.
        #[arg(long = "type")]
        device_type: Option<String>,
        /// Only devices with this status (active, suspended, revoked).
        #[arg(long)]
        status: Option<String>,
        /// Only devices with this label, KEY=VALUE.
        #[arg(long)]
        label: Option<String>,
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
    /// Remove one certificate from a device (by --sha256 or --cert); its sessions on that
    /// certificate end (4003).
    RemoveCert {
        id: String,
        #[arg(long, conflicts_with = "cert", required_unless_present = "cert")]
        sha256: Option<String>,
        #[arg(long)]
        cert: Option<PathBuf>,
    },
    /// End a device's live sessions (close 4006) with a reason; it may reconnect.
    Kick {
        id: String,
        /// Sent to the device and its backend in the close frame.
        #[arg(long, default_value = "")]
        reason: String,
        /// Only this connection id (see `gatehouse sessions`).
        #[arg(long)]
        connection: Option<String>,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} must be KEY=VALUE"))
}

/// The registry, through the admin API when a gateway runs, or opened directly.
enum Access {
    Admin(AdminClient),
    Direct(Direct),
}

/// The stores opened by the CLI itself: sled, or the cluster's buckets (on a runtime of
/// the CLI's own, kept for as long as the stores are used).
struct Direct {
    devices: std::sync::Arc<dyn gatehouse::storage::DeviceStore>,
    dead_letters: std::sync::Arc<dyn gatehouse::storage::DeadLetterStore>,
    _runtime: Option<tokio::runtime::Runtime>,
}

/// Opens the cluster's registry and dead letters from the CLI (no gateway needed: any
/// change reaches the running gateways through the bucket's watch).
fn open_cluster(
    cluster: &gatehouse::config::cluster::ClusterConfig,
    per_device: usize,
) -> anyhow::Result<Direct> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (devices, dead_letters) = runtime.block_on(async {
        let c = gatehouse::cluster::Cluster::connect(cluster).await?;
        let devices = gatehouse::cluster::NatsRegistry::open(&c, shutdown).await?;
        let dead_letters = gatehouse::cluster::NatsDeadLetters::open(&c, per_device).await?;
        Ok::<_, gatehouse::cluster::ClusterError>((devices, dead_letters))
    })?;
    Ok(Direct {
        devices: std::sync::Arc::new(devices),
        dead_letters: std::sync::Arc::new(dead_letters),
        _runtime: Some(runtime),
    })
}

fn access(config: &Config) -> anyhow::Result<Access> {
    if let Some(admin) = &config.admin {
        if AdminClient::is_up(admin.listen) {
            if let Some(client) = AdminClient::for_config(config) {
                return Ok(Access::Admin(client?));
            }
        }
    }
    let registry_path = match &config.stores {
        gatehouse::config::Stores::Cluster(c) => {
            return Ok(Access::Direct(open_cluster(
                c,
                config.deadletter.per_device,
            )?))
        }
        gatehouse::config::Stores::Embedded { registry_path } => registry_path,
    };
    match Embedded::open(registry_path, config.deadletter.per_device) {
        Ok(r) => Ok(Access::Direct(Direct {
            devices: r.devices,
            dead_letters: r.dead_letters,
            _runtime: None,
        })),
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
    gatehouse::admission::identity::PeerCertificate::parse(&der)
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

/// `gatehouse sessions`: the running gateway's live sessions.
pub fn sessions(
    config: &Config,
    filter: gatehouse::session::table::Filter,
    json: bool,
) -> anyhow::Result<()> {
    let Access::Admin(c) = access(config)? else {
        bail!("no gateway is running (its admin API does not answer)");
    };
    let sessions: Vec<gatehouse::session::table::LiveSession> =
        c.call(Call::get("/v1/sessions").query(&filter))?;
    if json {
        for s in &sessions {
            println!("{}", serde_json::to_string(s)?);
        }
        return Ok(());
    }
    println!(
        "{:<20} {:<20} {:<14} {:<14} {:<22} {:>8} {:>8}  STARTED",
        "CONNECTION", "DEVICE", "TYPE", "ROUTE", "PEER", "UP", "DOWN"
    );
    for s in &sessions {
        println!(
            "{:<20} {:<20} {:<14} {:<14} {:<22} {:>8} {:>8}  {}",
            s.connection,
            s.device,
            s.device_type,
            s.route,
            s.peer,
            s.frames_up,
            s.frames_down,
            rfc3339(s.started)
        );
    }
    Ok(())
}

pub fn deadletters(config: &Config, id: &str, json: bool) -> anyhow::Result<()> {
    gatehouse_pki::validate_device_id(id)?;
    let letters = match access(config)? {
        Access::Admin(c) => c.call(Call::get(format!("/v1/devices/{id}/deadletters")))?,
        Access::Direct(s) => {
            if s.devices.get(id).is_none() {
                bail!(RegistryError::UnknownDevice(id.to_string()));
            }
            s.dead_letters.list(id)?
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
            rfc3339(l.time),
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
    println!("created      {}", rfc3339(d.created_at));
    println!("updated      {}", rfc3339(d.updated_at));
    for fp in &d.fingerprints {
        println!("cert sha256  {fp}");
    }
    for (k, v) in &d.labels {
        println!("label        {k}={v}");
    }
}

pub fn devices(config: &Config, command: DevicesCommand) -> anyhow::Result<()> {
    let access = access(config)?;
    let set_status = |id: &str, status: DeviceStatus| -> anyhow::Result<Device> {
        gatehouse_pki::validate_device_id(id)?;
        Ok(match &access {
            Access::Admin(c) => {
                let verb = match status {
                    DeviceStatus::Active => "resume",
                    DeviceStatus::Suspended => "suspend",
                    DeviceStatus::Revoked => "revoke",
                };
                c.call(Call::post(format!("/v1/devices/{id}/{verb}")))?
            }
            Access::Direct(s) => s.devices.set_status(id, status)?,
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
                Access::Admin(c) => c.call(Call::post("/v1/devices").json(
                    &gatehouse::admin::EnrollRequest {
                        devices: enrollments,
                    },
                ))?,
                Access::Direct(s) => s.devices.enroll_many(enrollments)?,
            };
            println!("enrolled {} device(s)", enrolled.len());
        }
        DevicesCommand::List {
            device_type,
            status,
            label,
            json,
        } => {
            let status = match status.as_deref() {
                None => None,
                Some("active") => Some(gatehouse::model::DeviceStatus::Active),
                Some("suspended") => Some(gatehouse::model::DeviceStatus::Suspended),
                Some("revoked") => Some(gatehouse::model::DeviceStatus::Revoked),
                Some(other) => {
                    bail!("--status {other:?}: use active, suspended or revoked")
                }
            };
            let query = gatehouse::model::DeviceQuery {
                device_type,
                status,
                label,
                after: None,
                limit: None,
            };
            let all: Vec<Device> = match &access {
                Access::Admin(c) => {
                    let mut q = query.clone();
                    let mut all = Vec::new();
                    loop {
                        let page: gatehouse::model::DevicePage =
                            c.call(Call::get("/v1/devices").query(&q))?;
                        all.extend(page.devices);
                        match page.next_after {
                            Some(next) => q.after = Some(next),
                            None => break all,
                        }
                    }
                }
                Access::Direct(s) => {
                    let every = s.devices.list();
                    let mut q = query.clone();
                    q.limit = Some(gatehouse::model::DeviceQuery::MAX_LIMIT);
                    let mut all = Vec::new();
                    loop {
                        let page = q
                            .page(every.iter().map(|d| &**d))
                            .map_err(anyhow::Error::msg)?;
                        all.extend(page.devices);
                        match page.next_after {
                            Some(next) => q.after = Some(next),
                            None => break all,
                        }
                    }
                }
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
                        rfc3339(d.updated_at)
                    );
                }
            }
        }
        DevicesCommand::Show { id } => {
            gatehouse_pki::validate_device_id(&id)?;
            match &access {
                Access::Admin(c) => {
                    let view: gatehouse::admin::DeviceView =
                        c.call(Call::get(format!("/v1/devices/{id}")))?;
                    print_device(&view.device);
                    if view.sessions.is_empty() {
                        println!("sessions     none live");
                    }
                    for s in &view.sessions {
                        println!(
                            "session      {} {} -> {} from {} since {} ({} frames up, {} down)",
                            s.connection,
                            s.route,
                            s.backend,
                            s.peer,
                            rfc3339(s.started),
                            s.frames_up,
                            s.frames_down
                        );
                    }
                    for r in &view.recent_refusals {
                        println!(
                            "refused      {} HTTP {} {} from {} ({})",
                            r.at, r.status, r.code, r.peer, r.connection
                        );
                    }
                }
                Access::Direct(s) => {
                    let d = s
                        .devices
                        .get(&id)
                        .ok_or_else(|| RegistryError::UnknownDevice(id.clone()))?;
                    print_device(&d);
                    println!("sessions     none (no gateway is running)");
                }
            }
        }
        DevicesCommand::RemoveCert { id, sha256, cert } => {
            gatehouse_pki::validate_device_id(&id)?;
            let sha256 = match (sha256, cert) {
                (Some(s), _) => s,
                (None, Some(path)) => cert_fingerprint(&path)?.to_string(),
                (None, None) => bail!("give --sha256 or --cert"),
            };
            let d = match &access {
                Access::Admin(c) => c.call(Call::delete(format!(
                    "/v1/devices/{id}/certificates/{sha256}"
                )))?,
                Access::Direct(s) => s.devices.remove_certificate(&id, &sha256)?,
            };
            println!(
                "device {} has {} certificate(s) left",
                d.id,
                d.fingerprints.len()
            );
        }
        DevicesCommand::Kick {
            id,
            reason,
            connection,
        } => {
            gatehouse_pki::validate_device_id(&id)?;
            let Access::Admin(c) = &access else {
                bail!("no gateway is running (its admin API does not answer): there are no sessions to end");
            };
            let ended: gatehouse::admin::Ended = c.call(
                Call::post(format!("/v1/devices/{id}/kick"))
                    .json(&gatehouse::admin::KickRequest { reason, connection }),
            )?;
            println!("ended {} session(s) of {id}", ended.sessions);
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
