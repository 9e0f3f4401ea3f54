//! `gatehouse audit show|verify|export`: through the admin API while the gateway runs, else
//! from the audit files directly (safe while nothing writes them); or verifies an export file
//! offline. Verification always happens here, with the public key the operator names: the
//! gateway only supplies the records.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use gatehouse::admin::{AdminClient, Call};
use gatehouse::audit;

#[derive(Subcommand)]
pub enum AuditCommand {
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

/// Where the records come from: the running gateway's admin API, or the files.
enum Source {
    Api(AdminClient),
    Files(gatehouse::config::AuditConfig),
    /// The cluster's audit streams, read on a runtime of the CLI's own.
    Cluster(
        Box<gatehouse::cluster::audit::AuditReader>,
        tokio::runtime::Runtime,
    ),
}

impl Source {
    fn open(config: Option<&Path>) -> anyhow::Result<Self> {
        let config = super::load(config)?;
        let Some(audit) = config.audit.clone() else {
            bail!("the config has no [audit] section");
        };
        if let Some(admin) = &config.admin {
            if AdminClient::is_up(admin.listen) {
                if let Some(client) = AdminClient::for_config(&config) {
                    return Ok(Self::Api(client?));
                }
            }
        }
        if let Some(cluster) = config.stores.cluster() {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let reader = runtime.block_on(async {
                let c = gatehouse::cluster::Cluster::connect(cluster).await?;
                gatehouse::cluster::audit::AuditReader::open(&c).await
            })?;
            return Ok(Self::Cluster(Box::new(reader), runtime));
        }
        Ok(Self::Files(audit))
    }

    fn export(&self, device: &str) -> anyhow::Result<audit::Export> {
        gatehouse_pki::validate_device_id(device)?;
        Ok(match self {
            Self::Api(c) => c.call(Call::get(format!("/v1/audit/{device}/export")))?,
            Self::Files(cfg) => audit::export(&cfg.dir, device)?,
            Self::Cluster(reader, runtime) => runtime.block_on(reader.export(device))?,
        })
    }
}

/// The `[audit]` section of the config.
fn audit_config(config: Option<&Path>) -> anyhow::Result<gatehouse::config::AuditConfig> {
    super::load(config)?
        .audit
        .ok_or_else(|| anyhow::anyhow!("the config has no [audit] section"))
}

pub fn audit(config: Option<&Path>, command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Show {
            device,
            since,
            command,
            json,
        } => show(&Source::open(config)?, &device, since, command, json),
        AuditCommand::Verify {
            device,
            all,
            file,
            key,
        } => {
            let key_path = match key {
                Some(k) => k,
                None => audit_config(config)?.public_key.ok_or_else(|| {
                    anyhow::anyhow!("give --key audit.pub (or set [audit] public_key)")
                })?,
            };
            let public = audit::load_public_key(&key_path)?;
            match file {
                Some(file) => verify_file(&file, &public),
                None if device.is_none() && !all => bail!("give a DEVICE, --all, or --file FILE"),
                None => verify(&Source::open(config)?, &public, device.as_deref()),
            }
        }
        AuditCommand::Export { device, out } => export(&Source::open(config)?, &device, &out),
    }
}

fn show(
    source: &Source,
    device: &str,
    since: Option<String>,
    command: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let since_ms = match since {
        Some(t) => Some(
            (time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                .with_context(|| {
                    format!("--since {t:?} is not an RFC 3339 time, e.g. 2026-11-25T10:00:00Z")
                })?
                .unix_timestamp_nanos()
                / 1_000_000) as i64,
        ),
        None => None,
    };
    let records = source.export(device)?.records;
    let shown: Vec<_> = records
        .iter()
        .filter(|r| since_ms.is_none_or(|s| r.time_ms >= s))
        .filter(|r| command.as_deref().is_none_or(|want| r.is_about(want)))
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
        let time =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.time_ms) * 1_000_000)
                .map(super::rfc3339)
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

fn signed_up_to(checkpointed_to: Option<u64>) -> String {
    checkpointed_to
        .map(|s| s.to_string())
        .unwrap_or_else(|| "none".into())
}

fn verify_file(file: &Path, public: &[u8; 32]) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    let export: audit::Export = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an audit export", file.display()))?;
    match audit::verify_export(&export, public) {
        Ok(v) => {
            println!(
                "OK   {}: {} records, signed up to {}",
                v.device,
                v.records,
                signed_up_to(v.checkpointed_to)
            );
            Ok(())
        }
        Err(f) => bail!("FAILED {f}"),
    }
}

fn verify(source: &Source, public: &[u8; 32], device: Option<&str>) -> anyhow::Result<()> {
    let verdict = match source {
        Source::Files(cfg) => audit::verify_dir(&cfg.dir, public, device)?,
        Source::Cluster(reader, runtime) => {
            runtime.block_on(reader.verify(public, device.map(str::to_string)))?
        }
        Source::Api(c) => {
            // The gateway names the devices (and any unreadable line); each device's records
            // are then verified here, with our key.
            let mut verdict = audit::DirVerdict {
                verified: Vec::new(),
                failures: Vec::new(),
            };
            let names: Vec<String> = match device {
                Some(d) => vec![d.to_string()],
                None => {
                    let listed: Vec<gatehouse::admin::AuditVerdict> =
                        c.call(Call::get("/v1/audit/verify"))?;
                    let mut names = Vec::new();
                    for v in listed {
                        if gatehouse_pki::validate_device_id(&v.device).is_ok() {
                            names.push(v.device);
                        } else {
                            // An unreadable line: the gateway cannot say whose it is.
                            verdict.failures.push(audit::Failure {
                                device: v.device,
                                seq: v.failed_seq.unwrap_or(0),
                                reason: v.reason.unwrap_or_default(),
                            });
                        }
                    }
                    names
                }
            };
            for name in names {
                let export = source.export(&name)?;
                if export.records.is_empty() && export.checkpoints.is_empty() {
                    continue;
                }
                match audit::verify_export(&export, public) {
                    Ok(ok) => verdict.verified.push(ok),
                    Err(f) => verdict.failures.push(f),
                }
            }
            verdict
        }
    };
    for v in &verdict.verified {
        println!(
            "OK     {}: {} records, signed up to {}{}",
            v.device,
            v.records,
            signed_up_to(v.checkpointed_to),
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
    if let Some(d) = device {
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

fn export(source: &Source, device: &str, out: &Path) -> anyhow::Result<()> {
    let export = source.export(device)?;
    if export.records.is_empty() {
        bail!("no audit records for {device}");
    }
    gatehouse_pki::write_atomic(
        out,
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
