//! CRLs published to the cluster: the `{prefix}-crls` key-value bucket holds one CRL (PEM) per
//! name, written by `gatehouse crl publish FILE`. Every gateway follows the bucket and hands
//! the CRLs to its TLS state next to the ones from its files, so `gatehouse-pki revoke` and one
//! publish reach every gateway; sessions on a newly listed certificate close with 4004 as for
//! a file change. A published CRL that does not parse is refused at publish time; one that
//! still fails to load on a gateway is logged and the previous set stays in force.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateRevocationListDer;
use tokio_util::sync::CancellationToken;

use super::{Cluster, ClusterError};
use crate::net::tls::TlsState;

pub async fn bucket(cluster: &Cluster) -> Result<kv::Store, ClusterError> {
    cluster
        .bucket(
            "crls",
            kv::Config {
                description: "gatehouse CRLs published to every gateway: name -> PEM".into(),
                history: 5,
                ..Default::default()
            },
        )
        .await
}

/// The CRLs of a PEM text (at least one), checked as CRLs.
pub fn parse(pem: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let crls = CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if crls.is_empty() {
        return Err("no X509 CRL block found".into());
    }
    for crl in &crls {
        crate::admission::identity::RevocationIndex::default()
            .add_crl(crl)
            .map_err(|e| e.to_string())?;
    }
    Ok(crls)
}

/// Publishes `pem` under `name`; the revision written.
pub async fn publish(cluster: &Cluster, name: &str, pem: &[u8]) -> Result<u64, ClusterError> {
    parse(pem).map_err(|e| ClusterError::Nats(format!("not a CRL: {e}")))?;
    bucket(cluster)
        .await?
        .put(name, bytes::Bytes::copy_from_slice(pem))
        .await
        .map_err(|e| ClusterError::Nats(e.to_string()))
}

/// Follows the bucket until `shutdown`, applying the whole published set on every change.
pub async fn follow(
    cluster: &Cluster,
    tls: Arc<TlsState>,
    shutdown: CancellationToken,
) -> Result<(), ClusterError> {
    let store = bucket(cluster).await?;
    tokio::spawn(async move {
        let mut published: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        loop {
            let mut watch = match store.watch_with_history(">").await {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!(error = %e, "cluster CRL watch not open yet");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let mut last = 0;
            let mut lag = super::Lag::default();
            let mut check = tokio::time::interval(super::LAG_CHECK);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = watch.next() => n,
                    _ = check.tick() => match super::last_sequence(&store).await {
                        Some(bucket_last) if lag.stalled(bucket_last, last) => {
                            tracing::warn!(delivered = last, bucket_last, "cluster CRL watch stalled (its NATS server went away?)");
                            None
                        }
                        _ => continue,
                    },
                };
                let Some(Ok(entry)) = next else { break };
                last = last.max(entry.revision);
                match entry.operation {
                    kv::Operation::Put => {
                        published.insert(entry.key.clone(), entry.value.to_vec());
                    }
                    _ => {
                        published.remove(&entry.key);
                    }
                }
                let mut all = Vec::new();
                for (name, pem) in &published {
                    match parse(pem) {
                        Ok(crls) => all.extend(crls),
                        Err(e) => {
                            tracing::error!(crl = %name, error = %e, "published CRL unreadable: ignored")
                        }
                    }
                }
                let n = all.len();
                match tls.set_published(all) {
                    Ok(()) => tracing::info!(crl = %entry.key, crls = n, "cluster CRLs applied"),
                    Err(e) => {
                        tracing::error!(crl = %entry.key, error = %e, "cluster CRLs not applied; the previous set stays in force")
                    }
                }
            }
            tracing::warn!("cluster CRL watch ended; reopening");
        }
    });
    Ok(())
}
