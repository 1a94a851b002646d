//! Upkeep of the [`FeatureStore`]: forgetting a user (erasure), pruning old windows, change
//! tracking for the copy to Redis, totals and sizes for `check` and `/metrics`, and the
//! snapshot encoding.

use super::*;

impl FeatureStore {
    /// Removes a user from the store (erasure): their per-user state, and their views, likes,
    /// follows, shares, comments and viewer entries from every video and creator count. Run
    /// where no event is being applied (a WAL cut). Returns how many entries went.
    pub fn forget_user(&self, user: i64) -> ForgetReport {
        let now_minute = minute_of(self.clock.now_ms());
        let mut report = ForgetReport::default();
        let Some(u) = self.inner.users.write(user as u64).remove(&(user as u64)) else {
            report.views = self.forget_views(user, now_minute);
            report.viewer_entries = self.forget_viewer(user, now_minute);
            return report;
        };
        for (video, l) in &u.likes {
            if l.on {
                if let Some(v) = self
                    .inner
                    .videos
                    .write(*video as u64)
                    .get_mut(&(*video as u64))
                {
                    v.likes -= 1;
                }
            }
            report.likes += 1;
        }
        for (creator, f) in &u.follows {
            if f.on {
                let mut c = self.inner.creators.write(*creator as u64);
                if let Some(c) = c.get_mut(&(*creator as u64)) {
                    c.followers -= 1;
                }
            }
            report.follows += 1;
        }
        // Shares and comments: forget the id (so a resend counts again) and the count.
        for (list, set, is_share) in [
            (&u.shares, &self.inner.shares, true),
            (&u.comments, &self.inner.comments, false),
        ] {
            for (video, key) in list {
                set.write(*key).remove(key);
                let mut videos = self.inner.videos.write(*video as u64);
                if let Some(v) = videos.get_mut(&(*video as u64)) {
                    let n = if is_share {
                        &mut v.shares
                    } else {
                        &mut v.comments
                    };
                    *n = n.saturating_sub(1);
                }
            }
        }
        report.shares = u.shares.len();
        report.comments = u.comments.len();
        report.sessions = u.sessions.len();
        report.views = self.forget_views(user, now_minute);
        report.viewer_entries = self.forget_viewer(user, now_minute);
        report
    }

    fn forget_views(&self, user: i64, now_minute: u32) -> usize {
        let mut gone = Vec::new();
        for mut shard in self.inner.views.shards_mut() {
            shard.retain(|_, v| {
                let mine = v.user_id == user;
                if mine {
                    gone.push(v.contribution());
                }
                !mine
            });
        }
        for c in &gone {
            self.contribute(c, -1, now_minute);
        }
        gone.len()
    }

    fn forget_viewer(&self, user: i64, now_minute: u32) -> usize {
        let one = Counts {
            views: 1,
            ..Counts::default()
        };
        let mut touched = Vec::new();
        for mut shard in self.inner.videos.shards_mut() {
            for (id, v) in shard.iter_mut() {
                if let Some(m) = v.viewers.remove(&user) {
                    v.viewers_by_minute.apply(m, &one, -1, now_minute);
                    touched.push(*id);
                }
            }
        }
        for id in &touched {
            self.inner.videos.mark(*id);
        }
        touched.len()
    }

    /// Every user the store holds state for (an API replica matches them against new
    /// erasure tombstones, which carry only salted hashes).
    pub fn user_ids(&self) -> Vec<i64> {
        self.inner
            .users
            .shards()
            .flat_map(|s| s.keys().map(|k| *k as i64).collect::<Vec<_>>())
            .collect()
    }

    /// Drops state no window or feature can need any more: view pairing state older than the
    /// keep period, sessions older than yesterday, viewers and buckets older than 24 h.
    pub fn prune(&self) {
        let now = self.clock.now_ms();
        let keep_from = now - self.keep_views_ms;
        for mut shard in self.inner.views.shards_mut() {
            shard.retain(|_, v| v.start_ms.or(v.end_ms).unwrap_or(0) >= keep_from);
        }
        let yesterday = day_of(now) - 1;
        for mut shard in self.inner.users.shards_mut() {
            for u in shard.values_mut() {
                u.sessions
                    .retain(|_, s| day_of(s.start_ms.unwrap_or(s.first_ms)) >= yesterday);
                if u.recent.len() > RECENT {
                    let mut ats: Vec<i64> = u.recent.values().map(|e| e.at_ms).collect();
                    let (_, nth, _) = ats.select_nth_unstable_by(RECENT - 1, |a, b| b.cmp(a));
                    let floor = keep_from.min(*nth);
                    u.recent.retain(|_, e| e.at_ms >= floor);
                }
            }
        }
        let oldest = minute_of(now).saturating_sub(DAY_MINUTES - 1);
        for mut shard in self.inner.videos.shards_mut() {
            for v in shard.values_mut() {
                // A viewer older than 24 h is re-added by their next view event.
                v.viewers.retain(|_, m| *m >= oldest);
            }
        }
    }

    /// Starts remembering which videos, users and creators change, with all present ones
    /// counted as changed (the first [`FeatureStore::take_changes`] copies everything). Call
    /// after [`FeatureStore::decode`].
    pub fn track_changes(&self) {
        self.inner.videos.track();
        self.inner.users.track();
        self.inner.creators.track();
    }

    /// The records of everything changed since the last call (`None`: the entity is gone,
    /// e.g. an erased user), read now, so each is the newest state.
    pub fn take_changes(&self) -> Vec<(Key, Option<Vec<u8>>)> {
        fn take<V>(
            map: &Sharded<V>,
            key: fn(u64) -> Key,
            encode: impl Fn(&V) -> Vec<u8>,
            out: &mut Vec<(Key, Option<Vec<u8>>)>,
        ) {
            for id in map.take_changed() {
                out.push((key(id), map.read(id).get(&id).map(&encode)));
            }
        }
        let mut out = Vec::new();
        take(
            &self.inner.videos,
            Key::Video,
            |v| encode_record(&VideoRecord::of(v)),
            &mut out,
        );
        take(
            &self.inner.users,
            Key::User,
            |u| encode_record(&UserRecord::of(u)),
            &mut out,
        );
        let creator = |c: &CreatorState| encode_record(&CreatorRecord::of(c));
        take(&self.inner.creators, Key::Creator, creator, &mut out);
        out
    }

    /// Counts `keys` as changed again (a copy of them failed; the next take retries them).
    pub fn retry_changes(&self, keys: impl IntoIterator<Item = Key>) {
        for k in keys {
            match k {
                Key::Video(id) => self.inner.videos.mark(id),
                Key::User(id) => self.inner.users.mark(id),
                Key::Creator(id) => self.inner.creators.mark(id),
            }
        }
    }

    /// Per-video and per-creator totals, for comparison with the warehouse.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for shard in self.inner.videos.shards() {
            for (id, v) in shard.iter() {
                t.videos.insert(
                    *id as i64,
                    (
                        v.views_total as i64,
                        v.likes,
                        v.shares as i64,
                        v.comments as i64,
                    ),
                );
            }
        }
        for shard in self.inner.creators.shards() {
            for (id, c) in shard.iter() {
                t.creators.insert(*id as i64, c.followers);
            }
        }
        t
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            videos: self.inner.videos.len(),
            users: self.inner.users.len(),
            creators: self.inner.creators.len(),
            views: self.inner.views.len(),
            applied_events: self
                .inner
                .applied
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Estimated heap bytes of each part (see [`MemoryEstimate`]).
    pub fn memory(&self) -> MemoryEstimate {
        fn lww_bytes(m: &HashMap<i64, Lww>) -> usize {
            map_bytes(m) + m.values().map(|l| l.event_id.len()).sum::<usize>()
        }
        let sum = |s: &Sharded<()>| s.shards().map(|m| map_bytes(&m)).sum::<usize>();
        MemoryEstimate {
            views_bytes: self.inner.views.shards().map(|m| map_bytes(&m)).sum(),
            videos_bytes: self
                .inner
                .videos
                .shards()
                .map(|m| {
                    map_bytes(&m)
                        + m.values()
                            .map(|v| {
                                v.buckets.heap_bytes()
                                    + v.viewers_by_minute.heap_bytes()
                                    + map_bytes(&v.viewers)
                            })
                            .sum::<usize>()
                })
                .sum(),
            users_bytes: self
                .inner
                .users
                .shards()
                .map(|m| {
                    map_bytes(&m)
                        + m.values()
                            .map(|u| {
                                map_bytes(&u.recent)
                                    + lww_bytes(&u.likes)
                                    + lww_bytes(&u.follows)
                                    + map_bytes(&u.sessions)
                            })
                            .sum::<usize>()
                })
                .sum(),
            creators_bytes: self
                .inner
                .creators
                .shards()
                .map(|m| map_bytes(&m) + m.values().map(|c| c.buckets.heap_bytes()).sum::<usize>())
                .sum(),
            id_sets_bytes: sum(&self.inner.shares) + sum(&self.inner.comments),
        }
    }

    /// Serializes the whole store (MessagePack). Call where no event is being applied (the
    /// WAL thread at a rotation) so the bytes match one exact set of events.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain maps and numbers cannot fail.
        rmp_serde::to_vec(&self.inner).unwrap_or_default()
    }

    /// Replaces the contents with a snapshot made by [`FeatureStore::encode`].
    pub fn decode(&mut self, bytes: &[u8]) -> Result<()> {
        self.inner = rmp_serde::from_slice(bytes).map_err(|e| Error::Snapshot(e.to_string()))?;
        Ok(())
    }
}
