//! Background work of the engine: every loop (flusher, materializer, retention, replication,
//! shared-log reader) and every privacy request runs as a task registered in one
//! [`TaskTracker`] and stops on one [`CancellationToken`], so shutdown can wait for each to
//! finish instead of dropping it (as InfluxDB 3 does).
//!
//! ```text
//!  Engine::start_background ─▶ flusher thread, materializer thread (own one-thread runtimes)
//!                           ─▶ retention, state mirror, lease renewal, Redis copier,
//!                              shared-log reader, replica refresher (tokio tasks)
//!  Engine::shutdown         ─▶ cancel ─▶ wait for every task ─▶ final flush ─▶ close
//! ```

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Engine, Error};

/// Waits `wait`, or less when `stop` is cancelled first: then true (time to stop). The pause
/// of every background loop.
pub(crate) async fn stop_within(wait: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = stop.cancelled() => true,
    }
}

/// The engine's registry of background work.
#[derive(Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
    /// Loops on threads of their own (Delta writes are seconds of CPU inside async code).
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Tasks {
    /// Runs `work` as a tracked tokio task.
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(work);
    }

    /// The token every loop stops on.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs `work` on a thread of its own with a one-thread runtime. Delta writes (flushes of
    /// up to a million rows, warehouse rebuilds) are seconds of CPU inside async code; on the
    /// request runtime they would hold its workers and stall what must stay quick: HTTP
    /// answers, reading the shared log, copying features to Redis (a flush there delayed
    /// freshness through Redis by up to 2.3 s in `bench scaleout`).
    pub fn spawn_thread(
        &self,
        name: &str,
        work: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || rt.block_on(work))?;
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
        Ok(())
    }

    /// Cancels every loop and waits for every task and thread to end (again: returns at
    /// once).
    pub async fn stop_and_wait(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Which background loops a process runs (see [`Engine::start_background`]).
#[derive(Clone, Default)]
pub struct Background {
    /// Rebuild the warehouse this often while new events arrive (`None`: only on request).
    pub materialize_interval: Option<Duration>,
    /// An API replica of a deployment with a shared log: how often it loads the table
    /// versions the materializer committed.
    pub refresh_interval: Option<Duration>,
}

impl Engine {
    /// Starts the background loops this process needs: on a writer the flusher, daily
    /// retention, the periodic materializer and, for tables on an object store or with Redis,
    /// replication; with a shared log its reader; on a replica the refresher.
    pub fn start_background(self: &Arc<Self>, b: &Background) -> Result<(), Error> {
        let t = &self.tasks;
        let writer = self.is_writer();
        if writer {
            t.spawn_thread(
                "reelhouse-flush",
                Arc::clone(self).run_flusher(t.stop_token()),
            )?;
            t.spawn(Arc::clone(self).run_retention(t.stop_token()));
        }
        if writer && self.config.tables.is_some() {
            t.spawn(Arc::clone(self).run_state_mirror(Duration::from_secs(1), t.stop_token()));
            t.spawn(Arc::clone(self).run_lease_renewal(t.stop_token()));
        }
        if writer && self.config.online.is_some() {
            t.spawn(Arc::clone(self).run_online_copier(t.stop_token()));
        }
        if self.log_status().is_some() {
            t.spawn(Arc::clone(self).follow(t.stop_token()));
        }
        if let Some(i) = b.refresh_interval.filter(|_| !writer) {
            t.spawn(Arc::clone(self).run_refresher(i, t.stop_token()));
        }
        if let Some(i) = b.materialize_interval.filter(|_| writer) {
            t.spawn_thread(
                "reelhouse-materialize",
                Arc::clone(self).run_materializer(i, t.stop_token()),
            )?;
        }
        Ok(())
    }

    /// Starts the flusher alone (a one-shot bulk load), as a tracked task of this runtime.
    pub fn start_flusher(self: &Arc<Self>) -> Result<(), Error> {
        self.require_writer()?;
        let t = &self.tasks;
        t.spawn(Arc::clone(self).run_flusher(t.stop_token()));
        Ok(())
    }

    /// Stops every background loop and waits for it (and for running privacy requests),
    /// then commits everything acknowledged to Delta and closes (releases the writer lease).
    /// Returns the rows the final flush committed.
    pub async fn shutdown(&self) -> Result<usize, Error> {
        self.tasks.stop_and_wait().await;
        let flushed = self.flush().await;
        self.close().await;
        flushed
    }
}
