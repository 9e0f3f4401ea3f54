//! `gatehouse-pki`: issues the CA, server and device certificates of a Gatehouse deployment
//! and revokes them. A thin shell over the `gatehouse_pki` library.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gatehouse_pki::{DeviceCertOptions, PkiDir, DEFAULT_CRL_VALIDITY_DAYS};

#[derive(Parser)]
#[command(
    name = "gatehouse-pki",
    version,
    about = "Issue and revoke Gatehouse certificates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a CA (ECDSA P-256): DIR/ca.pem, DIR/ca.key (mode 0600) and an empty DIR/crl.pem.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name; default: "Gatehouse Device CA" and 8 random hex digits, so
        /// that no two CAs share a name.
        #[arg(long)]
        name: Option<String>,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue the gateway's server certificate: DIR/server.pem and DIR/server.key.
    Server {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long = "dns", num_args = 1..)]
        dns: Vec<String>,
        #[arg(long = "ip", num_args = 1..)]
        ip: Vec<IpAddr>,
    },
    /// Issue an operator's admin certificate: DIR/admins/NAME.pem and DIR/admins/NAME.key
    /// (90 days). The admin listener accepts it when `[admin] clients` names NAME.
    Admin {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Issue one device certificate: DIR/devices/ID.pem and DIR/devices/ID.key.
    Device {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long = "type")]
        device_type: String,
        /// Issue another certificate for a device that already has one.
        #[arg(long)]
        rotate: bool,
    },
    /// Issue N device certificates PREFIX-00001... and a manifest DIR/fleet-PREFIX.json.
    Fleet {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long = "type")]
        device_type: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        prefix: String,
    },
    /// Revoke every certificate of a device and rewrite DIR/crl.pem.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: String,
    },
    /// Create the gateway's Ed25519 audit signing key: DIR/audit.key (0600) and DIR/audit.pub.
    AuditKey {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Re-sign DIR/crl.pem with a fresh next-update time (run it before the old one expires).
    Crl {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = DEFAULT_CRL_VALIDITY_DAYS)]
        days: u32,
    },
    /// List the device certificates this CA issued.
    List {
        #[arg(long)]
        dir: PathBuf,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatehouse-pki: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { dir, name, force } => {
            let pki = PkiDir::init_named(&dir, name.as_deref(), force)?;
            println!("CA written to {}", pki.ca_cert_path().display());
        }
        Command::Server { dir, dns, ip } => {
            let pki = PkiDir::open(&dir)?;
            let issued = pki.issue_server(&dns, &ip)?;
            println!(
                "server certificate written to {} (sha256 {})",
                dir.join(PkiDir::SERVER_CERT).display(),
                issued.fingerprint_hex()
            );
        }
        Command::Admin { dir, name } => {
            let pki = PkiDir::open(&dir)?;
            let (issued, path) = pki.issue_admin(&name)?;
            println!(
                "admin certificate for {name} written to {} (sha256 {}, valid until {})",
                path.display(),
                issued.fingerprint_hex(),
                issued.not_after
            );
        }
        Command::Device {
            dir,
            id,
            device_type,
            rotate,
        } => {
            let mut pki = PkiDir::open(&dir)?;
            let entry =
                pki.issue_device(&id, &device_type, rotate, &DeviceCertOptions::default())?;
            println!(
                "device {} ({}) written to {} (sha256 {})",
                entry.id,
                entry.device_type,
                pki.device_cert_path(&id).display(),
                entry.sha256
            );
        }
        Command::Fleet {
            dir,
            device_type,
            count,
            prefix,
        } => {
            let mut pki = PkiDir::open(&dir)?;
            let started = std::time::Instant::now();
            let (manifest, path) = pki.issue_fleet(&device_type, count, &prefix)?;
            println!(
                "{} {} certificates issued in {:.2?}; manifest {}",
                manifest.devices.len(),
                device_type,
                started.elapsed(),
                path.display()
            );
        }
        Command::Revoke { dir, id } => {
            let mut pki = PkiDir::open(&dir)?;
            let revoked = pki.revoke(&id)?;
            for entry in revoked {
                println!("revoked {} serial {}", entry.id, entry.serial);
            }
            println!("CRL rewritten: {}", pki.crl_path().display());
        }
        Command::AuditKey { dir, force } => {
            let pki = PkiDir::open(&dir)?;
            let key = pki.issue_audit_key(force)?;
            println!(
                "audit key written to {} (public key {} in {})",
                dir.join(PkiDir::AUDIT_KEY).display(),
                key.public_line().trim(),
                dir.join(PkiDir::AUDIT_PUB).display()
            );
        }
        Command::Crl { dir, days } => {
            let mut pki = PkiDir::open(&dir)?;
            let path = pki.write_crl(time::Duration::days(days.into()))?;
            println!("CRL re-signed: {}", path.display());
        }
        Command::List { dir, json } => {
            let pki = PkiDir::open(&dir)?;
            if json {
                for entry in pki.entries() {
                    println!("{}", serde_json::to_string(entry)?);
                }
            } else {
                println!(
                    "{:<24} {:<16} {:<34} {:<10} NOT AFTER",
                    "ID", "TYPE", "SERIAL", "STATUS"
                );
                for e in pki.entries() {
                    let status = if e.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "valid"
                    };
                    println!(
                        "{:<24} {:<16} {:<34} {:<10} {}",
                        e.id,
                        e.device_type,
                        e.serial,
                        status,
                        e.not_after.date()
                    );
                }
            }
        }
    }
    Ok(())
}
