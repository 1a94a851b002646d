//! Durable append-only write-ahead log with group commit and replay.
//!
//! The log is a directory of numbered segment files (`00000000000000000001.wal`, …). Each record
//! is framed as `[len: u32 LE][crc32: u32 LE][payload]`. One writer thread owns the open
//! segment; callers hand it payloads through a bounded queue and get a callback once their
//! record is on disk:
//!
//! ```text
//!  append(payload, done) ──bounded queue──▶ writer thread: drain queue ─▶ write all
//!        (Full → caller answers 429)                         ─▶ fdatasync once ─▶ done(Ok(seg)) …
//!  rotate() ─────────────────────────────▶ seal segment S, open S+1 ─▶ returns S
//!  remove_through(S) deletes sealed segments ≤ S once their contents are committed elsewhere.
//! ```
//!
//! Callbacks run on the writer thread in log order and before any later command is handled,
//! so "everything acknowledged before `rotate()` returned S" is exactly "everything in segments
//! ≤ S". Replay ([`read_dir`]) returns every intact record; a torn record at the tail of the
//! last segment (a write that was never acknowledged) is cut off.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("write-ahead log I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("write-ahead log segment {segment} is corrupt at byte {offset}")]
    Corrupt { segment: u64, offset: u64 },
    #[error("write-ahead log queue is full")]
    Full,
    #[error("write-ahead log is closed")]
    Closed,
    #[error("record of {0} bytes exceeds the 1 GiB record limit")]
    TooLarge(usize),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Segment number; increases by one at each rotation.
pub type SegmentId = u64;

/// Called on the writer thread once the record is durable (or failed to be).
pub type Done = Box<dyn FnOnce(Result<SegmentId>) + Send>;

/// Runs on the writer thread right after a rotation, with the sealed segment's id: every
/// `Done` of that segment has run and none of the next one has.
type Hook = Box<dyn FnOnce(SegmentId) + Send>;

const HEADER: usize = 8;
const MAX_RECORD: usize = 1 << 30;
/// Upper bound of bytes written before one fsync, so one group cannot stall the others long.
const MAX_GROUP_BYTES: usize = 64 << 20;

enum Cmd {
    Append(Vec<u8>, Done),
    Rotate(Option<Hook>, mpsc::Sender<Result<SegmentId>>),
    Remove(SegmentId, mpsc::Sender<Result<()>>),
    Stats(mpsc::Sender<Stats>),
}

/// Counters of the writer, for health and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub current_segment: SegmentId,
    pub records: u64,
    pub bytes: u64,
    pub fsyncs: u64,
}

/// One record read back by [`read_dir`].
#[derive(Debug, Clone)]
pub struct Record {
    pub segment: SegmentId,
    pub payload: Vec<u8>,
}

/// Handle to the writer thread. Dropping it (or [`Wal::close`]) ends the thread after the
/// queue is drained.
pub struct Wal {
    tx: Option<SyncSender<Cmd>>,
    thread: Option<JoinHandle<()>>,
    dir: PathBuf,
}

impl Wal {
    /// Opens `dir` for appending in a new segment after any existing ones. Run [`read_dir`]
    /// first to replay what is there. `queue` bounds the requests waiting for the writer.
    pub fn open(dir: impl AsRef<Path>, queue: usize) -> Result<Wal> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        let next = list_segments(&dir)?.last().map_or(1, |s| s + 1);
        let writer = Writer::create(&dir, next)?;
        let (tx, rx) = mpsc::sync_channel(queue.max(1));
        let thread = std::thread::Builder::new()
            .name("reelhouse-wal".into())
            .spawn(move || writer.run(rx))?;
        Ok(Wal {
            tx: Some(tx),
            thread: Some(thread),
            dir,
        })
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queues a record; `done` runs once it is fsynced. Fails fast with [`Error::Full`] when
    /// the queue is full (the caller should answer 429), never blocks.
    pub fn try_append(&self, payload: Vec<u8>, done: Done) -> Result<()> {
        if payload.len() > MAX_RECORD {
            return Err(Error::TooLarge(payload.len()));
        }
        let tx = self.tx.as_ref().ok_or(Error::Closed)?;
        tx.try_send(Cmd::Append(payload, done))
            .map_err(|e| match e {
                TrySendError::Full(_) => Error::Full,
                TrySendError::Disconnected(_) => Error::Closed,
            })
    }

    /// Queues a record, waiting for room in the queue (bulk loaders use this).
    pub fn append_blocking(&self, payload: Vec<u8>, done: Done) -> Result<()> {
        if payload.len() > MAX_RECORD {
            return Err(Error::TooLarge(payload.len()));
        }
        let tx = self.tx.as_ref().ok_or(Error::Closed)?;
        tx.send(Cmd::Append(payload, done))
            .map_err(|_| Error::Closed)
    }

    /// Seals the current segment and returns its id; later records go to the next one.
    pub fn rotate(&self) -> Result<SegmentId> {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Rotate(None, tx))?;
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// Seals the current segment and runs `f` on the writer thread at that exact point in
    /// the log: after the callbacks of every record of the sealed segment, before any of the
    /// next. Use it to capture state derived from the log that must match a segment boundary.
    pub fn rotate_then<T: Send + 'static>(
        &self,
        f: impl FnOnce(SegmentId) -> T + Send + 'static,
    ) -> Result<(SegmentId, T)> {
        let (tx, rx) = mpsc::channel();
        let (out_tx, out_rx) = mpsc::channel();
        let hook: Hook = Box::new(move |seg| {
            let _ = out_tx.send(f(seg));
        });
        self.send(Cmd::Rotate(Some(hook), tx))?;
        let seg = rx.recv().map_err(|_| Error::Closed)??;
        let out = out_rx.recv().map_err(|_| Error::Closed)?;
        Ok((seg, out))
    }

    /// Deletes sealed segments with id ≤ `through` (never the open one).
    pub fn remove_through(&self, through: SegmentId) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Remove(through, tx))?;
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// Writer counters.
    pub fn stats(&self) -> Result<Stats> {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Stats(tx))?;
        rx.recv().map_err(|_| Error::Closed)
    }

    fn send(&self, cmd: Cmd) -> Result<()> {
        let tx = self.tx.as_ref().ok_or(Error::Closed)?;
        tx.send(cmd).map_err(|_| Error::Closed)
    }

    /// Drains the queue and stops the writer thread.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Writer {
    dir: PathBuf,
    segment: SegmentId,
    file: BufWriter<File>,
    stats: Stats,
}

impl Writer {
    fn create(dir: &Path, segment: SegmentId) -> Result<Writer> {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(segment_path(dir, segment))?;
        // The new file's directory entry must be durable before records in it are acked.
        File::open(dir)?.sync_all()?;
        Ok(Writer {
            dir: dir.to_path_buf(),
            segment,
            file: BufWriter::with_capacity(1 << 20, file),
            stats: Stats {
                current_segment: segment,
                ..Stats::default()
            },
        })
    }

    fn run(mut self, rx: Receiver<Cmd>) {
        let mut group: Vec<(Vec<u8>, Done)> = Vec::new();
        let mut pending: Option<Cmd> = None;
        loop {
            let cmd = match pending.take() {
                Some(c) => c,
                None => match rx.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                },
            };
            match cmd {
                Cmd::Append(p, d) => {
                    let mut bytes = p.len();
                    group.push((p, d));
                    // Group commit: take everything already queued behind this record.
                    while bytes < MAX_GROUP_BYTES {
                        match rx.try_recv() {
                            Ok(Cmd::Append(p, d)) => {
                                bytes += p.len();
                                group.push((p, d));
                            }
                            Ok(other) => {
                                pending = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let result = self.write_group(&group);
                    for (_, done) in group.drain(..) {
                        done(match &result {
                            Ok(()) => Ok(self.segment),
                            Err(e) => Err(Error::Io(io::Error::other(e.to_string()))),
                        });
                    }
                }
                Cmd::Rotate(hook, reply) => {
                    let r = self.rotate();
                    if let (Ok(seg), Some(hook)) = (&r, hook) {
                        hook(*seg);
                    }
                    let _ = reply.send(r);
                }
                Cmd::Remove(through, reply) => {
                    let _ = reply.send(self.remove_through(through));
                }
                Cmd::Stats(reply) => {
                    let _ = reply.send(self.stats);
                }
            }
        }
    }

    fn write_group(&mut self, group: &[(Vec<u8>, Done)]) -> Result<()> {
        for (p, _) in group {
            let mut header = [0u8; HEADER];
            header[..4].copy_from_slice(&(p.len() as u32).to_le_bytes());
            header[4..].copy_from_slice(&crc32fast::hash(p).to_le_bytes());
            self.file.write_all(&header)?;
            self.file.write_all(p)?;
            self.stats.records += 1;
            self.stats.bytes += (HEADER + p.len()) as u64;
        }
        self.file.flush()?;
        self.file.get_ref().sync_data()?;
        self.stats.fsyncs += 1;
        Ok(())
    }

    fn rotate(&mut self) -> Result<SegmentId> {
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        let sealed = self.segment;
        let next = Writer::create(&self.dir, sealed + 1)?;
        self.segment = next.segment;
        self.file = next.file;
        self.stats.current_segment = self.segment;
        Ok(sealed)
    }

    fn remove_through(&mut self, through: SegmentId) -> Result<()> {
        for s in list_segments(&self.dir)? {
            if s <= through && s != self.segment {
                fs::remove_file(segment_path(&self.dir, s))?;
            }
        }
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}

fn segment_path(dir: &Path, segment: SegmentId) -> PathBuf {
    dir.join(format!("{segment:020}.wal"))
}

/// Segment ids present in `dir`, ascending.
pub fn list_segments(dir: &Path) -> Result<Vec<SegmentId>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(id) = name.strip_suffix(".wal").and_then(|n| n.parse().ok()) {
            out.push(id);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Reads every intact record of every segment, in order (read-only; safe beside a writer).
///
/// A torn or corrupt record at the end of the *last* segment is an unacknowledged write cut
/// short by a crash and is ignored (and truncated when `repair` is set). Damage anywhere else
/// means acknowledged data is unreadable and is an error.
pub fn read_dir(dir: impl AsRef<Path>, repair: bool) -> Result<Vec<Record>> {
    let dir = dir.as_ref();
    let segments = list_segments(dir)?;
    let mut out = Vec::new();
    for (i, &segment) in segments.iter().enumerate() {
        let path = segment_path(dir, segment);
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        let mut off = 0usize;
        while off < bytes.len() {
            let intact = bytes.len() - off >= HEADER && {
                let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap_or_default());
                let crc =
                    u32::from_le_bytes(bytes[off + 4..off + 8].try_into().unwrap_or_default());
                let end = off + HEADER + len as usize;
                end <= bytes.len() && crc32fast::hash(&bytes[off + HEADER..end]) == crc
            };
            if !intact {
                if i + 1 == segments.len() {
                    tracing::warn!(
                        segment,
                        offset = off,
                        "dropping torn tail of the write-ahead log"
                    );
                    if repair {
                        OpenOptions::new()
                            .write(true)
                            .open(&path)?
                            .set_len(off as u64)?;
                    }
                    break;
                }
                return Err(Error::Corrupt {
                    segment,
                    offset: off as u64,
                });
            }
            let len =
                u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap_or_default()) as usize;
            out.push(Record {
                segment,
                payload: bytes[off + HEADER..off + HEADER + len].to_vec(),
            });
            off += HEADER + len;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn append_all(wal: &Wal, payloads: &[&[u8]]) -> Vec<SegmentId> {
        let got = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        for p in payloads {
            let got = got.clone();
            let tx = tx.clone();
            wal.append_blocking(
                p.to_vec(),
                Box::new(move |r| {
                    got.lock().unwrap().push(r.unwrap());
                    tx.send(()).unwrap();
                }),
            )
            .unwrap();
        }
        for _ in payloads {
            rx.recv().unwrap();
        }
        let v = got.lock().unwrap().clone();
        v
    }

    #[test]
    fn append_rotate_replay_remove() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), 8).unwrap();
        assert_eq!(append_all(&wal, &[b"a", b"bb"]), vec![1, 1]);
        assert_eq!(wal.rotate().unwrap(), 1);
        assert_eq!(append_all(&wal, &[b"ccc"]), vec![2]);
        let recs = read_dir(dir.path(), false).unwrap();
        let got: Vec<(u64, &[u8])> = recs.iter().map(|r| (r.segment, &r.payload[..])).collect();
        assert_eq!(got, vec![(1, &b"a"[..]), (1, b"bb"), (2, b"ccc")]);
        wal.remove_through(1).unwrap();
        assert_eq!(list_segments(dir.path()).unwrap(), vec![2]);
        drop(wal);
        // Reopening continues after the last segment.
        let wal = Wal::open(dir.path(), 8).unwrap();
        assert_eq!(append_all(&wal, &[b"d"]), vec![3]);
    }

    #[test]
    fn rotate_hook_sees_exactly_the_sealed_segments_callbacks() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), 1024).unwrap();
        let applied = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        let queue = |n: usize| {
            for _ in 0..n {
                let (applied, tx) = (Arc::clone(&applied), tx.clone());
                wal.try_append(
                    b"x".to_vec(),
                    Box::new(move |r| {
                        applied.fetch_add(1, Ordering::SeqCst);
                        tx.send(r.unwrap()).unwrap();
                    }),
                )
                .unwrap();
            }
        };
        queue(50);
        let seen = Arc::clone(&applied);
        let (seg, at_hook) = wal
            .rotate_then(move |_| seen.load(Ordering::SeqCst))
            .unwrap();
        queue(20);
        let segs: Vec<u64> = (0..70).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(seg, 1);
        // The hook ran after all 50 callbacks of segment 1 and before any of segment 2.
        assert_eq!(at_hook, 50);
        assert_eq!(segs.iter().filter(|s| **s == 1).count(), 50);
        assert_eq!(segs.iter().filter(|s| **s == 2).count(), 20);
    }

    #[test]
    fn torn_tail_is_cut_and_middle_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path(), 8).unwrap();
            append_all(&wal, &[b"one", b"two"]);
        }
        let seg = segment_path(dir.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap(); // a half-written header
        drop(f);
        let recs = read_dir(dir.path(), true).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(fs::metadata(&seg).unwrap().len(), 2 * (HEADER as u64) + 6);
        // Flip a payload byte of the first record and add a later segment: now it is fatal.
        let mut bytes = fs::read(&seg).unwrap();
        bytes[HEADER] ^= 0xff;
        fs::write(&seg, bytes).unwrap();
        fs::write(segment_path(dir.path(), 2), b"").unwrap();
        assert!(matches!(
            read_dir(dir.path(), false),
            Err(Error::Corrupt {
                segment: 1,
                offset: 0
            })
        ));
    }

    #[test]
    fn full_queue_is_reported_not_blocked() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), 1).unwrap();
        let mut full = false;
        for _ in 0..10_000 {
            match wal.try_append(vec![0; 1024], Box::new(|_| {})) {
                Err(Error::Full) => {
                    full = true;
                    break;
                }
                other => other.unwrap(),
            }
        }
        assert!(full, "a queue of one must fill up under a tight loop");
    }
}
