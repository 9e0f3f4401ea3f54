//! Session worker threads, each running a single-threaded runtime, like nginx's worker
//! processes: a session's TLS, parsing, validation and relaying all happen on one thread, with
//! no cross-thread wake-ups per frame (measured: about 20% less CPU per frame than tokio's
//! work-stealing scheduler for the same fleet, docs/benchmarks.md). Sessions are handed out
//! round-robin. The accept loop, admin API and storage stay on the main runtime.
//!
//! The workers are owned: [`SessionWorkers::stop`] ends every runtime (dropping the sessions
//! still on it) and joins the threads, so that once it returns no session code runs any more
//! and whatever the sessions recorded is in the storage queues.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;

pub struct SessionWorkers {
    handles: Vec<tokio::runtime::Handle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
    next: AtomicUsize,
}

impl std::fmt::Debug for SessionWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionWorkers")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl SessionWorkers {
    /// Starts `n` threads. Each runs until [`SessionWorkers::stop`].
    pub fn start(n: std::num::NonZeroUsize) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n.get());
        let mut threads = Vec::with_capacity(n.get());
        for i in 0..n.get() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("gatehouse-session-{i}"))
                    .spawn(move || {
                        runtime.block_on(stop.cancelled());
                        // Dropping the runtime drops the tasks still on it, on this thread.
                        drop(runtime);
                    })?,
            );
        }
        Ok(Self {
            handles,
            threads,
            stop,
            next: AtomicUsize::new(0),
        })
    }

    pub fn spawn<F>(&self, future: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        if let Some(handle) = self.handles.get(i) {
            drop(handle.spawn(future));
        }
    }

    /// Ends every worker runtime (sessions still running are dropped) and waits for the
    /// threads to finish. Blocking: call it from the blocking pool.
    pub fn stop(self) {
        self.stop.cancel();
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("a session worker thread panicked");
            }
        }
    }
}
