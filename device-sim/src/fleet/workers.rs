//! A fleet larger than one process can hold (the open-file limit: one socket per device here,
//! two on the gateway) runs as several worker processes of this same binary, each with a
//! share of the devices and of the connection rate. Workers write one JSON line per second
//! (their progress) and one at the end (their report) on stdout; the coordinator adds the
//! progress lines up for its own progress line and merges the reports.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::{FleetReport, Progress};

/// Which share of the fleet a worker runs: devices whose position modulo `count` is `index`
/// (so every worker gets the same mix of types and source addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Partition {
    type Err = String;
    /// `INDEX/COUNT`, e.g. `0/4`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected INDEX/COUNT, e.g. 0/4"))?;
        let index = i.trim().parse().map_err(|_| format!("{s:?}: bad index"))?;
        let count: usize = n.trim().parse().map_err(|_| format!("{s:?}: bad count"))?;
        if count == 0 || index >= count {
            return Err(format!("{s:?}: index must be below count"));
        }
        Ok(Self { index, count })
    }
}

impl Partition {
    pub fn select<T>(&self, items: Vec<T>) -> Vec<T> {
        items
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index)
            .map(|(_, t)| t)
            .collect()
    }

    /// This worker's share of a fleet-wide connection rate (at least 1 per second).
    pub fn share(&self, rate: u32) -> u32 {
        let n = self.count as u32;
        (rate / n + u32::from((self.index as u32) < rate % n)).max(1)
    }
}

/// One line of a worker's output.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerLine {
    Progress(Progress),
    Report(Box<FleetReport>),
}

impl WorkerLine {
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("worker lines always serialize")
    }
}

/// Runs `workers` copies of `exe` with `args` plus `--worker i/N`, calls `progress` once a
/// second with the sum of their latest progress, and returns their merged report. A worker
/// that fails or ends without its report is an error naming it; the others are stopped.
pub async fn coordinate(
    exe: &Path,
    args: &[OsString],
    workers: usize,
    mut progress: impl FnMut(&Progress, Duration),
    shutdown: CancellationToken,
) -> anyhow::Result<FleetReport> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, anyhow::Result<WorkerLine>)>(256);
    let mut children = Vec::new();
    for i in 0..workers {
        let mut child = tokio::process::Command::new(exe)
            .args(args)
            .arg("--worker")
            .arg(format!("{i}/{workers}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start worker {i} ({}): {e}", exe.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let parsed = serde_json::from_str::<WorkerLine>(&line)
                    .map_err(|e| anyhow::anyhow!("worker {i} wrote {line:?}: {e}"));
                if tx.send((i, parsed)).await.is_err() {
                    return;
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    let started = Instant::now();
    let mut latest = vec![Progress::default(); workers];
    let mut reports: Vec<Option<FleetReport>> = (0..workers).map(|_| None).collect();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                // Workers share the terminal's Ctrl-C; give them time to report.
            }
            _ = tick.tick() => {
                let mut sum = Progress::default();
                for p in &latest {
                    sum.add(p);
                }
                progress(&sum, started.elapsed());
            }
            line = rx.recv() => match line {
                None => break,
                Some((i, Ok(WorkerLine::Progress(p)))) => latest[i] = p,
                Some((i, Ok(WorkerLine::Report(r)))) => reports[i] = Some(*r),
                Some((_, Err(e))) => return Err(e),
            },
        }
    }
    let mut merged = FleetReport::default();
    for (i, mut child) in children.into_iter().enumerate() {
        let status = child.wait().await?;
        match reports[i].take() {
            Some(r) if status.success() => merged.merge(&r),
            Some(_) => anyhow::bail!("worker {i} reported but exited with {status}"),
            None => anyhow::bail!("worker {i} exited with {status} without a report"),
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_the_fleet_once_and_split_the_rate() {
        let fleet: Vec<u32> = (0..10).collect();
        let parts: Vec<Partition> = (0..3).map(|i| format!("{i}/3").parse().unwrap()).collect();
        let mut seen: Vec<u32> = parts.iter().flat_map(|p| p.select(fleet.clone())).collect();
        seen.sort();
        assert_eq!(seen, fleet);
        assert_eq!(parts[0].select(fleet.clone()), [0, 3, 6, 9]);
        assert_eq!(parts.iter().map(|p| p.share(1000)).sum::<u32>(), 1000);
        assert_eq!(
            parts.iter().map(|p| p.share(2)).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        assert!("3/3".parse::<Partition>().is_err());
        assert!("1".parse::<Partition>().is_err());
        assert!("0/0".parse::<Partition>().is_err());
    }

    #[test]
    fn worker_lines_round_trip() {
        let p = Progress {
            connected: 5,
            sent: 9,
            ..Progress::default()
        };
        let line = WorkerLine::Progress(p).to_line();
        assert!(line.starts_with(r#"{"progress":"#), "{line}");
        match serde_json::from_str::<WorkerLine>(&line).unwrap() {
            WorkerLine::Progress(back) => assert_eq!(back, p),
            other => panic!("{other:?}"),
        }
        let mut r = FleetReport {
            devices: 3,
            processes: 1,
            ..FleetReport::default()
        };
        r.handshake.record(1234);
        match serde_json::from_str::<WorkerLine>(&WorkerLine::Report(Box::new(r)).to_line())
            .unwrap()
        {
            WorkerLine::Report(back) => {
                assert_eq!(back.devices, 3);
                assert_eq!(back.handshake.count(), 1);
            }
            other => panic!("{other:?}"),
        }
    }
}
