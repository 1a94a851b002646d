//! Redis as the online store of a deployment with several processes (`--online redis://…`).
//!
//! ```text
//!  materializer: FeatureStore (computes every feature, exactly as one node does)
//!      └─ every 5 ms: take_changes ─▶ one pipeline of SET {prefix}:v|u|c:{id} <record>
//!                                      and DEL {prefix}:u:{id} for erased users ─▶ Redis
//!  API replicas: GET (one id) / MGET (a batch, one round trip) ─▶ record.features(now)
//! ```
//!
//! Redis holds serving *records* ([`VideoRecord`], [`UserRecord`], [`CreatorRecord`]), not
//! finished features: a record carries the minute buckets of its last 24 h, so windows slide
//! with the reader's clock and a video nobody watches never needs rewriting. The records are
//! MessagePack; the features a replica computes from them are the ones the in-process store
//! answers, because the in-process store answers through the same types.
//!
//! The client is a small RESP2 implementation over tokio (GET, MGET, SET, DEL, PING, AUTH,
//! SELECT are all it needs): a pool of connections, each used by one request at a time,
//! reconnected on error. Every command it sends is idempotent, so a request that failed on a
//! broken connection is retried once on a new one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::{
    CreatorFeatures, CreatorRecord, Error, Key, Result, UserFeatures, UserRecord, VideoFeatures,
    VideoRecord,
};

/// Connections kept per process.
const POOL: usize = 8;
/// Commands per pipelined write.
const WRITE_CHUNK: usize = 512;
/// Longest wait for connecting or for one pipeline's replies.
const TIMEOUT: Duration = Duration::from_secs(5);

/// What one write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriteReport {
    pub keys_set: usize,
    pub keys_deleted: usize,
}

/// A Redis server used as the online store.
pub struct RedisStore {
    addr: String,
    user: Option<String>,
    password: Option<String>,
    db: u32,
    prefix: String,
    pool: Vec<tokio::sync::Mutex<Option<Conn>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl RedisStore {
    /// Parses `redis://[[user]:password@]host[:port][/db][?prefix=rh]` and checks that the
    /// server answers.
    pub async fn connect(url: &str) -> Result<RedisStore> {
        let bad = |why: &str| Error::Redis(format!("{why} (expected redis://HOST:PORT[/DB])"));
        let u = url::Url::parse(url).map_err(|_| bad("not a URL"))?;
        if u.scheme() != "redis" {
            return Err(bad("only redis:// is supported"));
        }
        let host = u.host_str().ok_or_else(|| bad("no host"))?;
        let addr = format!("{host}:{}", u.port().unwrap_or(6379));
        let db = match u.path().trim_start_matches('/') {
            "" => 0,
            d => d
                .parse()
                .map_err(|_| bad("the path must be a database number"))?,
        };
        let prefix = u
            .query_pairs()
            .find(|(k, _)| k == "prefix")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_else(|| "rh".into());
        let store = RedisStore {
            addr,
            user: Some(u.username().to_string()).filter(|s| !s.is_empty()),
            password: u.password().map(String::from),
            db,
            prefix,
            pool: (0..POOL).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        };
        store.run(&[vec![b"PING".to_vec()]]).await?;
        Ok(store)
    }

    /// Where the store is, without credentials.
    pub fn describe(&self) -> String {
        format!("redis://{}/{}", self.addr, self.db)
    }

    fn key(&self, k: Key) -> Vec<u8> {
        let (kind, id) = match k {
            Key::Video(id) => ('v', id),
            Key::User(id) => ('u', id),
            Key::Creator(id) => ('c', id),
        };
        format!("{}:{kind}:{id}", self.prefix).into_bytes()
    }

    /// Writes records (`None`: delete the key) in pipelines of [`WRITE_CHUNK`] commands.
    pub async fn write(&self, records: &[(Key, Option<Vec<u8>>)]) -> Result<WriteReport> {
        let mut report = WriteReport::default();
        for chunk in records.chunks(WRITE_CHUNK) {
            let cmds: Vec<Vec<Vec<u8>>> = chunk
                .iter()
                .map(|(k, rec)| match rec {
                    Some(bytes) => vec![b"SET".to_vec(), self.key(*k), bytes.clone()],
                    None => vec![b"DEL".to_vec(), self.key(*k)],
                })
                .collect();
            for (reply, (_, rec)) in self.run(&cmds).await?.into_iter().zip(chunk) {
                match (reply, rec) {
                    (Reply::Error(e), _) => return Err(Error::Redis(e)),
                    (Reply::Int(n), None) => report.keys_deleted += n.max(0) as usize,
                    (_, Some(_)) => report.keys_set += 1,
                    (_, None) => {}
                }
            }
        }
        Ok(report)
    }

    /// The stored record of one key.
    pub async fn get(&self, k: Key) -> Result<Option<Vec<u8>>> {
        let reply = self.run(&[vec![b"GET".to_vec(), self.key(k)]]).await?;
        match reply.into_iter().next() {
            Some(Reply::Bulk(b)) => Ok(b),
            Some(Reply::Error(e)) => Err(Error::Redis(e)),
            _ => Err(Error::Redis("unexpected reply to GET".into())),
        }
    }

    /// The stored records of many keys, in order, in one round trip.
    pub async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = Vec::with_capacity(keys.len() + 1);
        cmd.push(b"MGET".to_vec());
        cmd.extend(keys.iter().map(|k| self.key(*k)));
        match self.run(&[cmd]).await?.into_iter().next() {
            Some(Reply::Array(items)) if items.len() == keys.len() => Ok(items),
            Some(Reply::Error(e)) => Err(Error::Redis(e)),
            _ => Err(Error::Redis("unexpected reply to MGET".into())),
        }
    }

    /// A video's features at `now_ms` (zeros when unknown).
    pub async fn video(&self, id: u64, now_ms: i64) -> Result<VideoFeatures> {
        Ok(self.videos(&[id], now_ms).await?.pop().unwrap_or_default())
    }

    /// Many videos' features at `now_ms`, in the order asked.
    pub async fn videos(&self, ids: &[u64], now_ms: i64) -> Result<Vec<VideoFeatures>> {
        let keys: Vec<Key> = ids.iter().map(|id| Key::Video(*id)).collect();
        let recs = if keys.len() == 1 {
            vec![self.get(keys[0]).await?]
        } else {
            self.get_many(&keys).await?
        };
        ids.iter()
            .zip(recs)
            .map(|(id, rec)| match rec {
                Some(b) => Ok(VideoRecord::decode(&b)?.features(*id, now_ms)),
                None => Ok(VideoFeatures {
                    video_id: *id,
                    ..VideoFeatures::default()
                }),
            })
            .collect()
    }

    /// A user's features at `now_ms` (empty when unknown or erased).
    pub async fn user(&self, id: u64, now_ms: i64) -> Result<UserFeatures> {
        Ok(match self.get(Key::User(id)).await? {
            Some(b) => UserRecord::decode(&b)?.features(id, now_ms),
            None => UserFeatures {
                user_id: id,
                ..UserFeatures::default()
            },
        })
    }

    /// A creator's features at `now_ms` (zeros when unknown).
    pub async fn creator(&self, id: u64, now_ms: i64) -> Result<CreatorFeatures> {
        Ok(match self.get(Key::Creator(id)).await? {
            Some(b) => CreatorRecord::decode(&b)?.features(id, now_ms),
            None => CreatorFeatures {
                creator_id: id,
                ..CreatorFeatures::default()
            },
        })
    }

    /// Runs commands as one pipeline on a pooled connection; once more on a new connection
    /// when the first attempt fails (every command used here is idempotent).
    async fn run(&self, cmds: &[Vec<Vec<u8>>]) -> Result<Vec<Reply>> {
        let slot = &self.pool[self.next.fetch_add(1, Ordering::Relaxed) % POOL];
        let mut conn = slot.lock().await;
        let mut last = None;
        for _ in 0..2 {
            if conn.is_none() {
                match self.open().await {
                    Ok(c) => *conn = Some(c),
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            match tokio::time::timeout(TIMEOUT, c.pipeline(cmds)).await {
                Ok(Ok(replies)) => return Ok(replies),
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(Error::Redis("no reply within 5 s".into())),
            }
            *conn = None;
        }
        Err(last.unwrap_or_else(|| Error::Redis("unreachable".into())))
    }

    async fn open(&self) -> Result<Conn> {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| Error::Redis(format!("connecting to {} timed out", self.addr)))?
            .map_err(|e| Error::Redis(format!("cannot connect to {}: {e}", self.addr)))?;
        stream.set_nodelay(true).map_err(io)?;
        let (r, w) = stream.into_split();
        let mut c = Conn {
            r: BufReader::new(r),
            w,
        };
        let mut setup = Vec::new();
        if let Some(p) = &self.password {
            let mut auth = vec![b"AUTH".to_vec()];
            auth.extend(self.user.iter().map(|u| u.as_bytes().to_vec()));
            auth.push(p.as_bytes().to_vec());
            setup.push(auth);
        }
        if self.db != 0 {
            setup.push(vec![b"SELECT".to_vec(), self.db.to_string().into_bytes()]);
        }
        if !setup.is_empty() {
            for reply in c.pipeline(&setup).await? {
                if let Reply::Error(e) = reply {
                    // AUTH errors name no secret; SELECT errors name the number only.
                    return Err(Error::Redis(e));
                }
            }
        }
        Ok(c)
    }
}

fn io(e: std::io::Error) -> Error {
    Error::Redis(e.to_string())
}

/// One RESP2 reply. Arrays hold bulk strings only (all that GET/MGET/SET/DEL answer).
#[derive(Debug)]
enum Reply {
    Simple,
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Option<Vec<u8>>>),
}

struct Conn {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Conn {
    /// Sends every command in one write, then reads one reply per command.
    async fn pipeline(&mut self, cmds: &[Vec<Vec<u8>>]) -> Result<Vec<Reply>> {
        let mut out = Vec::new();
        for args in cmds {
            out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for a in args {
                out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                out.extend_from_slice(a);
                out.extend_from_slice(b"\r\n");
            }
        }
        self.w.write_all(&out).await.map_err(io)?;
        let mut replies = Vec::with_capacity(cmds.len());
        for _ in cmds {
            replies.push(self.reply().await?);
        }
        Ok(replies)
    }

    async fn line(&mut self) -> Result<(u8, String)> {
        let mut line = Vec::new();
        self.r.read_until(b'\n', &mut line).await.map_err(io)?;
        if line.len() < 3 || !line.ends_with(b"\r\n") {
            return Err(Error::Redis("the server closed the connection".into()));
        }
        let body = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
        Ok((line[0], body))
    }

    async fn bulk(&mut self, len: &str) -> Result<Option<Vec<u8>>> {
        let n: i64 = len
            .parse()
            .map_err(|_| Error::Redis("malformed bulk length".into()))?;
        if n < 0 {
            return Ok(None);
        }
        let mut buf = vec![0; n as usize + 2];
        self.r.read_exact(&mut buf).await.map_err(io)?;
        buf.truncate(n as usize);
        Ok(Some(buf))
    }

    async fn reply(&mut self) -> Result<Reply> {
        let (kind, body) = self.line().await?;
        Ok(match kind {
            b'+' => Reply::Simple,
            b'-' => Reply::Error(body),
            b':' => Reply::Int(
                body.parse()
                    .map_err(|_| Error::Redis("malformed integer reply".into()))?,
            ),
            b'$' => Reply::Bulk(self.bulk(&body).await?),
            b'*' => {
                let n: i64 = body
                    .parse()
                    .map_err(|_| Error::Redis("malformed array length".into()))?;
                let mut items = Vec::with_capacity(n.max(0) as usize);
                for _ in 0..n.max(0) {
                    match self.line().await? {
                        (b'$', len) => items.push(self.bulk(&len).await?),
                        _ => return Err(Error::Redis("nested reply not supported".into())),
                    }
                }
                Reply::Array(items)
            }
            _ => return Err(Error::Redis("unexpected reply type".into())),
        })
    }
}
