//! Blocks shared across a fleet of agents through NATS JetStream.
//!
//! Every agent publishes the blocks and unblocks it decides (not the ones it
//! received) to one stream, on a subject of its own host, and follows the
//! whole stream with an ordered consumer, applying what the other hosts
//! decided. Expiry travels as an absolute wall-clock time, and each message
//! carries a JetStream per-message TTL that ends with its longest block, so
//! the stream holds only decisions still in force: a host that starts or
//! comes back replays it from the beginning and converges.
//!
//! NATS being down never stops local protection: decisions queue in memory
//! (bounded, counted when dropped) and drain once a server answers again,
//! retried under one message id so JetStream keeps each batch once.
//!
//! What lives where: `settings` (the config), `wire` (decisions and batches), `outbox` (the
//! bounded queue), `nats` (connection and stream), `publish` and `follow` (the two loops),
//! `metrics`.

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use async_nats::jetstream;
use log::{info, warn};

mod follow;
mod metrics;
mod nats;
mod outbox;
mod publish;
mod settings;
mod wire;

pub use follow::handle_batch;
pub use metrics::*;
pub use nats::stream_config;
pub use outbox::*;
pub use settings::*;
pub use wire::*;
use {follow::*, nats::*, publish::*};

/// Decisions in one JetStream message at most: a burst of 100 000 blocks
/// becomes a few hundred messages, each far below NATS's 1 MiB payload cap.
/// A message with more is dropped unread (`oversized`).
pub const MAX_BATCH: usize = 256;

/// The largest message a follower reads. The biggest batch this agent writes is
/// `MAX_BATCH` decisions of at most ~600 bytes each (a 200-character detail, an origin, the
/// keys), about 150 KiB; anything larger did not come from a guard agent and is dropped
/// unparsed (`oversized`).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// What applying a decision of another host did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The kernel blocklist changed.
    Changed,
    /// Already so (an equal or longer block, or no block to lift).
    Unchanged,
    /// Not applied, for this reason (a metric label).
    Dropped(&'static str),
}

/// Where a decision read from the stream comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote<'a> {
    /// The host, as the subject it was published on names it (NATS permissions can tie a
    /// subject to a credential; the batch's own `host` field must agree).
    pub host: &'a str,
    /// This host's own decision, replayed after a restart.
    pub own: bool,
    /// Read as it arrived, not while replaying the stream at start.
    pub live: bool,
}

/// The agent side of the fleet: applies what other hosts decided.
pub trait Applier: Send + Sync + 'static {
    fn apply_remote(&self, from: &Remote<'_>, decision: &Decision) -> Applied;
}

/// The running fleet link: the outbox the agent pushes into, and the tasks.
pub struct Fleet {
    pub outbox: Arc<Outbox>,
    pub host: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Connects (in the background: an unreachable NATS does not delay the
    /// agent) and starts publishing and following.
    pub async fn start(
        s: FleetSettings,
        max_ttl: Duration,
        metrics: Arc<FleetMetrics>,
        applier: Arc<dyn Applier>,
    ) -> Result<Self> {
        let client = connect(&s, metrics.clone()).await?;
        let js = jetstream::new(client);
        let outbox = Arc::new(Outbox::new(s.queue_limit, metrics.clone()));
        let s = Arc::new(s);
        info!(
            "fleet: host {} on stream {} via {}",
            s.host,
            s.stream,
            s.urls.join(",")
        );
        let tasks = vec![
            tokio::spawn(publish_loop(
                js.clone(),
                s.clone(),
                max_ttl,
                outbox.clone(),
                metrics.clone(),
            )),
            tokio::spawn(follow_loop(js, s.clone(), max_ttl, applier, metrics)),
        ];
        Ok(Self {
            outbox,
            host: s.host.clone(),
            tasks,
        })
    }

    /// Gives queued decisions up to `grace` to reach JetStream, then stops.
    pub async fn shutdown(self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        while self.outbox.len() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.outbox.len();
        if left > 0 {
            warn!("fleet: {left} decision(s) not yet published at shutdown");
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Registry;
    use std::sync::Mutex;
    use std::time::Duration;

    fn file(text: &str) -> FleetFile {
        toml::from_str(text).expect("valid toml")
    }

    #[test]
    fn off_without_urls_and_command_line_wins() {
        assert_eq!(
            FleetSettings::resolve(&FleetFile::default(), &[], None).unwrap(),
            None
        );
        let f = file("urls = [\"nats://10.0.0.1:4222\"]\nhost = \"web-1\"");
        let s = FleetSettings::resolve(&f, &["nats://10.0.0.2:4222".into()], Some("web-2"))
            .unwrap()
            .unwrap();
        assert_eq!(s.urls, vec!["nats://10.0.0.2:4222"]);
        assert_eq!(s.host, "web-2");
        assert_eq!(s.stream, "GUARD_BLOCKS");
        assert_eq!(s.own_subject(), "guard.blocks.web-2");
        assert_eq!(s.all_subjects(), "guard.blocks.*");
        assert_eq!(s.auth, Auth::None);
    }

    #[test]
    fn refuses_what_would_break_subjects_or_auth() {
        let bad = [
            "urls = [\"nats://a:4222\"]\nhost = \"web.1\"",
            "urls = [\"nats://a:4222\"]\nhost = \"w\"\nstream = \"a b\"",
            "urls = [\"nats://a:4222\"]\nhost = \"w\"\nsubject_prefix = \"guard.>\"",
            "urls = [\"nats://a:4222\"]\nhost = \"w\"\nreplicas = 7",
            "urls = [\"nats://a:4222\"]\nhost = \"w\"\nuser = \"u\"",
            "urls = [\"nats://a:4222\"]\nhost = \"w\"\ntoken = \"t\"\nuser = \"u\"\npassword = \"p\"",
            "urls = [\"nats://a:4222\"]\nhost = \"w\"\ntls_cert_file = \"/c\"",
            "urls = [\"nats://a:4222\"]\nhost = \"w\"\nqueue_limit = 0",
            "urls = [\"http://\"]\nhost = \"w\"",
            "urls = [\"nats://a:4222\"]\nhost = \"w\"\nhost_rate = 0",
            "urls = [\"nats://a:4222\"]\nhost = \"w\"\nhost_share_percent = 101",
            "urls = [\"nats://a:4222\"]\nhost = \"w\"\nunblocks = \"all\"",
            "urls = [\"nats://a:4222\"]\nhost = \"w\"\nmissing_stream = \"later\"",
        ];
        for text in bad {
            assert!(
                FleetSettings::resolve(&file(text), &[], None).is_err(),
                "accepted: {text}"
            );
        }
        let ok = file("urls = [\"nats://a:4222\"]\nhost = \"w\"\ntoken = \"t\"");
        let s = FleetSettings::resolve(&ok, &[], None).unwrap().unwrap();
        assert_eq!(s.auth, Auth::Token("t".into()));
        assert_eq!(
            (s.host_rate, s.host_burst, s.host_share_percent),
            (
                DEFAULT_HOST_RATE,
                DEFAULT_HOST_BURST,
                DEFAULT_HOST_SHARE_PERCENT
            )
        );
        assert_eq!(
            (s.unblocks, s.missing_stream),
            (UnblockScope::Fleet, MissingStream::Recreate)
        );
        let any = file("urls = [\"nats://a:4222\"]\nhost = \"w\"\nunblocks = \"any\"\nmissing_stream = \"wait\"");
        let s = FleetSettings::resolve(&any, &[], None).unwrap().unwrap();
        assert_eq!(
            (s.unblocks, s.missing_stream),
            (UnblockScope::Any, MissingStream::Wait)
        );
    }

    fn decision(action: Action, expires: u64) -> Decision {
        Decision {
            action,
            prefix: "198.18.0.3/32".into(),
            expires_unix_ms: expires,
            decided_unix_ms: 1_000,
            reason: "operator".into(),
            origin: "operator:uid=0".into(),
            level: 0,
            detail: String::new(),
        }
    }

    #[test]
    fn a_batch_lives_as_long_as_its_longest_block() {
        let max = Duration::from_secs(86_400);
        let b = Batch {
            v: WIRE_VERSION,
            host: "a".into(),
            decisions: vec![
                decision(Action::Block, 10_000 + 90_500),
                decision(Action::Block, 10_000 + 5_000),
            ],
        };
        assert_eq!(b.ttl(10_000, max), Duration::from_secs(91));
        let mut u = b.clone();
        u.decisions.push(decision(Action::Unblock, 0));
        assert_eq!(
            u.ttl(10_000, max),
            max,
            "an unblock outlives what it cancels"
        );
        let expired = Batch {
            decisions: vec![decision(Action::Block, 5_000)],
            ..b
        };
        assert_eq!(expired.ttl(10_000, max), Duration::from_secs(1));
    }

    struct Recorder(Mutex<Vec<(String, Decision)>>, Applied);
    impl Applier for Recorder {
        fn apply_remote(&self, from: &Remote<'_>, d: &Decision) -> Applied {
            self.0.lock().unwrap().push((from.host.into(), d.clone()));
            self.1
        }
    }

    #[test]
    fn own_echoes_are_skipped_except_while_catching_up() {
        let metrics = FleetMetrics::register(&Registry::new());
        let rec = Recorder(Mutex::new(Vec::new()), Applied::Changed);
        let batch = |host: &str| {
            serde_json::to_vec(&Batch {
                v: WIRE_VERSION,
                host: host.into(),
                decisions: vec![decision(Action::Block, u64::MAX / 2)],
            })
            .unwrap()
        };
        handle_batch("a", "a", &batch("a"), false, &rec, &metrics);
        assert!(rec.0.lock().unwrap().is_empty());
        handle_batch("a", "a", &batch("a"), true, &rec, &metrics);
        handle_batch("a", "b", &batch("b"), false, &rec, &metrics);
        let seen = rec.0.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].0, "b");
        assert_eq!(metrics.applied.with_label_values(&["block"]).get(), 2);
        assert_eq!(metrics.lag.get_sample_count(), 1, "catch-up is not lag");
    }

    #[test]
    fn malformed_and_unknown_versions_are_counted_not_applied() {
        let metrics = FleetMetrics::register(&Registry::new());
        let rec = Recorder(Mutex::new(Vec::new()), Applied::Changed);
        handle_batch("a", "b", b"{not json", false, &rec, &metrics);
        let future = br#"{"v":9,"host":"b","decisions":[]}"#;
        handle_batch("a", "b", future, false, &rec, &metrics);
        assert!(rec.0.lock().unwrap().is_empty());
        assert_eq!(metrics.dropped.with_label_values(&["malformed"]).get(), 1);
        assert_eq!(
            metrics
                .dropped
                .with_label_values(&["unknown_version"])
                .get(),
            1
        );
    }

    #[test]
    fn oversized_and_impersonating_messages_are_counted_not_applied() {
        let metrics = FleetMetrics::register(&Registry::new());
        let rec = Recorder(Mutex::new(Vec::new()), Applied::Changed);
        let batch = |host: &str, n: usize| {
            serde_json::to_vec(&Batch {
                v: WIRE_VERSION,
                host: host.into(),
                decisions: vec![decision(Action::Block, u64::MAX / 2); n],
            })
            .unwrap()
        };
        // More decisions than a batch holds: none applied, each counted.
        handle_batch("a", "b", &batch("b", MAX_BATCH + 1), false, &rec, &metrics);
        // Past the byte bound: dropped unparsed, counted once.
        let mut huge = batch("b", 1);
        huge.resize(MAX_MESSAGE_BYTES + 1, b' ');
        handle_batch("a", "b", &huge, false, &rec, &metrics);
        // Published on c's subject, claiming to be b.
        handle_batch("a", "c", &batch("b", 3), false, &rec, &metrics);
        assert!(rec.0.lock().unwrap().is_empty());
        let dropped = |r: &str| metrics.dropped.with_label_values(&[r]).get();
        assert_eq!(dropped("oversized"), MAX_BATCH as u64 + 2);
        assert_eq!(dropped("host_mismatch"), 3);
        // A full batch is fine.
        handle_batch("a", "b", &batch("b", MAX_BATCH), false, &rec, &metrics);
        assert_eq!(rec.0.lock().unwrap().len(), MAX_BATCH);
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_and_counts() {
        let metrics = Arc::new(FleetMetrics::register(&Registry::new()));
        let out = Outbox::new(3, metrics.clone());
        for i in 0..5u64 {
            out.push(decision(Action::Block, i));
        }
        let kept: Vec<u64> = out.take(10).iter().map(|d| d.expires_unix_ms).collect();
        assert_eq!(kept, vec![2, 3, 4]);
        assert_eq!(metrics.dropped.with_label_values(&["queue_full"]).get(), 2);
        out.push(decision(Action::Block, 9));
        out.put_back(vec![decision(Action::Block, 7), decision(Action::Block, 8)]);
        let order: Vec<u64> = out.take(10).iter().map(|d| d.expires_unix_ms).collect();
        assert_eq!(
            order,
            vec![7, 8, 9],
            "a failed batch goes back in front, in order"
        );
    }
}
