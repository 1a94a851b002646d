//! Where the tables live: a local directory (the default) or an S3-compatible object store
//! (`s3://bucket/prefix`, configured by the usual `AWS_*` environment variables).
//!
//! ```text
//!  s3://bucket/prefix ─▶ register(): object_store's S3 client for the s3:// scheme
//!                        + delta-rs's default log store for it
//!  Delta commit N ─▶ PUT _delta_log/N.json with If-None-Match: * ─▶ 412 when another
//!                    writer made version N first ─▶ delta-rs re-reads and retries / fails
//! ```
//!
//! No lock table and no AWS SDK: S3 (since 2024), MinIO, R2 and moto honour conditional
//! puts, which is all the default log store needs for safe concurrent commits. Stores that do
//! not would let two writers both create version N; reelhouse has one writer (the
//! materializer) anyway, and docs/deploy.md says which stores are safe.
//!
//! Small shared state files (`_state/*.json`: privacy requests and tombstones, late-data
//! closures, the log binding) are mirrored next to the tables with [`Location::put_state`], so
//! a materializer started on another machine, and API replicas, read the same state.

use std::sync::{Arc, Once};

use deltalake::logstore::object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use deltalake::logstore::object_store::path::Path as ObjectPath;
use deltalake::logstore::object_store::{
    ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion,
};
use deltalake::logstore::{
    default_logstore, logstore_factories, object_store_factories, LogStore, LogStoreFactory,
    ObjectStoreFactory, ObjectStoreRef, StorageConfig,
};
use deltalake::{DeltaResult, DeltaTableError};
use url::Url;

use crate::{Error, Result};

/// Makes `s3://` (and `s3a://`) table URLs usable by delta-rs. Idempotent.
pub fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for scheme in ["s3", "s3a"] {
            let Ok(url) = Url::parse(&format!("{scheme}://")) else {
                continue;
            };
            object_store_factories().insert(url.clone(), Arc::new(S3Factory));
            logstore_factories().insert(url, Arc::new(DefaultLogStores));
        }
    });
}

struct S3Factory;

impl ObjectStoreFactory for S3Factory {
    fn parse_url_opts(
        &self,
        url: &Url,
        config: &StorageConfig,
    ) -> DeltaResult<(ObjectStoreRef, ObjectPath)> {
        let store = s3_store(url, config.raw.iter())
            .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
        let path = ObjectPath::from_url_path(url.path())
            .map_err(|e| DeltaTableError::Generic(e.to_string()))?;
        Ok((store, path))
    }
}

/// An S3 client for the bucket of `url`: `AWS_*` environment variables, then `options`.
fn s3_store<'a>(
    url: &Url,
    options: impl Iterator<Item = (&'a String, &'a String)>,
) -> Result<ObjectStoreRef> {
    let mut b = AmazonS3Builder::from_env().with_url(url.as_str());
    for (k, v) in options {
        if let Ok(key) = k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
            b = b.with_config(key, v);
        }
    }
    let store = b
        .build()
        .map_err(|e| Error::Path(format!("object store {url}: {e}")))?;
    Ok(Arc::new(store))
}

struct DefaultLogStores;

impl LogStoreFactory for DefaultLogStores {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

/// The root the tables live under.
#[derive(Clone)]
pub struct Location {
    /// Ends with `/`; a table is `url.join("<name>/")`.
    url: Url,
    /// For state objects (`None`: a local directory, where state files are local anyway).
    remote: Option<(ObjectStoreRef, ObjectPath)>,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.url.as_str())
    }
}

impl Location {
    /// A local directory (which must exist).
    pub fn local(dir: &std::path::Path) -> Result<Location> {
        let url =
            Url::from_directory_path(dir).map_err(|_| Error::Path(dir.display().to_string()))?;
        Ok(Location { url, remote: None })
    }

    /// `s3://bucket/prefix` (or `s3a://`).
    pub fn remote(raw: &str) -> Result<Location> {
        let mut url = Url::parse(raw).map_err(|_| {
            Error::Path(format!("{raw} is not a URL (expected s3://bucket/prefix)"))
        })?;
        if !matches!(url.scheme(), "s3" | "s3a") || url.host_str().is_none() {
            return Err(Error::Path(format!(
                "{raw}: tables can live in a local directory or at s3://bucket/prefix"
            )));
        }
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        register();
        let store = s3_store(&url, std::iter::empty())?;
        let prefix = ObjectPath::from_url_path(url.path())
            .map_err(|e| Error::Path(format!("{raw}: {e}")))?;
        Ok(Location {
            url,
            remote: Some((store, prefix)),
        })
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// The URL of the table `name`.
    pub fn table(&self, name: &str) -> Result<Url> {
        self.url
            .join(&format!("{name}/"))
            .map_err(|_| Error::Path(format!("bad table name {name}")))
    }

    fn state_path(prefix: &ObjectPath, rel: &str) -> ObjectPath {
        let mut p = prefix.clone();
        for part in ["_state"].into_iter().chain(rel.split('/')) {
            p = p.join(part);
        }
        p
    }

    /// Stores a state file `_state/<rel>` next to the tables (no-op for a local directory).
    pub async fn put_state(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        if let Some((store, prefix)) = &self.remote {
            store
                .put(&Self::state_path(prefix, rel), PutPayload::from(bytes))
                .await
                .map_err(|e| Error::Path(format!("writing _state/{rel}: {e}")))?;
        }
        Ok(())
    }

    /// The state file `_state/<rel>` stored next to the tables (`None`: missing, or a local
    /// directory).
    pub async fn get_state(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let Some((store, prefix)) = &self.remote else {
            return Ok(None);
        };
        match store.get(&Self::state_path(prefix, rel)).await {
            Ok(r) => Ok(Some(
                r.bytes()
                    .await
                    .map_err(|e| Error::Path(format!("reading _state/{rel}: {e}")))?
                    .to_vec(),
            )),
            Err(deltalake::logstore::object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::Path(format!("reading _state/{rel}: {e}"))),
        }
    }

    /// Whether any Delta table exists at `url` (a `_delta_log` entry).
    pub(crate) async fn has_table(&self, url: &Url) -> Result<bool> {
        match &self.remote {
            None => Ok(url
                .to_file_path()
                .is_ok_and(|p| p.join("_delta_log").exists())),
            Some((store, _)) => {
                let p = ObjectPath::from_url_path(url.path())
                    .map_err(|e| Error::Path(e.to_string()))?
                    .join("_delta_log");
                use futures::StreamExt;
                let first = store.list(Some(&p)).next().await;
                match first {
                    None => Ok(false),
                    Some(Ok(_)) => Ok(true),
                    Some(Err(e)) => Err(Error::Path(format!("listing {url}: {e}"))),
                }
            }
        }
    }
}

/// The object holding the writer lease, relative to `_state/`.
const LEASE_FILE: &str = "writer.json";

/// The claim of one process on writing the tables at an object-store location: the local
/// data-directory lock does not reach other machines, so the one writer (a single node or the
/// materializer) holds `_state/writer.json` there, renewed by conditional puts.
#[derive(Debug, Clone)]
pub struct WriterLease {
    holder: String,
    e_tag: Option<String>,
    /// Whoever held it before this acquisition (`None`: nobody, or a local directory).
    pub previous: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseBody {
    holder: String,
    renewed_at_ms: i64,
}

impl Location {
    /// Takes the writer lease for `holder` when it is free, already `holder`'s (a restart on
    /// the same state directory), or not renewed for `ttl_ms` (its holder is gone). A no-op
    /// lease for a local directory (its lock file does the job).
    pub async fn acquire_writer(
        &self,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<WriterLease> {
        let Some((store, prefix)) = &self.remote else {
            return Ok(WriterLease {
                holder: holder.into(),
                e_tag: None,
                previous: None,
            });
        };
        let path = Self::state_path(prefix, LEASE_FILE);
        let body = || {
            let b = LeaseBody {
                holder: holder.into(),
                renewed_at_ms: now_ms,
            };
            PutPayload::from(serde_json::to_vec(&b).unwrap_or_default())
        };
        let lease_err = |e: deltalake::logstore::object_store::Error| {
            Error::WriterLease(format!("the writer lease at {}: {e}", self.url))
        };
        // A race with another starting writer is lost or won by the conditional put; a
        // second look settles who has it.
        for _ in 0..3 {
            let mut previous = None;
            let mode = match store.get(&path).await {
                Err(deltalake::logstore::object_store::Error::NotFound { .. }) => PutMode::Create,
                Err(e) => return Err(lease_err(e)),
                Ok(r) => {
                    let version = UpdateVersion {
                        e_tag: r.meta.e_tag.clone(),
                        version: r.meta.version.clone(),
                    };
                    let bytes = r.bytes().await.map_err(lease_err)?;
                    let cur: Option<LeaseBody> = serde_json::from_slice(&bytes).ok();
                    previous = cur.as_ref().map(|c| c.holder.clone());
                    if let Some(cur) = cur.filter(|c| c.holder != holder) {
                        let age_ms = now_ms - cur.renewed_at_ms;
                        if age_ms <= ttl_ms {
                            return Err(Error::WriterLease(format!(
                                "the tables at {} are written by another process (its lease \
                                 was renewed {} s ago); stop it, or start this one {} s after \
                                 it stopped",
                                self.url,
                                age_ms.max(0) / 1000,
                                ttl_ms / 1000
                            )));
                        }
                    }
                    PutMode::Update(version)
                }
            };
            match store.put_opts(&path, body(), PutOptions::from(mode)).await {
                Ok(r) => {
                    return Ok(WriterLease {
                        holder: holder.into(),
                        e_tag: r.e_tag,
                        previous,
                    })
                }
                Err(
                    deltalake::logstore::object_store::Error::AlreadyExists { .. }
                    | deltalake::logstore::object_store::Error::Precondition { .. },
                ) => continue,
                Err(e) => return Err(lease_err(e)),
            }
        }
        Err(Error::WriterLease(format!(
            "the writer lease at {} keeps changing hands; is another writer starting?",
            self.url
        )))
    }

    /// Gives the lease up (marks it expired, if it is still this one's), so the next writer
    /// need not wait for it to expire.
    pub async fn release_writer(&self, lease: &WriterLease) -> Result<()> {
        self.renew_writer(lease, i64::MIN / 2).await.map(|_| ())
    }

    /// Renews a lease taken by [`Location::acquire_writer`]; fails when another process has
    /// taken it over (this one must stop writing).
    pub async fn renew_writer(&self, lease: &WriterLease, now_ms: i64) -> Result<WriterLease> {
        let Some((store, prefix)) = &self.remote else {
            return Ok(lease.clone());
        };
        let body = LeaseBody {
            holder: lease.holder.clone(),
            renewed_at_ms: now_ms,
        };
        let mode = PutMode::Update(UpdateVersion {
            e_tag: lease.e_tag.clone(),
            version: None,
        });
        match store
            .put_opts(
                &Self::state_path(prefix, LEASE_FILE),
                PutPayload::from(serde_json::to_vec(&body).unwrap_or_default()),
                PutOptions::from(mode),
            )
            .await
        {
            Ok(r) => Ok(WriterLease {
                holder: lease.holder.clone(),
                e_tag: r.e_tag,
                previous: lease.previous.clone(),
            }),
            Err(deltalake::logstore::object_store::Error::Precondition { .. }) => {
                Err(Error::LeaseLost(format!(
                    "another process took over the writer lease at {}; this one stops writing",
                    self.url
                )))
            }
            Err(e) => Err(Error::WriterLease(format!(
                "renewing the writer lease at {}: {e}",
                self.url
            ))),
        }
    }
}

/// An S3 server for tests: moto's (`python3 -m moto.server`, PyPI `moto[server]`, which
/// `scripts/test.sh` installs), on a free loopback port with one bucket; killed on drop.
pub mod testing {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub struct Moto {
        child: Child,
        pub endpoint: String,
    }

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// moto's server answering one request at a time (`python3 -m moto.server` serves each
    /// on its own thread).
    const SERIAL: &str = "import sys
from werkzeug.serving import run_simple
from moto.server import DomainDispatcherApplication, create_backend_app
run_simple(sys.argv[1], int(sys.argv[2]), DomainDispatcherApplication(create_backend_app),
           threaded=False, use_reloader=False)";

    impl Moto {
        /// Starts the server and creates `bucket` (panics when it cannot: a test helper).
        pub fn start(bucket: &str) -> Moto {
            Self::start_with(bucket, &["-m", "moto.server", "-H", "127.0.0.1", "-p"])
        }

        /// Like [`Moto::start`], with requests answered one at a time. moto 5.2 checks a
        /// conditional put (`If-None-Match: *`) and then writes, without a lock, so on its
        /// threaded server two racing puts of one key can both succeed, which S3 never lets
        /// happen: a test of racing commits needs this one.
        pub fn start_serial(bucket: &str) -> Moto {
            Self::start_with(bucket, &["-c", SERIAL, "127.0.0.1"])
        }

        /// Runs `python3 ARGS PORT` on a free loopback port.
        fn start_with(bucket: &str, args: &[&str]) -> Moto {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free loopback port");
            let child = Command::new("python3")
                .args(args)
                .arg(port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("python3 is missing");
            let endpoint = format!("http://127.0.0.1:{port}");
            // Creating the bucket is also the readiness probe (moto takes any credentials).
            let deadline = Instant::now() + Duration::from_secs(30);
            while !Command::new("curl")
                .args(["-sf", "-X", "PUT", &format!("{endpoint}/{bucket}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                assert!(
                    Instant::now() < deadline,
                    "moto's S3 server did not start (scripts/test.sh installs moto[server])"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            Moto { child, endpoint }
        }

        /// The `AWS_*` settings that point a client at this server, as (variable, value).
        pub fn env(&self) -> Vec<(&'static str, String)> {
            vec![
                ("AWS_ACCESS_KEY_ID", "test".into()),
                ("AWS_SECRET_ACCESS_KEY", "test".into()),
                ("AWS_REGION", "us-east-1".into()),
                ("AWS_ENDPOINT_URL", self.endpoint.clone()),
                ("AWS_ALLOW_HTTP", "true".into()),
            ]
        }

        /// The same settings as object-store options (lower case keys).
        pub fn options(&self) -> Vec<(String, String)> {
            self.env()
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect()
        }
    }
}

/// Writes a small local state file atomically: temp file, fsync, rename, fsync the directory.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = dir.join(name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use deltalake::arrow::array::{Int64Array, RecordBatch};
    use deltalake::arrow::datatypes::{DataType, Field, Schema};
    use deltalake::protocol::SaveMode;
    use deltalake::{DeltaTable, DeltaTableBuilder};

    use super::testing::Moto;
    use super::*;

    fn options(s3: &Moto) -> HashMap<String, String> {
        s3.options().into_iter().collect()
    }

    fn batch(from: i64, n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from_iter_values(from..from + n))],
        )
        .unwrap()
    }

    async fn handle(url: &Url, opts: &HashMap<String, String>) -> DeltaTable {
        let mut t = DeltaTableBuilder::from_url(url.clone())
            .unwrap()
            .with_storage_options(opts.clone())
            .build()
            .unwrap();
        t.load().await.unwrap();
        t
    }

    /// Two writers appending to one table on S3 at the same time: every commit lands as its
    /// own version (the loser of a race for version N gets 412 from the conditional put and
    /// retries at N+1), and the store refuses to overwrite a commit file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_on_s3_never_overwrite_each_other() {
        let s3 = Moto::start_serial("rh-lake-test");
        register();
        let opts = options(&s3);
        let url = Url::parse("s3://rh-lake-test/t/").unwrap();
        let first = DeltaTableBuilder::from_url(url.clone())
            .unwrap()
            .with_storage_options(opts.clone())
            .build()
            .unwrap();
        first.write(vec![batch(0, 1)]).await.unwrap();
        let writer = |w: i64| {
            let (url, opts) = (url.clone(), opts.clone());
            async move {
                let mut t = handle(&url, &opts).await;
                for i in 0..5 {
                    t = t
                        .write(vec![batch(1_000 * w + 10 * i, 10)])
                        .with_save_mode(SaveMode::Append)
                        .await
                        .unwrap();
                }
            }
        };
        tokio::join!(writer(1), writer(2));
        let t = handle(&url, &opts).await;
        assert_eq!(
            t.version(),
            Some(10),
            "1 create + 2 × 5 appends, each its own version"
        );
        let rows: i64 = t
            .snapshot()
            .unwrap()
            .log_data()
            .into_iter()
            .map(|f| f.num_records().unwrap_or(0) as i64)
            .sum();
        assert_eq!(rows, 1 + 2 * 5 * 10, "no commit lost");
        // The guarantee it rests on: a commit file that exists is never replaced.
        let store = s3_store(&url, opts.iter()).unwrap();
        let commit = ObjectPath::from("t/_delta_log/00000000000000000001.json");
        let again = store
            .put_opts(
                &commit,
                PutPayload::from_static(b"{}"),
                PutOptions::from(PutMode::Create),
            )
            .await;
        assert!(
            matches!(
                again,
                Err(deltalake::logstore::object_store::Error::AlreadyExists { .. })
            ),
            "{again:?}"
        );
    }

    /// The lease keeps a second writer out while the first renews it, lets the same state
    /// directory back in at once, passes to another writer once expired or released, and
    /// tells a writer that lost it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_writer_lease_per_location() {
        let s3 = Moto::start("rh-lake-test");
        register();
        let opts = options(&s3);
        let url = Url::parse("s3://rh-lake-test/leased/").unwrap();
        let loc = Location {
            remote: Some((
                s3_store(&url, opts.iter()).unwrap(),
                ObjectPath::from_url_path(url.path()).unwrap(),
            )),
            url,
        };
        let ttl = 30_000;
        let a = loc.acquire_writer("a", 1_000, ttl).await.unwrap();
        assert_eq!(a.previous, None);
        let refused = loc.acquire_writer("b", 2_000, ttl).await.unwrap_err();
        assert!(matches!(refused, Error::WriterLease(_)), "{refused}");
        assert!(refused.to_string().contains("written by another process"));
        // The same holder (a restart on the same state directory) gets it back at once.
        let a = loc.acquire_writer("a", 3_000, ttl).await.unwrap();
        let a = loc.renew_writer(&a, 10_000).await.unwrap();
        assert!(loc.acquire_writer("b", 10_000 + ttl, ttl).await.is_err());
        // Not renewed for longer than the ttl: another writer takes over, and the old one
        // learns it at its next renewal.
        let b = loc.acquire_writer("b", 10_001 + ttl, ttl).await.unwrap();
        assert_eq!(b.previous.as_deref(), Some("a"));
        let lost = loc.renew_writer(&a, 10_002 + ttl).await.unwrap_err();
        assert!(matches!(lost, Error::LeaseLost(_)), "{lost}");
        // Released: the next writer need not wait.
        loc.release_writer(&b).await.unwrap();
        loc.acquire_writer("c", 10_003 + ttl, ttl).await.unwrap();
    }
}
