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
use deltalake::logstore::object_store::{ObjectStore, ObjectStoreExt, PutPayload};
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
