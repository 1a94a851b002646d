//! Tests of the rebuild driver.

use super::*;
use crate::batch::testing::{batch_of, ev_session, printed};
use proptest::prelude::*;
use reelhouse_lake::deltalake::arrow::array::{ArrayRef, Int64Array, StringArray};
use reelhouse_lake::deltalake::arrow::compute::cast;
use reelhouse_lake::deltalake::arrow::datatypes::{DataType, TimeUnit};

/// The SQL models [`fact_engagement`] and [`fact_follow`] replaced: their references.
const FACT_ENGAGEMENT_SQL: &str = "
SELECT event_id, event_type, user_id, video_id, creator_id, session_id, event_time,
  comment_id, share_id, parent_share_id, channel, event_date
FROM ev WHERE event_type IN ('like', 'unlike', 'share', 'comment')";
const FACT_FOLLOW_SQL: &str = "
SELECT event_id, event_type, user_id, creator_id, event_time, event_date
FROM ev WHERE event_type IN ('follow_creator', 'unfollow_creator')";

use crate::batch::testing::EVENT_TYPES as KINDS;

/// A full rebuild takes every model once, each after the models it reads, and the models
/// that do not need `fact_video_view` before it; a report lists tables in one order.
#[test]
fn full_rebuild_order_keeps_inputs_first_and_views_late() {
    let order: Vec<&str> = full_rebuild_order().iter().map(|m| m.name).collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    let mut all: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
    all.sort_unstable();
    assert_eq!(sorted, all, "every model exactly once");
    let at = |n: &str| order.iter().position(|x| *x == n).unwrap();
    for m in MODELS {
        if let Compute::Rust(_, reads) = m.compute {
            for r in reads {
                assert!(at(r) < at(m.name), "{} before {}", r, m.name);
            }
        }
    }
    let views = at("fact_video_view");
    for early in [
        "fact_engagement",
        "fact_follow",
        "like_state",
        "follow_state",
    ] {
        assert!(
            at(early) < views,
            "{early} is written beside fact_video_view"
        );
    }
    for late in ["fact_session", "agg_creator_daily", "agg_video_hourly"] {
        assert!(at(late) > views, "{late} reads fact_video_view");
    }
    let ranks: Vec<usize> = table_names().map(table_rank).collect();
    assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{ranks:?}");
}

/// Each Rust model computes from the models it declares it reads and no others: a full
/// rebuild starts it ahead of its turn with only those ([`Ahead`]). Without a declared
/// input it must fail, which shows the check can fail. (The rebuild tests in
/// `crates/cli/tests` run every model this way over generated events.)
#[test]
fn rust_models_read_only_what_they_declare() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ctx = SessionContext::new();
        let events = reelhouse_lake::schema::events_schema();
        let t = MemTable::try_new(events, vec![vec![]]).unwrap();
        ctx.register_table("events", Arc::new(t)).unwrap();
        let df = ctx
            .sql(&format!("SELECT {EV_COLUMNS} FROM events"))
            .await
            .unwrap();
        let schema = Arc::new(df.schema().as_arrow().clone());
        let ev = with_schema(schema, df.collect().await.unwrap());
        let mut all = Prior::default();
        all.0.insert("ev", ev);
        let inputs = Inputs::default();
        for m in MODELS {
            let Compute::Rust(f, reads) = m.compute else {
                continue;
            };
            let only = |skip: Option<&str>| {
                Prior(
                    reads
                        .iter()
                        .filter(|r| Some(**r) != skip)
                        .map(|r| (*r, all.0[r].clone()))
                        .collect(),
                )
            };
            let out = f(&only(None), &inputs)
                .unwrap_or_else(|e| panic!("{} with its declared inputs: {e}", m.name));
            for r in reads.iter() {
                assert!(
                    f(&only(Some(r)), &inputs).is_err(),
                    "{} does not read {r}",
                    m.name
                );
            }
            all.0.insert(m.name, vec![out]);
        }
    });
}

/// Events of every kind (and none), with string columns as views, as `ev` has them.
fn events(gen: &[(Option<u8>, u8, Option<u8>)]) -> RecordBatch {
    let views = |v: Vec<Option<String>>| -> ArrayRef {
        cast(&StringArray::from(v), &DataType::Utf8View).unwrap()
    };
    let ints = |v: Vec<Option<i64>>| Arc::new(Int64Array::from(v)) as ArrayRef;
    let some = |f: &dyn Fn(usize) -> String| -> ArrayRef {
        views((0..gen.len()).map(|i| Some(f(i))).collect())
    };
    let maybe =
        |f: &dyn Fn(u8) -> String| -> ArrayRef { views(gen.iter().map(|g| g.2.map(f)).collect()) };
    let time = cast(
        &Int64Array::from_iter_values(gen.iter().map(|g| i64::from(g.1) * 1_000_000)),
        &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
    )
    .unwrap();
    let date = cast(&time, &DataType::Date32).unwrap();
    batch_of(vec![
        ("event_id", some(&|i| format!("e{i:03}"))),
        (
            "event_type",
            views(
                gen.iter()
                    .map(|g| g.0.map(|k| KINDS[k as usize % KINDS.len()].to_string()))
                    .collect(),
            ),
        ),
        ("event_time", time),
        (
            "user_id",
            ints(gen.iter().map(|g| Some(i64::from(g.1 % 5))).collect()),
        ),
        ("session_id", maybe(&|x| format!("s{x}"))),
        (
            "video_id",
            ints(gen.iter().map(|g| g.2.map(i64::from)).collect()),
        ),
        (
            "creator_id",
            ints(gen.iter().map(|g| Some(i64::from(g.1 % 3))).collect()),
        ),
        ("comment_id", maybe(&|x| format!("c{x}"))),
        ("share_id", maybe(&|x| format!("sh{x}"))),
        ("parent_share_id", maybe(&|x| format!("p{x}"))),
        ("channel", maybe(&|x| format!("ch{}", x % 2))),
        ("event_date", date),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn engagement_and_follows_equal_the_sql(
        gen in proptest::collection::vec(any::<(Option<u8>, u8, Option<u8>)>(), 1..60),
        split in 0usize..60,
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (ev, ctx) = ev_session(&events(&gen), split);
            let mut prior = Prior::default();
            prior.0.insert("ev", ev);
            for (f, sql) in [
                (fact_engagement as fn(&Prior, &Inputs) -> _, FACT_ENGAGEMENT_SQL),
                (fact_follow, FACT_FOLLOW_SQL),
            ] {
                let want = ctx.sql(sql).await.unwrap().collect().await.unwrap();
                let got = f(&prior, &Inputs::default()).unwrap();
                for w in &want {
                    prop_assert_eq!(w.schema(), got.schema());
                }
                let want = printed(&ctx, "want", want, "*", "event_id").await;
                let got = printed(&ctx, "got", vec![got], "*", "event_id").await;
                prop_assert_eq!(got, want);
                let _ = ctx.deregister_table("want");
                let _ = ctx.deregister_table("got");
            }
            Ok(())
        })?;
    }
}
