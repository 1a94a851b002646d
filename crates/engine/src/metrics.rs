//! The engine's metrics, through `prometheus-client`: counters the pipeline bumps as it works,
//! gauges read from the engine's state at each scrape, and the feature-lookup latency the HTTP
//! layer observes. `GET /metrics` is [`Engine::metrics_text`].

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::Engine;

/// Upper bounds of the lookup-latency buckets, in seconds.
const LOOKUP_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
];

/// Every metric of one engine, registered once in its registry.
pub struct Metrics {
    pub(crate) accepted: Counter,
    pub(crate) duplicates: Counter,
    pub(crate) rejected: Counter,
    /// Events dropped because their user was erased.
    pub(crate) erased_dropped: Counter,
    pub(crate) flushes: Counter,
    /// Compactions of small `events` files.
    pub(crate) compactions: Counter,
    /// Dimension upserts accepted since start (part of the dirty check).
    pub(crate) dim_upserts: Counter,
    pub(crate) online_keys_written: Counter,
    pub(crate) online_copy_errors: Counter,
    /// Rows replayed from the WAL at start.
    pub(crate) replayed: u64,
    feature_lookup: Histogram,
    // Read from the engine at each scrape.
    wal_fsyncs: Counter,
    materializations: Counter,
    materialization_failures: Counter,
    pending_rows: Gauge,
    wal_segment: Gauge,
    events_since_materialization: Gauge,
    dirty_dates: Gauge,
    last_materialization_seconds: Gauge<f64, AtomicU64>,
    last_materialization_dates: Gauge,
    last_materialization_timestamp_seconds: Gauge<f64, AtomicU64>,
    online_videos: Gauge,
    log_position: Gauge,
    log_consumer_lag: Gauge,
    registry: Registry,
}

impl Metrics {
    /// Registers every metric; those of a shared log and of the copy to Redis only where this
    /// process has them.
    pub(crate) fn new(replayed: u64, shared_log: bool, redis_writer: bool) -> Metrics {
        let mut r = Registry::default();
        fn reg<M: prometheus_client::registry::Metric + Clone>(
            r: &mut Registry,
            name: &str,
            help: &str,
            m: M,
        ) -> M {
            r.register(name, help, m.clone());
            m
        }
        let c = Counter::default;
        let g = Gauge::<i64>::default;
        let f = Gauge::<f64, AtomicU64>::default;
        let m = Metrics {
            accepted: reg(
                &mut r,
                "reelhouse_events_accepted",
                "Events accepted (durable in the WAL) since start.",
                c(),
            ),
            duplicates: reg(
                &mut r,
                "reelhouse_events_duplicate",
                "Events dropped as duplicates of an event_id since start.",
                c(),
            ),
            rejected: reg(
                &mut r,
                "reelhouse_events_rejected",
                "Events rejected (quarantined) since start.",
                c(),
            ),
            erased_dropped: reg(
                &mut r,
                "reelhouse_events_erased_dropped",
                "Events of erased users dropped at ingest since start.",
                c(),
            ),
            flushes: reg(
                &mut r,
                "reelhouse_delta_flushes",
                "Delta commits of pending events since start.",
                c(),
            ),
            compactions: reg(
                &mut r,
                "reelhouse_delta_compactions",
                "Compactions of small events files (one Delta commit each) since start.",
                c(),
            ),
            dim_upserts: reg(
                &mut r,
                "reelhouse_dim_upserts",
                "Dimension upserts accepted since start.",
                c(),
            ),
            online_keys_written: Counter::default(),
            online_copy_errors: Counter::default(),
            replayed,
            feature_lookup: reg(
                &mut r,
                "reelhouse_feature_lookup_seconds",
                "Time to answer a feature lookup (single or batch), in the server.",
                Histogram::new(LOOKUP_BUCKETS),
            ),
            wal_fsyncs: reg(
                &mut r,
                "reelhouse_wal_fsyncs",
                "WAL fsyncs (group commits) since start.",
                c(),
            ),
            materializations: reg(
                &mut r,
                "reelhouse_materializations",
                "Warehouse rebuilds completed since start.",
                c(),
            ),
            materialization_failures: reg(
                &mut r,
                "reelhouse_materialization_failures",
                "Warehouse rebuilds that failed since start.",
                c(),
            ),
            pending_rows: reg(
                &mut r,
                "reelhouse_pending_rows",
                "Rows durable in the WAL but not yet committed to Delta (log lag).",
                g(),
            ),
            wal_segment: reg(
                &mut r,
                "reelhouse_wal_segment",
                "Current WAL segment number.",
                g(),
            ),
            events_since_materialization: reg(
                &mut r,
                "reelhouse_events_since_materialization",
                "Events accepted since the last warehouse rebuild started (materialization lag).",
                g(),
            ),
            dirty_dates: reg(
                &mut r,
                "reelhouse_dirty_dates",
                "Event dates waiting for the next rebuild (-1: unknown, the next one is full).",
                g(),
            ),
            last_materialization_seconds: reg(
                &mut r,
                "reelhouse_last_materialization_seconds",
                "Duration of the last warehouse rebuild.",
                f(),
            ),
            last_materialization_dates: reg(
                &mut r,
                "reelhouse_last_materialization_dates",
                "Dates rewritten by the last rebuild (-1: full).",
                g(),
            ),
            last_materialization_timestamp_seconds: reg(
                &mut r,
                "reelhouse_last_materialization_timestamp_seconds",
                "When the last rebuild finished (Unix time; 0: none yet).",
                f(),
            ),
            online_videos: reg(
                &mut r,
                "reelhouse_online_videos",
                "Videos held by the online feature store.",
                g(),
            ),
            log_position: g(),
            log_consumer_lag: g(),
            registry: Registry::default(),
        };
        if shared_log {
            r.register(
                "reelhouse_log_position",
                "Position (stream sequence) of the last shared-log record read.",
                m.log_position.clone(),
            );
            r.register(
                "reelhouse_log_consumer_lag",
                "Records in the shared log after the last one read (checked every second).",
                m.log_consumer_lag.clone(),
            );
        }
        if redis_writer {
            r.register(
                "reelhouse_online_redis_keys_written",
                "Feature records set or deleted in Redis by this writer.",
                m.online_keys_written.clone(),
            );
            r.register(
                "reelhouse_online_redis_copy_errors",
                "Copies to Redis that failed (their keys are retried by the next copy).",
                m.online_copy_errors.clone(),
            );
        }
        Metrics { registry: r, ..m }
    }

    /// Records the time one feature lookup took, in seconds.
    pub fn observe_lookup(&self, seconds: f64) {
        self.feature_lookup.observe(seconds);
    }
}

/// Brings a counter read from elsewhere up to `value` (counters only go up).
fn catch_up(c: &Counter, value: u64) {
    let now = c.get();
    if value > now {
        c.inc_by(value - now);
    }
}

impl Engine {
    /// The engine's metrics (for the HTTP layer's lookup timer).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Every metric in the Prometheus (OpenMetrics) text format, the gauges read now.
    pub fn metrics_text(&self) -> String {
        let m = &self.metrics;
        let st = self.stats();
        let ms = self.materializer_stats();
        catch_up(&m.wal_fsyncs, st.wal_fsyncs);
        catch_up(&m.materializations, ms.runs);
        catch_up(&m.materialization_failures, ms.failures);
        m.pending_rows.set(st.pending_rows as i64);
        m.wal_segment.set(st.wal_segment as i64);
        m.events_since_materialization.set(ms.events_behind as i64);
        m.dirty_dates.set(ms.dirty_dates);
        m.last_materialization_seconds
            .set(ms.last_ms as f64 / 1000.0);
        m.last_materialization_dates.set(ms.last_dates);
        m.last_materialization_timestamp_seconds
            .set(ms.last_at_ms as f64 / 1000.0);
        m.online_videos.set(self.features.stats().videos as i64);
        if let Some((_, position, lag)) = self.log_status() {
            m.log_position.set(position as i64);
            m.log_consumer_lag.set(lag as i64);
        }
        let mut out = String::with_capacity(4096);
        if encode(&mut out, &m.registry).is_err() {
            tracing::error!("could not encode the metrics");
        }
        out
    }
}
