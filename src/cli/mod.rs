//! The command line: one global `--config` (or `GATEHOUSE_CONFIG`) and log format, and one
//! file per subcommand group: [`serve`] (serve, check, reload), [`devices`] (the registry and
//! dead letters), [`audit`] (the command audit log).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use gatehouse::config::Config;

pub mod audit;
pub mod crl;
pub mod devices;
pub mod serve;
pub mod top;

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "mTLS WebSocket gateway for device fleets"
)]
pub struct Cli {
    /// The gateway's configuration file (before or after the subcommand).
    #[arg(long, global = true, env = "GATEHOUSE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(
        long,
        global = true,
        env = "GATEHOUSE_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Validate a config file and every file it names, without binding any port.
    Check,
    /// Show a device's rejected frames (the dead-letter store), oldest first.
    Deadletters {
        id: String,
        /// JSON lines instead of a readable listing.
        #[arg(long)]
        json: bool,
    },
    /// Query, verify and export the per-device command audit log.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Ask the running gateway to reload its configuration, TLS material and schemas (like
    /// SIGHUP). A broken file, or a change that needs a restart, changes nothing.
    Reload,
    /// Ask the running gateway to drain: new sessions get 503, open ones are closed with
    /// 1001 spread over the grace period, then it exits.
    Drain {
        /// Time to spread the closes over (default: server.drain_grace_ms).
        #[arg(long)]
        grace_ms: Option<u64>,
    },
    /// List the running gateway's live sessions.
    Sessions {
        #[arg(long)]
        device: Option<String>,
        #[arg(long = "type")]
        device_type: Option<String>,
        #[arg(long)]
        route: Option<String>,
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// A live view of the running gateway: sessions, handshakes and refusals, frames and
    /// bytes, validation failures, limit hits, backends, the busiest devices.
    Top {
        /// Print one view (two samples an interval apart) and exit.
        #[arg(long)]
        once: bool,
        /// Milliseconds between refreshes.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Call any endpoint of the running gateway's admin API (docs/admin-api.md) and print its
    /// answer, e.g. `gatehouse api GET '/v1/devices?type=lock'`.
    Api {
        /// GET, POST or DELETE.
        method: String,
        /// The path and query, e.g. /v1/sessions?route=telemetry.v1.
        path: String,
        /// A JSON request body, or @FILE to read it from a file.
        #[arg(long)]
        data: Option<String>,
    },
    /// Publish CRLs to every gateway of a cluster.
    Crl {
        #[command(subcommand)]
        command: crl::CrlCommand,
    },
    /// Manage the device registry (through the admin API while the gateway runs).
    Devices {
        #[command(subcommand)]
        command: devices::DevicesCommand,
    },
}

/// Logs to standard error; colour only when that is a terminal.
pub fn init_tracing(format: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// The config file, which every subcommand but `audit verify --file` needs.
fn config_path(config: Option<&Path>) -> anyhow::Result<&Path> {
    config.ok_or_else(|| {
        anyhow::anyhow!(
            "give --config FILE (or set GATEHOUSE_CONFIG) to name the gateway's configuration"
        )
    })
}

fn load(config: Option<&Path>) -> anyhow::Result<Config> {
    let path = config_path(config)?;
    Config::load(path).with_context(|| format!("loading {}", path.display()))
}

/// A time as RFC 3339 (UTC), the one format the CLI prints.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config.as_deref();
    match cli.command {
        Command::Serve => serve::serve(load(config)?),
        Command::Check => serve::check(config_path(config)?),
        Command::Reload => serve::reload(&load(config)?),
        Command::Drain { grace_ms } => serve::drain(&load(config)?, grace_ms),
        Command::Sessions {
            device,
            device_type,
            route,
            json,
        } => devices::sessions(
            &load(config)?,
            gatehouse::session::table::Filter {
                device,
                device_type,
                route,
            },
            json,
        ),
        Command::Devices { command } => devices::devices(&load(config)?, command),
        Command::Top { once, interval_ms } => top::top(
            &load(config)?,
            once,
            std::time::Duration::from_millis(interval_ms.max(100)),
        ),
        Command::Deadletters { id, json } => devices::deadletters(&load(config)?, &id, json),
        Command::Audit { command } => audit::audit(config, command),
        Command::Crl { command } => crl::crl(&load(config)?, command),
        Command::Api { method, path, data } => serve::api(&load(config)?, &method, &path, data),
    }
}
