//! HAProxy in front of several gateways, as `deploy/haproxy.cfg` has it: the shipped file
//! with this run's ports put in, so that the demo, the tests and the benchmarks run the
//! documented configuration itself. The process is killed when the value is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The shipped configuration.
pub const SHIPPED: &str = include_str!("../../deploy/haproxy.cfg");

/// `haproxy` on PATH, or Debian's /usr/sbin/haproxy.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|candidate| candidate.is_file())
}

/// One gateway behind the balancer: its device listener and its admin listener (the
/// `/readyz` health check).
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub devices: SocketAddr,
    pub admin: SocketAddr,
}

/// The shipped file with `frontend` as the bind address and `upstreams` as the servers.
/// `maxconn` is lowered to what one process may open here (20,000 files).
pub fn render(frontend: SocketAddr, upstreams: &[Upstream]) -> String {
    let mut out = String::new();
    for line in SHIPPED.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("server gw-") {
            continue;
        }
        let line = match trimmed {
            "bind :8443" => format!("    bind {frontend}"),
            "maxconn 200000" => "    maxconn 9000".to_string(),
            _ => line.to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    for u in upstreams {
        out.push_str(&format!(
            "    server {} {} port {}\n",
            u.name,
            u.devices,
            u.admin.port()
        ));
    }
    out
}

pub struct Haproxy {
    child: Child,
    pub frontend: SocketAddr,
    pub config: PathBuf,
}

impl Haproxy {
    /// Writes the configuration into `dir`, starts `binary` in the foreground, and waits
    /// (polling, at most 10 s) until the frontend accepts connections.
    pub async fn start(
        binary: &Path,
        dir: &Path,
        frontend: SocketAddr,
        upstreams: &[Upstream],
    ) -> anyhow::Result<Haproxy> {
        let config = dir.join("haproxy.cfg");
        std::fs::write(&config, render(frontend, upstreams))?;
        let log = std::fs::File::create(dir.join("haproxy.log"))?;
        let child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut proxy = Haproxy {
            child,
            frontend,
            config,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = proxy.child.try_wait()? {
                bail!(
                    "haproxy exited at start ({status}); its log is {}",
                    dir.join("haproxy.log").display()
                );
            }
            if tokio::net::TcpStream::connect(frontend).await.is_ok() {
                return Ok(proxy);
            }
            if Instant::now() >= deadline {
                bail!("haproxy did not listen on {frontend} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rendered_file_is_the_shipped_one_with_this_runs_addresses() {
        let up = |name: &str, d: u16, a: u16| Upstream {
            name: name.into(),
            devices: SocketAddr::from(([127, 0, 0, 1], d)),
            admin: SocketAddr::from(([127, 0, 0, 1], a)),
        };
        let text = render(
            "127.0.0.1:5000".parse().unwrap(),
            &[up("gw-a", 6001, 7001), up("gw-b", 6002, 7002)],
        );
        assert!(text.contains("    bind 127.0.0.1:5000\n"), "{text}");
        assert!(text.contains("    server gw-a 127.0.0.1:6001 port 7001\n"));
        assert!(text.contains("    server gw-b 127.0.0.1:6002 port 7002\n"));
        assert!(!text.contains("9001"), "the shipped servers are replaced");
        assert!(!text.contains(":8443"));
        // Everything else is the shipped file.
        for needed in [
            "mode tcp",
            "send-proxy-v2",
            "option httpchk GET /readyz",
            "balance leastconn",
        ] {
            assert!(text.contains(needed), "{needed}");
        }
    }
}
