//! `gatehouse serve`, `check`, `reload`, `drain` and `api` (any admin API call).

use std::path::Path;

use anyhow::{bail, Context};
use gatehouse::admin::{AdminClient, Call};
use gatehouse::config::Config;
use tokio_util::sync::CancellationToken;

/// Runs the gateway until SIGTERM or SIGINT.
pub fn serve(config: Config) -> anyhow::Result<()> {
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

/// Loads the config and every file it names (TLS material, CRLs, backend TLS, schemas, the
/// admin token, the audit signing and public keys) and prints what it found.
pub fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let tls = gatehouse::net::tls::TlsState::load(&config.runtime.tls)?;
    gatehouse::net::tls::backend_client_config(&config.runtime.backend)?;
    if let Some(audit) = &config.audit {
        gatehouse::audit::load_signing_key(&audit.signing_key)?;
        if let Some(public) = &audit.public_key {
            gatehouse::audit::load_public_key(public)?;
        }
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let stale = tls.current().crls.stale(now).count();
    println!("config {} is valid", path.display());
    println!("  listen            {}", config.listen);
    println!(
        "  client CA         {}",
        config.runtime.tls.client_ca.display()
    );
    println!(
        "  CRLs              {} file(s), {} revoked serial(s), {} stale",
        config.runtime.tls.crls.len(),
        tls.current().crls.len(),
        stale
    );
    match &config.stores {
        gatehouse::config::Stores::Embedded { registry_path } => {
            println!("  registry          {}", registry_path.display())
        }
        gatehouse::config::Stores::Cluster(c) => println!(
            "  cluster           {} as {:?}, {} replica(s), prefix {:?}",
            c.servers.join(", "),
            c.name,
            c.replicas,
            c.prefix
        ),
    }
    if let Some(audit) = &config.audit {
        println!("  audit log         {}", audit.dir.display());
    }
    for route in config.runtime.routes.iter() {
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
    let schemas = gatehouse::config::load_schemas(&config.runtime.schemas_dir)?;
    for (t, kinds) in schemas.device_types() {
        let names: Vec<&str> = kinds.iter().map(|k| k.file_name()).collect();
        println!("  schemas {:<14} {}", t, names.join(", "));
    }
    let missing = config.runtime.routes.missing_schemas(&schemas);
    for (route, device_type, file) in &missing {
        println!(
            "error: route {route} allows device type {device_type} but {} is missing",
            config
                .runtime
                .schemas_dir
                .join(device_type)
                .join(file)
                .display()
        );
    }
    if !missing.is_empty() {
        bail!(
            "{} schema file(s) missing: devices of those types would be refused on those routes",
            missing.len()
        );
    }
    if stale > 0 {
        println!("warning: {stale} CRL(s) are past their next update (tls.stale_crl decides what happens)");
    }
    Ok(())
}

/// Asks the running gateway to reload TLS material and schemas.
pub fn reload(config: &Config) -> anyhow::Result<()> {
    let Some(client) = AdminClient::for_config(config) else {
        bail!("no [admin] section: send SIGHUP to the gateway instead");
    };
    let client = client?;
    let report: gatehouse::admin::ReloadReport = client.call(Call::post("/v1/reload"))?;
    println!(
        "configuration, TLS material and schemas reloaded: {} route(s), {} device type(s), {} session(s) closed",
        report.routes, report.device_types, report.sessions_closed
    );
    Ok(())
}

/// Asks the running gateway to drain: new sessions refused, open ones closed over the grace
/// period, then it exits.
pub fn drain(config: &Config, grace_ms: Option<u64>) -> anyhow::Result<()> {
    let Some(client) = AdminClient::for_config(config) else {
        bail!("no [admin] section: stop the gateway with SIGTERM instead");
    };
    let client = client?;
    let report: gatehouse::admin::DrainReport =
        client.call(Call::post("/v1/drain").json(&gatehouse::admin::DrainRequest { grace_ms }))?;
    println!(
        "draining: {} session(s) closing over {} ms; the gateway exits when they are gone",
        report.sessions, report.grace_ms
    );
    Ok(())
}

/// `gatehouse api METHOD PATH [--data JSON|@FILE]`: one call, its answer on stdout (JSON
/// pretty-printed); a refusal is the command's error, with the API's code and message.
pub fn api(config: &Config, method: &str, path: &str, data: Option<String>) -> anyhow::Result<()> {
    let Some(client) = AdminClient::for_config(config) else {
        bail!("no [admin] section: the gateway has no admin API");
    };
    if !path.starts_with('/') {
        bail!("path {path:?} must start with / (e.g. /v1/devices)");
    }
    let mut call = Call::new(method.parse()?, path);
    if let Some(data) = data {
        let text = match data.strip_prefix('@') {
            Some(file) => {
                std::fs::read_to_string(file).with_context(|| format!("--data @{file}"))?
            }
            None => data,
        };
        call = call.json_text(&text);
    }
    let text = client?.call_text(call)?;
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Err(_) => print!("{text}"),
    }
    Ok(())
}
