//! `gatehouse crl publish|list`: CRLs published to the cluster reach every gateway.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use gatehouse::config::Config;

#[derive(Subcommand)]
pub enum CrlCommand {
    /// Publish a CRL file (PEM, e.g. pki/crl.pem after `gatehouse-pki revoke`) to every
    /// gateway of the cluster; a later publish under the same name replaces it.
    Publish {
        file: PathBuf,
        /// The name it is kept under (default: the file name without .pem).
        #[arg(long)]
        name: Option<String>,
    },
    /// The CRLs published to the cluster.
    List,
}

pub fn crl(config: &Config, command: CrlCommand) -> anyhow::Result<()> {
    let Some(cluster) = config.stores.cluster() else {
        bail!("no [cluster] section: list the CRL file in tls.crl and run `gatehouse reload`");
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let c = gatehouse::cluster::Cluster::connect(cluster).await?;
        match command {
            CrlCommand::Publish { file, name } => {
                let pem = std::fs::read(&file).with_context(|| format!("{}", file.display()))?;
                let name = match name {
                    Some(n) => n,
                    None => file
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "crl".into()),
                };
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    bail!("CRL name {name:?}: use letters, digits, '-' or '_' (--name)");
                }
                let crls = gatehouse::cluster::crls::parse(&pem)
                    .map_err(|e| anyhow::anyhow!("{}: not a CRL: {e}", file.display()))?;
                let rev = gatehouse::cluster::crls::publish(&c, &name, &pem).await?;
                println!(
                    "published {} CRL(s) from {} as {name:?} (revision {rev}); every gateway applies it within a second",
                    crls.len(),
                    file.display()
                );
            }
            CrlCommand::List => {
                use futures_util::StreamExt;
                let store = gatehouse::cluster::crls::bucket(&c).await?;
                let mut keys = store.keys().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut n = 0;
                while let Some(k) = keys.next().await {
                    let k = k.map_err(|e| anyhow::anyhow!("{e}"))?;
                    if let Some(e) = store.entry(&k).await.map_err(|e| anyhow::anyhow!("{e}"))? {
                        println!("{k}  revision {}  {} bytes  {}", e.revision, e.value.len(), e.created);
                        n += 1;
                    }
                }
                if n == 0 {
                    println!("no CRL is published to the cluster");
                }
            }
        }
        Ok(())
    })
}
