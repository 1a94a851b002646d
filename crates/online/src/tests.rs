//! Unit tests of the feature store.
use super::*;
use reelhouse_event::FixedClock;

/// A copy kept the way the Redis mirror keeps one: records of changed keys, dropped when
/// the entity is gone.
fn mirror(store: &FeatureStore, copy: &mut HashMap<Key, Vec<u8>>) {
    for (k, rec) in store.take_changes() {
        match rec {
            Some(b) => copy.insert(k, b),
            None => copy.remove(&k),
        };
    }
}

fn batch(lines: &[String], now: i64) -> RecordBatch {
    let evs: Vec<_> = lines
        .iter()
        .filter_map(|l| reelhouse_event::parse_event(l.as_bytes()).ok())
        .map(|e| reelhouse_event::stamp(e, now))
        .collect();
    reelhouse_lake::events_batch(&evs).unwrap()
}

/// The records copied after each step answer exactly what the store answers, for every
/// video, user and creator, including after an erasure and at a later clock.
#[test]
fn mirrored_records_answer_like_the_store() {
    let now = 1_790_000_000_000;
    let w = reelhouse_workload::generate(&reelhouse_workload::WorkloadConfig::new(6_000, 11, now));
    let (first, rest) = w.lines.split_at(2_500);
    let store = FeatureStore::new(Arc::new(FixedClock(now)), 8 * 86_400_000);
    store.apply(&batch(first, now)).unwrap();
    // Tracking starts with everything present counted as changed.
    store.track_changes();
    let mut copy = HashMap::new();
    mirror(&store, &mut copy);
    store.apply(&batch(rest, now)).unwrap();
    let victim = store.user_ids()[0];
    let gone = store.forget_user(victim);
    assert!(gone.views + gone.likes + gone.sessions > 0);
    mirror(&store, &mut copy);
    assert!(
        !copy.contains_key(&Key::User(victim as u64)),
        "erased user still copied"
    );
    assert!(store.take_changes().is_empty(), "changes are taken once");
    let totals = store.totals();
    assert!(totals.videos.len() > 50);
    for at in [now, now + 3_600_000 * 5] {
        for id in totals.videos.keys().map(|v| *v as u64) {
            let rec = VideoRecord::decode(&copy[&Key::Video(id)]).unwrap();
            let local = store.video_at(id, minute_of(at));
            assert_eq!(rec.features(id, at), local, "video {id}");
        }
        for id in store.user_ids().into_iter().map(|u| u as u64) {
            let rec = UserRecord::decode(&copy[&Key::User(id)]).unwrap();
            let users = store.inner.users.read(id);
            let local = UserRecord::of(&users[&id]).features(id, at);
            assert_eq!(rec.features(id, at), local, "user {id}");
        }
        for id in totals.creators.keys().map(|c| *c as u64) {
            let rec = CreatorRecord::decode(&copy[&Key::Creator(id)]).unwrap();
            let creators = store.inner.creators.read(id);
            let local = CreatorRecord::of(&creators[&id]).features(id, at);
            assert_eq!(rec.features(id, at), local, "creator {id}");
        }
    }
    // Nothing is copied that the store does not hold.
    let users: HashSet<u64> = store.user_ids().into_iter().map(|u| u as u64).collect();
    assert!(copy
        .keys()
        .all(|k| !matches!(k, Key::User(u) if !users.contains(u))));
}
