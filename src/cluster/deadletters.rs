//! Dead letters in the cluster: one JetStream stream, `{prefix}-deadletters`, a subject per
//! device (`{prefix}.deadletters.<device>`) and a per-subject message limit, so the stream
//! itself keeps the last N of each device (oldest discarded first) on every gateway's behalf.
//! While NATS is unreachable the writer's stores fail and the frames are dropped and counted
//! (`gatehouse_deadletters_dropped_total`): a rejected frame is diagnostics, never worth
//! holding a session for.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::{Cluster, ClusterError};
use crate::storage::{DeadLetter, DeadLetterStore, RegistryError};

fn unavailable(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unavailable(format!("NATS dead letters: {e}"))
}

pub struct NatsDeadLetters {
    js: jetstream::Context,
    stream: stream::Stream,
    subject_prefix: String,
    per_device: usize,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
    stored: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for NatsDeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsDeadLetters")
            .field("subjects", &self.subject_prefix)
            .finish_non_exhaustive()
    }
}

impl NatsDeadLetters {
    pub async fn open(cluster: &Cluster, per_device: usize) -> Result<Self, ClusterError> {
        let name = cluster.config.name_of("deadletters");
        let subject_prefix = format!("{}.deadletters", cluster.config.prefix);
        let stream = cluster
            .js
            .get_or_create_stream(stream::Config {
                name: name.clone(),
                description: Some(
                    "gatehouse dead letters: the last rejected frames per device".into(),
                ),
                subjects: vec![format!("{subject_prefix}.>")],
                max_messages_per_subject: per_device as i64,
                discard: stream::DiscardPolicy::Old,
                num_replicas: cluster.config.replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Nats(format!("stream {name}: {e}")))?;
        Ok(Self {
            js: cluster.js.clone(),
            stream,
            subject_prefix,
            per_device,
            runtime: tokio::runtime::Handle::current(),
            timeout: cluster.config.timeout,
            stored: tokio::sync::watch::Sender::new(0),
        })
    }

    fn subject(&self, device: &str) -> String {
        format!("{}.{device}", self.subject_prefix)
    }

    fn run<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, RegistryError>>,
    ) -> Result<T, RegistryError> {
        super::block_on(&self.runtime, self.timeout * 2, f, |t| {
            unavailable(format!("no answer in {} ms", t.as_millis()))
        })
    }
}

impl DeadLetterStore for NatsDeadLetters {
    fn record(&self, letter: DeadLetter) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec(&letter).map_err(|e| RegistryError::Corrupt {
            key: letter.device_id.clone(),
            reason: e.to_string(),
        })?;
        let subject = self.subject(&letter.device_id);
        self.run(async {
            self.js
                .publish(subject, bytes.into())
                .await
                .map_err(unavailable)?
                .await
                .map_err(unavailable)
        })?;
        self.stored.send_modify(|n| *n += 1);
        Ok(())
    }

    fn list(&self, device: &str) -> Result<Vec<DeadLetter>, RegistryError> {
        let subject = self.subject(device);
        let limit = self.per_device;
        self.run(async move {
            let payloads = super::read_subject(&self.stream, subject, limit)
                .await
                .map_err(unavailable)?;
            let mut out = Vec::with_capacity(payloads.len());
            for (n, payload) in payloads.iter().enumerate() {
                match serde_json::from_slice::<DeadLetter>(payload) {
                    Ok(mut letter) => {
                        letter.seq = n as u64;
                        out.push(letter);
                    }
                    Err(e) => tracing::warn!(error = %e, "unreadable dead letter in the cluster stream: skipped"),
                }
            }
            Ok(out)
        })
    }

    fn stored(&self) -> tokio::sync::watch::Receiver<u64> {
        self.stored.subscribe()
    }
}
