//! The cluster stores: several gateways share their registry (and, in later parts, CRLs,
//! session ownership, audit chains and dead letters) through NATS JetStream, an existing
//! replicated engine: key-value buckets with watches and compare-and-set on revisions, and
//! streams. Nothing here is a consensus or replication scheme of our own. Each store is a
//! second implementation of a `storage` trait; the sessions do not know which one they use.
//!
//! [`Cluster::connect`] opens one NATS connection per gateway and tracks whether it is up, so
//! every store can say how stale its cached view may be (`DeviceStore::stale_for`).

pub mod audit;
pub mod crls;
pub mod deadletters;
pub mod ownership;
pub mod registry;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};

use crate::config::cluster::ClusterConfig;

pub use audit::NatsAudit;
pub use deadletters::NatsDeadLetters;
pub use ownership::{Claim, Ownership};
pub use registry::NatsRegistry;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach NATS at {servers}: {reason}")]
    Connect { servers: String, reason: String },
    #[error("NATS: {0}")]
    Nats(String),
    #[error("cluster.credentials {path}: {reason}")]
    Credentials { path: String, reason: String },
}

/// How often a watch is compared with its bucket's last sequence (see [`Lag`]).
pub(crate) const LAG_CHECK: Duration = Duration::from_secs(1);

/// Notices a watch that has stopped delivering. A KV watch is an ordered consumer on one
/// server; when that server dies the client notices only after missing two idle heartbeats
/// (about ten seconds), far beyond the one second a change may take to reach every gateway.
/// So each follower also asks for the bucket's last sequence every [`LAG_CHECK`]: a watch
/// that was behind at one check and has still not delivered what the bucket held then at
/// the next is reopened from the last revision it delivered.
#[derive(Debug, Default)]
pub(crate) struct Lag {
    behind_at: Option<u64>,
}

impl Lag {
    /// `bucket_last`: the bucket's last sequence now; `delivered`: the last revision the watch
    /// delivered. True when the watch should be reopened.
    pub(crate) fn stalled(&mut self, bucket_last: u64, delivered: u64) -> bool {
        let stalled = self.behind_at.is_some_and(|was| delivered < was);
        self.behind_at = (!stalled && bucket_last > delivered).then_some(bucket_last);
        stalled
    }
}

/// The bucket's last sequence, asked of the server (not the cached stream info).
pub(crate) async fn last_sequence(store: &kv::Store) -> Option<u64> {
    store
        .stream
        .get_info()
        .await
        .ok()
        .map(|info| info.state.last_sequence)
}

/// Whether the NATS connection is up, and since when it is not.
#[derive(Debug, Clone, Default)]
pub struct Link {
    down_since: Arc<Mutex<Option<Instant>>>,
}

impl Link {
    fn set(&self, up: bool) {
        let mut down = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        match (up, *down) {
            (true, _) => *down = None,
            (false, None) => *down = Some(Instant::now()),
            (false, Some(_)) => {}
        }
    }

    /// How long the connection has been down; `None` while it is up.
    pub fn down_for(&self) -> Option<Duration> {
        self.down_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
    }
}

/// One gateway's connection to the cluster.
#[derive(Clone)]
pub struct Cluster {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub config: ClusterConfig,
    pub link: Link,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("servers", &self.config.servers)
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects to the NATS servers of `config` (failing after `cluster.timeout_ms` when none
    /// answers: a gateway without its registry cannot admit anyone). Once connected, the
    /// client reconnects by itself, for ever; [`Link`] tracks the outages.
    pub async fn connect(config: &ClusterConfig) -> Result<Self, ClusterError> {
        let link = Link::default();
        let events = link.clone();
        let name = config.name.clone();
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("gatehouse {}", config.name))
            .connection_timeout(config.timeout)
            .request_timeout(Some(config.timeout))
            .max_reconnects(None)
            .event_callback(move |event| {
                let events = events.clone();
                let name = name.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            events.set(true);
                            tracing::info!(cluster.name = %name, "NATS connection up");
                        }
                        async_nats::Event::Disconnected => {
                            events.set(false);
                            tracing::warn!(cluster.name = %name, "NATS connection lost; reconnecting");
                        }
                        other => tracing::info!(cluster.name = %name, event = %other, "NATS event"),
                    }
                }
            });
        if let Some(path) = &config.credentials {
            options =
                options
                    .credentials_file(path)
                    .await
                    .map_err(|e| ClusterError::Credentials {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
        }
        if let Some(ca) = &config.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &config.tls_client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let servers: Vec<async_nats::ServerAddr> = config
            .servers
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        let client = tokio::time::timeout(config.timeout * 2, options.connect(servers))
            .await
            .map_err(|_| ClusterError::Connect {
                servers: config.servers.join(", "),
                reason: format!("no answer in {} ms", (config.timeout * 2).as_millis()),
            })?
            .map_err(|e| ClusterError::Connect {
                servers: config.servers.join(", "),
                reason: e.to_string(),
            })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(config.timeout);
        Ok(Self {
            client,
            js,
            config: config.clone(),
            link,
        })
    }

    /// The key-value bucket `{prefix}-{what}`, created with `config` when it does not exist
    /// yet (every gateway asks for the same configuration, so concurrent creation is
    /// harmless).
    pub async fn bucket(&self, what: &str, config: kv::Config) -> Result<kv::Store, ClusterError> {
        let name = self.config.name_of(what);
        if let Ok(store) = self.js.get_key_value(&name).await {
            return Ok(store);
        }
        let config = kv::Config {
            bucket: name.clone(),
            num_replicas: self.config.replicas,
            ..config
        };
        match self.js.create_key_value(config).await {
            Ok(store) => Ok(store),
            Err(create) => self
                .js
                .get_key_value(&name)
                .await
                .map_err(|_| ClusterError::Nats(format!("bucket {name}: {create}"))),
        }
    }
}

/// The messages of `subject` in `stream`, oldest first (at most the last `limit`): an ordered
/// consumer (single replica, recreated by the client on any gap), read until the stream says
/// nothing is pending. Retried from the start when the consumer fails on the way.
pub async fn read_subject(
    stream: &jetstream::stream::Stream,
    subject: String,
    limit: usize,
) -> Result<Vec<bytes::Bytes>, ClusterError> {
    use futures_util::StreamExt;
    use jetstream::consumer;
    let mut last_error = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
        }
        let read = async {
            let consumer = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: subject.clone(),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            let pending = consumer.cached_info().num_pending as usize;
            let mut out = std::collections::VecDeque::with_capacity(pending.min(limit));
            if pending == 0 {
                return Ok(Vec::new());
            }
            let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
            loop {
                let next = tokio::time::timeout(Duration::from_secs(5), messages.next())
                    .await
                    .map_err(|_| "no message in 5 s".to_string())?;
                let Some(m) = next else { break };
                let m = m.map_err(|e| e.to_string())?;
                let left = m.info().map(|i| i.pending).unwrap_or(0);
                out.push_back(m.payload.clone());
                if out.len() > limit {
                    out.pop_front();
                }
                if left == 0 {
                    break;
                }
            }
            Ok::<_, String>(out.into_iter().collect())
        };
        match read.await {
            Ok(v) => return Ok(v),
            Err(e) => last_error = e,
        }
    }
    Err(ClusterError::Nats(format!(
        "reading {subject}: {last_error}"
    )))
}

/// Runs `f` on `runtime` from a blocking caller (the store traits are blocking) and waits,
/// bounded by `timeout`; past it, `late` makes the caller's error.
pub(crate) fn block_on<T, E>(
    runtime: &tokio::runtime::Handle,
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
    late: impl FnOnce(Duration) -> E,
) -> Result<T, E> {
    runtime.block_on(async move {
        match tokio::time::timeout(timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(late(timeout)),
        }
    })
}

#[cfg(test)]
mod lag_tests {
    use super::Lag;

    #[test]
    fn a_watch_that_keeps_up_is_never_reopened() {
        let mut lag = Lag::default();
        // Changes arrive between checks, as they do within milliseconds.
        assert!(!lag.stalled(10, 10));
        assert!(!lag.stalled(12, 11));
        assert!(!lag.stalled(15, 12));
        assert!(!lag.stalled(15, 15));
        assert!(!lag.stalled(15, 15));
    }

    #[test]
    fn a_watch_still_behind_at_the_next_check_is_reopened_once() {
        let mut lag = Lag::default();
        assert!(!lag.stalled(20, 17));
        assert!(
            lag.stalled(21, 17),
            "17 < 20, what the bucket held a check ago"
        );
        // Reopened: the next check starts afresh.
        assert!(!lag.stalled(21, 17));
        assert!(!lag.stalled(21, 21), "caught up");
    }
}
