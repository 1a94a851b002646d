//! The rebuild's concurrency: models computed ahead as tasks, Delta writes running beside
//! the next model, cascades computed off the SQL path; each task timed for the report.

use super::*;

/// A task's result with the time it ran.
pub(crate) type Timed<T> = tokio::task::JoinHandle<(T, std::time::Duration)>;

/// A task computing a model outside SQL.
pub(crate) type Computed<T> = Timed<std::result::Result<T, DataFusionError>>;

/// Delta writes running as tasks, each with its report entry (to complete when it ends).
#[derive(Default)]
pub(crate) struct Writes {
    /// Each write's entry in `Report::tables` (which keeps the models' order) and task.
    pub(crate) pending: Vec<(usize, Timed<reelhouse_lake::Result<DeltaTable>>)>,
}

/// A rebuild that fails leaves no write running behind it: each is cancelled at its next
/// step, so its table stays at the version before or (if its commit was already made) after.
impl Drop for Writes {
    fn drop(&mut self) {
        for (_, task) in &self.pending {
            task.abort();
        }
    }
}

impl Writes {
    pub(crate) fn spawn(
        &mut self,
        report: &mut Report,
        entry: TableReport,
        write: impl std::future::Future<Output = reelhouse_lake::Result<DeltaTable>> + Send + 'static,
    ) {
        let task = spawn_timed(write);
        report.tables.push(entry);
        self.pending.push((report.tables.len() - 1, task));
    }

    /// Waits for every write, in the order they started; completes their report entries and
    /// adds the new handles. The first failure is returned (after all have ended).
    pub(crate) async fn finish(
        &mut self,
        report: &mut Report,
        handles: &mut Vec<(String, DeltaTable)>,
    ) -> Result<()> {
        let mut first_error = None;
        for (at, task) in std::mem::take(&mut self.pending) {
            match task.await {
                Ok((Ok(table), took)) => {
                    let entry = &mut report.tables[at];
                    entry.version = table.version();
                    entry.write_ms = took.as_millis() as u64;
                    entry.elapsed_ms += entry.write_ms;
                    handles.push((entry.table.clone(), table));
                }
                Ok((Err(e), _)) => {
                    first_error.get_or_insert(Error::from(e));
                }
                Err(join) => {
                    first_error.get_or_insert(Error::Model {
                        model: "write",
                        source: DataFusionError::External(Box::new(join)),
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Rust models of a full rebuild started as tasks before their turn, by name: each as soon
/// as the models it reads are computed, so that independent models (the transitions and
/// the event filters beside `fact_video_view`; `agg_creator_daily`, `agg_video_hourly` and
/// the retention curves beside each other) run on all cores instead of one after another.
/// Results are still taken, registered and written in the models' order.
#[derive(Default)]
pub(crate) struct Ahead(pub(crate) HashMap<&'static str, Computed<RecordBatch>>);

/// A rebuild that fails starts no more models: those waiting for a thread are cancelled (one
/// already computing runs to its end, a model has no await point, and its result is dropped).
impl Drop for Ahead {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}

impl Ahead {
    /// Starts each Rust model of `models` not started or computed yet whose inputs are all
    /// in `prior`.
    pub(crate) fn start_ready(
        &mut self,
        models: impl IntoIterator<Item = &'static Model>,
        prior: &Prior,
        inputs: &Inputs,
    ) {
        for m in models {
            let Compute::Rust(f, reads) = m.compute else {
                continue;
            };
            if self.0.contains_key(m.name)
                || prior.0.contains_key(m.name)
                || !reads.iter().all(|r| prior.0.contains_key(r))
            {
                continue;
            }
            let inputs_of = Prior(
                reads
                    .iter()
                    .filter_map(|r| prior.0.get_key_value(r))
                    .map(|(k, v)| (*k, v.clone()))
                    .collect(),
            );
            let inputs = inputs.clone();
            let task =
                spawn_timed(async move { f(&inputs_of, &inputs).map_err(DataFusionError::from) });
            self.0.insert(m.name, task);
        }
    }
}

/// Runs `work` as a task, timing it.
pub(crate) fn spawn_timed<F>(work: F) -> Timed<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(async move {
        let start = Instant::now();
        (work.await, start.elapsed())
    })
}

pub(crate) type CascadeBatches = (RecordBatch, RecordBatch, usize);

/// [`cascade::batches`] as a task, over the `ev` batches computed so far and
/// `fact_video_view` as registered now.
pub(crate) fn spawn_cascades(ctx: &SessionContext, prior: &Prior) -> Computed<CascadeBatches> {
    let ctx = ctx.clone();
    let ev = prior.get("ev").map(<[RecordBatch]>::to_vec);
    spawn_timed(async move { cascade::batches(&ctx, &ev?).await })
}

/// The result of a task from [`spawn_timed`], as the error of `model` when it failed.
pub(crate) async fn joined<T>(
    task: Computed<T>,
    model: &'static str,
) -> Result<(T, std::time::Duration)> {
    let (result, took) = task.await.map_err(|join| Error::Model {
        model,
        source: DataFusionError::External(Box::new(join)),
    })?;
    Ok((
        result.map_err(|source| Error::Model { model, source })?,
        took,
    ))
}
