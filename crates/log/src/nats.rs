//! [`EventLog`] on a NATS JetStream stream.
//!
//! One stream (file storage, limits retention) holds the records on the subject
//! `<STREAM>.events`; a position is the stream sequence. Appends carry the record id as
//! `Nats-Msg-Id`, so a publish retried inside the stream's duplicate window is stored once.
//! The materializer reads with a durable pull consumer (explicit acknowledgement of all
//! records up to one, `AckPolicy::All`), created at each start right after the position its
//! tables already hold; API replicas read with an ordered (ephemeral) consumer.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;

use crate::{Appended, Entry, Error, EventLog, LogReader, LogStats, Result};

/// Default stream name when the URL has no path.
pub const DEFAULT_STREAM: &str = "reelhouse";

/// How long the stream remembers message ids for dedup of retried publishes.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Records older than this are dropped by the stream even if never truncated: a safety net
/// for a materializer that is gone for good (it normally truncates after every commit).
const MAX_AGE: Duration = Duration::from_secs(7 * 86_400);

/// The log on one JetStream stream.
pub struct NatsLog {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    subject: String,
    server: String,
}

fn backend(op: &'static str) -> impl Fn(&dyn std::fmt::Display) -> Error {
    move |e| Error::Backend {
        op,
        reason: e.to_string(),
    }
}

impl NatsLog {
    /// Connects to `nats://HOST:PORT[/STREAM]` and creates the stream if it does not exist.
    pub async fn connect(url: &str) -> Result<NatsLog> {
        let rest = url
            .strip_prefix("nats://")
            .ok_or_else(|| Error::Url(url.to_string()))?;
        let (server, stream) = match rest.split_once('/') {
            Some((s, name)) if !name.is_empty() => (s, name),
            Some((s, _)) => (s, DEFAULT_STREAM),
            None => (rest, DEFAULT_STREAM),
        };
        if server.is_empty()
            || !stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(Error::Url(url.to_string()));
        }
        let client = async_nats::ConnectOptions::new()
            .name("reelhouse")
            .connection_timeout(Duration::from_secs(5))
            .connect(format!("nats://{server}"))
            .await
            .map_err(|e| Error::Connect {
                url: format!("nats://{server}"),
                reason: e.to_string(),
            })?;
        let js = jetstream::new(client.clone());
        let subject = format!("{stream}.events");
        js.get_or_create_stream(stream::Config {
            name: stream.to_string(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            duplicate_window: DUPLICATE_WINDOW,
            max_age: MAX_AGE,
            ..Default::default()
        })
        .await
        .map_err(|e| backend("create stream")(&e))?;
        Ok(NatsLog {
            client,
            js,
            stream: stream.to_string(),
            subject,
            server: server.to_string(),
        })
    }

    async fn state(&self) -> Result<stream::State> {
        let mut s = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| backend("stream info")(&e))?;
        let info = s.info().await.map_err(|e| backend("stream info")(&e))?;
        Ok(info.state.clone())
    }
}

#[async_trait::async_trait]
impl EventLog for NatsLog {
    async fn append(&self, record: Bytes, id: &str) -> Result<Appended> {
        let publish = jetstream::message::PublishMessage::build()
            .payload(record)
            .message_id(id);
        let ack = self
            .js
            .send_publish(self.subject.clone(), publish)
            .await
            .map_err(|e| backend("publish")(&e))?
            .await
            .map_err(|e| backend("publish acknowledgement")(&e))?;
        Ok(Appended {
            position: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    async fn reader(&self, after: u64, durable: Option<&str>) -> Result<Box<dyn LogReader>> {
        let state = self.state().await?;
        // Records after `after` that the stream no longer holds cannot be read by anyone (an
        // empty new stream reports first sequence 0; a purged one, the next sequence).
        if state.first_sequence > after + 1 {
            return Err(Error::Gap {
                from: after + 1,
                to: state.first_sequence - 1,
            });
        }
        let start = (after + 1).max(state.first_sequence.max(1));
        let deliver_policy = consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start,
        };
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| backend("stream info")(&e))?;
        match durable {
            Some(name) => {
                // Recreated at each start, right after what the tables hold: the tables, not
                // the consumer's memory, say what is committed (a fresh data directory reads
                // everything the stream still has).
                let _ = stream.delete_consumer(name).await;
                let c: consumer::PullConsumer = stream
                    .create_consumer(consumer::pull::Config {
                        durable_name: Some(name.to_string()),
                        deliver_policy,
                        ack_policy: consumer::AckPolicy::All,
                        // Records stay unacknowledged until a Delta commit covers them.
                        ack_wait: Duration::from_secs(600),
                        max_ack_pending: 1_000_000,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| backend("create consumer")(&e))?;
                Ok(Box::new(DurableReader {
                    consumer: c,
                    client: self.client.clone(),
                    unacked: VecDeque::new(),
                    last: after,
                }))
            }
            None => {
                let c = stream
                    .create_consumer(consumer::pull::OrderedConfig {
                        deliver_policy,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| backend("create consumer")(&e))?;
                let messages = c.messages().await.map_err(|e| backend("read")(&e))?;
                Ok(Box::new(TailReader {
                    messages,
                    last: after,
                }))
            }
        }
    }

    async fn truncate(&self, through: u64) -> Result<()> {
        if through == 0 {
            return Ok(());
        }
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| backend("stream info")(&e))?;
        // Purges the records with sequence < through + 1.
        stream
            .purge()
            .sequence(through + 1)
            .await
            .map_err(|e| backend("purge")(&e))?;
        Ok(())
    }

    async fn stats(&self) -> Result<LogStats> {
        let s = self.state().await?;
        Ok(LogStats {
            first_position: if s.messages == 0 { 0 } else { s.first_sequence },
            last_position: s.last_sequence,
            records: s.messages,
            bytes: s.bytes,
        })
    }

    fn describe(&self) -> String {
        format!("nats://{}/{}", self.server, self.stream)
    }
}

type Pulled = async_nats::jetstream::consumer::pull::Batch;

impl DurableReader {
    /// A pull request for up to `max` records: answered with what is there at once
    /// (`wait: None`), or held by the server until at least one arrives or `wait` passes.
    async fn pull(&self, max: usize, wait: Option<Duration>) -> Result<Pulled> {
        let r = match wait {
            None => {
                self.consumer
                    .fetch()
                    .max_messages(max.max(1))
                    .messages()
                    .await
            }
            Some(w) => {
                self.consumer
                    .batch()
                    .max_messages(max.max(1))
                    .expires(w)
                    .messages()
                    .await
            }
        };
        r.map_err(|e| backend("fetch")(&e))
    }

    /// Moves the records of one pull into `out`, skipping redeliveries of what was handed
    /// out already (e.g. after an ack timeout).
    async fn take(&mut self, mut batch: Pulled, out: &mut Vec<Entry>) -> Result<()> {
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| backend("fetch")(&e))?;
            let position = m.info().map_err(|e| backend("fetch")(&e))?.stream_sequence;
            if position <= self.last {
                continue;
            }
            self.last = position;
            if let Some(reply) = m.message.reply.clone() {
                self.unacked.push_back((position, reply));
            }
            out.push(Entry {
                position,
                payload: m.message.payload.clone(),
            });
        }
        Ok(())
    }
}

/// The materializer's reader: a durable pull consumer; acknowledgements wait for commits.
struct DurableReader {
    consumer: consumer::PullConsumer,
    client: async_nats::Client,
    /// Reply subjects of delivered, unacknowledged records, by position.
    unacked: VecDeque<(u64, async_nats::Subject)>,
    last: u64,
}

#[async_trait::async_trait]
impl LogReader for DurableReader {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Entry>> {
        // What is there now (a no-wait fetch); when nothing is, one pull request that the
        // server answers with the first record to arrive, or empty after `wait`, so an idle
        // reader waits instead of polling the server in a loop.
        let mut out = Vec::new();
        let first = self.pull(max, None).await?;
        self.take(first, &mut out).await?;
        if out.is_empty() {
            let one = self
                .pull(1, Some(wait.max(Duration::from_millis(10))))
                .await?;
            self.take(one, &mut out).await?;
            if !out.is_empty() && max > 1 {
                let rest = self.pull(max - 1, None).await?;
                self.take(rest, &mut out).await?;
            }
        }
        Ok(out)
    }

    async fn ack_through(&mut self, through: u64) -> Result<()> {
        // With AckPolicy::All, acknowledging one record acknowledges every earlier one.
        let mut last = None;
        while self.unacked.front().is_some_and(|(p, _)| *p <= through) {
            last = self.unacked.pop_front();
        }
        if let Some((_, reply)) = last {
            self.client
                .publish(reply, Bytes::new())
                .await
                .map_err(|e| backend("ack")(&e))?;
            self.client.flush().await.map_err(|e| backend("ack")(&e))?;
        }
        Ok(())
    }
}

/// An API replica's reader: an ordered consumer, nothing to acknowledge.
struct TailReader {
    messages: consumer::pull::Ordered,
    last: u64,
}

#[async_trait::async_trait]
impl LogReader for TailReader {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let first = match tokio::time::timeout(wait, self.messages.next()).await {
            Ok(m) => m,
            Err(_) => return Ok(out),
        };
        let mut next = first;
        loop {
            let Some(m) = next else { break };
            let m = m.map_err(|e| backend("read")(&e))?;
            let position = m.info().map_err(|e| backend("read")(&e))?.stream_sequence;
            if position > self.last {
                self.last = position;
                out.push(Entry {
                    position,
                    payload: m.message.payload.clone(),
                });
            }
            if out.len() >= max {
                break;
            }
            // Take what is already here without waiting again.
            next = match futures::FutureExt::now_or_never(self.messages.next()) {
                Some(m) => m,
                None => break,
            };
        }
        Ok(out)
    }

    async fn ack_through(&mut self, _through: u64) -> Result<()> {
        Ok(())
    }
}
