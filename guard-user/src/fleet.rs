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

use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use futures_util::StreamExt as _;
use log::{debug, info, warn};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Decisions in one JetStream message at most: a burst of 100 000 blocks
/// becomes a few hundred messages, each far below NATS's 1 MiB payload cap.
pub const MAX_BATCH: usize = 256;

/// The wire format's version; a receiver drops batches of a version it
/// does not know instead of misreading them.
pub const WIRE_VERSION: u32 = 1;

/// `[fleet]` in guard.toml.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetFile {
    /// NATS server URLs (`nats://host:4222`, `tls://…`); none: fleet off.
    pub urls: Vec<String>,
    /// This host's name in the fleet (default: the kernel's hostname).
    pub host: Option<String>,
    pub stream: Option<String>,
    pub subject_prefix: Option<String>,
    /// Replicas of the stream when this agent creates it (1..=5).
    pub replicas: Option<usize>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub creds_file: Option<PathBuf>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_required: Option<bool>,
    /// Decisions held while NATS is unreachable before the oldest go.
    pub queue_limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    UserPassword { user: String, password: String },
    Token(String),
    CredsFile(PathBuf),
}

/// The fleet settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    pub urls: Vec<String>,
    pub host: String,
    pub stream: String,
    pub subject_prefix: String,
    pub replicas: usize,
    pub auth: Auth,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_client: Option<(PathBuf, PathBuf)>,
    pub tls_required: bool,
    pub queue_limit: usize,
}

/// A NATS subject token: letters, digits, `-` and `_` only.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn kernel_hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    (!name.is_empty()).then_some(name)
}

impl FleetSettings {
    /// `None` when no URL is configured (the fleet is off). `urls` and
    /// `host` from the command line win over the file's.
    pub fn resolve(file: &FleetFile, urls: &[String], host: Option<&str>) -> Result<Option<Self>> {
        let urls: Vec<String> = if urls.is_empty() {
            file.urls.clone()
        } else {
            urls.to_vec()
        };
        let urls: Vec<String> = urls
            .iter()
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Ok(None);
        }
        for url in &urls {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| anyhow::anyhow!("fleet: `{url}` is not a NATS server URL: {e}"))?;
        }
        let host = match host.map(str::to_string).or_else(|| file.host.clone()) {
            Some(h) => h,
            None => kernel_hostname()
                .context("fleet: no host name given and /proc/sys/kernel/hostname is unreadable; set [fleet] host")?,
        };
        if !is_token(&host) {
            bail!("fleet: host `{host}` may hold only letters, digits, `-` and `_` (it is a NATS subject token), at most 64");
        }
        let stream = file.stream.clone().unwrap_or_else(|| "GUARD_BLOCKS".into());
        if !is_token(&stream) {
            bail!("fleet: stream `{stream}` may hold only letters, digits, `-` and `_`");
        }
        let subject_prefix = file
            .subject_prefix
            .clone()
            .unwrap_or_else(|| "guard.blocks".into());
        if subject_prefix.split('.').any(|t| !is_token(t)) {
            bail!("fleet: subject_prefix `{subject_prefix}` must be dot-separated tokens of letters, digits, `-` and `_`");
        }
        let replicas = file.replicas.unwrap_or(1);
        if !(1..=5).contains(&replicas) {
            bail!("fleet: replicas must be 1..=5 (JetStream's limit)");
        }
        let auth = match (&file.user, &file.password, &file.token, &file.creds_file) {
            (None, None, None, None) => Auth::None,
            (Some(user), Some(password), None, None) => Auth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            },
            (None, None, Some(token), None) => Auth::Token(token.clone()),
            (None, None, None, Some(path)) => Auth::CredsFile(path.clone()),
            (Some(_), None, None, None) | (None, Some(_), None, None) => {
                bail!("fleet: user and password go together")
            }
            _ => bail!("fleet: give one of user+password, token or creds_file"),
        };
        let tls_client = match (&file.tls_cert_file, &file.tls_key_file) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => bail!("fleet: tls_cert_file and tls_key_file go together"),
        };
        let queue_limit = file.queue_limit.unwrap_or(100_000);
        if queue_limit == 0 {
            bail!("fleet: queue_limit must be at least 1");
        }
        Ok(Some(Self {
            urls,
            host,
            stream,
            subject_prefix,
            replicas,
            auth,
            tls_ca_file: file.tls_ca_file.clone(),
            tls_client,
            tls_required: file.tls_required.unwrap_or(false),
            queue_limit,
        }))
    }

    fn own_subject(&self) -> String {
        format!("{}.{}", self.subject_prefix, self.host)
    }

    fn all_subjects(&self) -> String {
        format!("{}.*", self.subject_prefix)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Block,
    Unblock,
}

/// One block or unblock as the deciding host saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub action: Action,
    pub prefix: String,
    /// When the block ends, Unix milliseconds (0 for an unblock).
    #[serde(default)]
    pub expires_unix_ms: u64,
    /// When the deciding host decided, Unix milliseconds.
    pub decided_unix_ms: u64,
    #[serde(default)]
    pub reason: String,
    /// Who decided on that host (`kernel:over_cap`, `chat-app:uid=…`, …).
    #[serde(default)]
    pub origin: String,
    /// Escalation strikes behind the block (0 when not escalated).
    #[serde(default)]
    pub level: u32,
    #[serde(default)]
    pub detail: String,
}

/// What one JetStream message carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub v: u32,
    pub host: String,
    pub decisions: Vec<Decision>,
}

impl Batch {
    /// How long the stream must keep this batch: until its last block
    /// ends; an unblock stays as long as a block it may cancel could.
    fn ttl(&self, now_unix_ms: u64, max_ttl: Duration) -> Duration {
        let longest = self
            .decisions
            .iter()
            .map(|d| match d.action {
                Action::Block if d.expires_unix_ms != 0 => {
                    Duration::from_millis(d.expires_unix_ms.saturating_sub(now_unix_ms))
                }
                _ => max_ttl,
            })
            .max()
            .unwrap_or_default();
        // JetStream counts TTLs in whole seconds, at least one.
        Duration::from_secs(longest.as_millis().div_ceil(1000).max(1) as u64)
    }
}

pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

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

/// The agent side of the fleet: applies what other hosts decided.
pub trait Applier: Send + Sync + 'static {
    fn apply_remote(&self, host: &str, decision: &Decision) -> Applied;
}

pub struct FleetMetrics {
    pub published: IntCounter,
    pub received: IntCounter,
    pub applied: IntCounterVec,
    pub dropped: IntCounterVec,
    pub publish_errors: IntCounter,
    pub queue_depth: IntGauge,
    pub lag: Histogram,
    pub connected: IntGauge,
    pub connection_events: IntCounterVec,
    pub caught_up: IntGauge,
    pub stream_sequence: IntGauge,
    pub follower_restarts: IntCounter,
}

impl FleetMetrics {
    pub fn register(r: &Registry) -> Self {
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone())).expect("unique metric");
            m
        }
        let counter = |name: &str, help: &str| reg(r, IntCounter::new(name, help).expect("valid"));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid"),
            )
        };
        let gauge = |name: &str, help: &str| reg(r, IntGauge::new(name, help).expect("valid"));
        let m = Self {
            published: counter(
                "guard_fleet_decisions_published_total",
                "Block and unblock decisions of this host acknowledged by JetStream.",
            ),
            received: counter(
                "guard_fleet_decisions_received_total",
                "Decisions of other hosts read from the stream.",
            ),
            applied: counter_vec(
                "guard_fleet_decisions_applied_total",
                "Decisions of other hosts that changed this host's kernel blocklist.",
                &["action"],
            ),
            dropped: counter_vec(
                "guard_fleet_decisions_dropped_total",
                "Decisions not published (queue_full) or not applied, by reason.",
                &["reason"],
            ),
            publish_errors: counter(
                "guard_fleet_publish_errors_total",
                "Publish attempts that failed and were retried.",
            ),
            queue_depth: gauge(
                "guard_fleet_publish_queue_depth",
                "Decisions of this host waiting to be acknowledged by JetStream.",
            ),
            lag: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "guard_fleet_apply_lag_seconds",
                        "From another host's decision to its block being in this host's kernel (wall clocks of both).",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0,
                    ]),
                )
                .expect("valid histogram"),
            ),
            connected: gauge(
                "guard_fleet_connected",
                "1 while the agent is connected to a NATS server.",
            ),
            connection_events: counter_vec(
                "guard_fleet_connection_events_total",
                "NATS connection events (connected, disconnected, …).",
                &["event"],
            ),
            caught_up: gauge(
                "guard_fleet_caught_up",
                "1 once the stream was replayed up to where it stood when the agent subscribed.",
            ),
            stream_sequence: gauge(
                "guard_fleet_stream_sequence",
                "The last stream sequence this agent has read.",
            ),
            follower_restarts: counter(
                "guard_fleet_follower_restarts_total",
                "Times the agent re-subscribed to the stream from its last sequence (a read \
                 error, or messages owed that did not arrive).",
            ),
        };
        // Every series exists from the start, so `increase()` in an alert sees the first one.
        for action in ["block", "unblock"] {
            m.applied.with_label_values(&[action]);
        }
        for reason in DROP_REASONS {
            m.dropped.with_label_values(&[reason]);
        }
        m
    }
}

/// Every `reason` of `guard_fleet_decisions_dropped_total`: not published (`queue_full`),
/// unreadable (`malformed`, `unknown_version`), or refused by this host (the rest, from the
/// agent's `Applier`).
pub const DROP_REASONS: [&str; 8] = [
    "queue_full",
    "malformed",
    "unknown_version",
    "expired",
    "allowlisted",
    "blocklist_full",
    "kernel_error",
    "superseded",
];

/// Where this host's decisions wait for JetStream. Pushing never blocks:
/// the agent calls it with its locks held.
pub struct Outbox {
    queue: Mutex<VecDeque<Decision>>,
    limit: usize,
    ready: Notify,
    metrics: Arc<FleetMetrics>,
}

impl Outbox {
    pub fn new(limit: usize, metrics: Arc<FleetMetrics>) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            limit,
            ready: Notify::new(),
            metrics,
        }
    }

    pub fn push(&self, decision: Decision) {
        let mut q = self.queue.lock().expect("outbox lock");
        // The newest decisions matter most (the oldest are the likeliest to
        // have expired by the time NATS is back).
        while q.len() >= self.limit {
            q.pop_front();
            self.metrics
                .dropped
                .with_label_values(&["queue_full"])
                .inc();
        }
        q.push_back(decision);
        self.metrics.queue_depth.set(q.len() as i64);
        drop(q);
        self.ready.notify_one();
    }

    fn take(&self, max: usize) -> Vec<Decision> {
        let mut q = self.queue.lock().expect("outbox lock");
        let n = q.len().min(max);
        q.drain(..n).collect()
    }

    /// Puts a batch that failed back in front, in order, within the limit.
    fn put_back(&self, batch: Vec<Decision>) {
        let mut q = self.queue.lock().expect("outbox lock");
        for d in batch.into_iter().rev() {
            if q.len() >= self.limit {
                self.metrics
                    .dropped
                    .with_label_values(&["queue_full"])
                    .inc();
                continue;
            }
            q.push_front(d);
        }
        self.metrics.queue_depth.set(q.len() as i64);
    }

    fn len(&self) -> usize {
        self.queue.lock().expect("outbox lock").len()
    }
}

async fn connect(s: &FleetSettings, metrics: Arc<FleetMetrics>) -> Result<async_nats::Client> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("guard-{}", s.host))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(3))
        .ping_interval(Duration::from_secs(10))
        .reconnect_delay_callback(|attempt| {
            Duration::from_millis((100u64 << attempt.min(5)).min(2000))
        })
        .event_callback(move |event| {
            let metrics = metrics.clone();
            async move {
                let label = match &event {
                    async_nats::Event::Connected => {
                        metrics.connected.set(1);
                        info!("fleet: connected to NATS");
                        "connected"
                    }
                    async_nats::Event::Disconnected => {
                        metrics.connected.set(0);
                        warn!("fleet: disconnected from NATS; local protection goes on, decisions queue");
                        "disconnected"
                    }
                    async_nats::Event::LameDuckMode => "lame_duck",
                    async_nats::Event::SlowConsumer(_) => "slow_consumer",
                    async_nats::Event::ServerError(e) => {
                        warn!("fleet: NATS server error: {e}");
                        "server_error"
                    }
                    async_nats::Event::ClientError(e) => {
                        warn!("fleet: NATS client error: {e}");
                        "client_error"
                    }
                    async_nats::Event::Draining => "draining",
                    async_nats::Event::Closed => {
                        metrics.connected.set(0);
                        "closed"
                    }
                };
                metrics.connection_events.with_label_values(&[label]).inc();
            }
        });
    opts = match &s.auth {
        Auth::None => opts,
        Auth::UserPassword { user, password } => {
            opts.user_and_password(user.clone(), password.clone())
        }
        Auth::Token(t) => opts.token(t.clone()),
        Auth::CredsFile(path) => opts
            .credentials_file(path)
            .await
            .with_context(|| format!("fleet: read the creds file {}", path.display()))?,
    };
    if let Some(ca) = &s.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &s.tls_client {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if s.tls_required {
        opts = opts.require_tls(true);
    }
    let addrs: Vec<async_nats::ServerAddr> = s
        .urls
        .iter()
        .map(|u| u.parse().expect("validated in FleetSettings::resolve"))
        .collect();
    opts.connect(addrs).await.context("fleet: connect to NATS")
}

fn stream_config(s: &FleetSettings, max_ttl: Duration) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: s.stream.clone(),
        subjects: vec![s.all_subjects()],
        storage: jetstream::stream::StorageType::File,
        num_replicas: s.replicas,
        // Each batch ends itself with its TTL; max_age is the backstop.
        allow_message_ttl: true,
        max_age: max_ttl + Duration::from_secs(3600),
        duplicate_window: Duration::from_secs(120),
        description: Some("guard: block decisions shared by the fleet".into()),
        ..Default::default()
    }
}

async fn ensure_stream(
    js: &jetstream::Context,
    s: &FleetSettings,
    max_ttl: Duration,
) -> Result<jetstream::stream::Stream> {
    js.get_or_create_stream(stream_config(s, max_ttl))
        .await
        .map_err(|e| anyhow::anyhow!("fleet: get or create stream {}: {e}", s.stream))
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

/// How long one pull of the follower waits for messages (see `follow_loop`).
const FOLLOW_PULL_EXPIRY: Duration = Duration::from_secs(3);

/// Retry delay: short, because the usual failure is a stream leader election (seconds) and
/// every retry is one small request; a decision should not wait for a long sleep after it.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(4)).min(500))
}

async fn publish_loop(
    js: jetstream::Context,
    s: Arc<FleetSettings>,
    max_ttl: Duration,
    outbox: Arc<Outbox>,
    metrics: Arc<FleetMetrics>,
) {
    let subject = s.own_subject();
    // Message ids unique to this run: a retried batch keeps its id, so the
    // stream's duplicate window stores it once.
    let run_id = format!("{}-{:x}", s.host, unix_now_ms());
    let mut batch_no: u64 = 0;
    let mut failures: u32 = 0;
    loop {
        let batch = outbox.take(MAX_BATCH);
        if batch.is_empty() {
            outbox.ready.notified().await;
            continue;
        }
        let n = batch.len();
        let msg = Batch {
            v: WIRE_VERSION,
            host: s.host.clone(),
            decisions: batch,
        };
        let payload = serde_json::to_vec(&msg).expect("a batch serialises");
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(format!("{run_id}-{batch_no}"))
            .ttl(msg.ttl(unix_now_ms(), max_ttl));
        let outcome = async {
            let ack = js.send_publish(subject.clone(), publish).await?;
            ack.await?;
            Ok::<_, async_nats::Error>(())
        }
        .await;
        match outcome {
            Ok(()) => {
                batch_no += 1;
                failures = 0;
                metrics.published.inc_by(n as u64);
                metrics.queue_depth.set(outbox.len() as i64);
            }
            Err(e) => {
                metrics.publish_errors.inc();
                if failures == 0 {
                    warn!("fleet: publish {n} decision(s) failed ({e}); they wait and are retried");
                } else {
                    debug!("fleet: publish retry failed: {e}");
                }
                outbox.put_back(msg.decisions);
                // A stream that does not exist yet (first host of a fleet)
                // is made here as well as by the follower.
                if failures.is_multiple_of(8) {
                    let _ = ensure_stream(&js, &s, max_ttl).await;
                }
                tokio::time::sleep(backoff(failures)).await;
                failures = failures.saturating_add(1);
            }
        }
    }
}

async fn follow_loop(
    js: jetstream::Context,
    s: Arc<FleetSettings>,
    max_ttl: Duration,
    applier: Arc<dyn Applier>,
    metrics: Arc<FleetMetrics>,
) {
    let mut last_seq: u64 = 0;
    // Where the stream stood when the agent first subscribed: until it has
    // read that far, the agent is catching up, and its own decisions in
    // there are applied too (after a reboot the kernel lost them).
    let mut catch_up_until: Option<u64> = None;
    let mut failures: u32 = 0;
    let filter = s.all_subjects();
    loop {
        let stream = match ensure_stream(&js, &s, max_ttl).await {
            Ok(st) => st,
            Err(e) => {
                if failures == 0 {
                    warn!("{e:#}; retrying");
                }
                tokio::time::sleep(backoff(failures)).await;
                failures = failures.saturating_add(1);
                continue;
            }
        };
        if catch_up_until.is_none() {
            let state = &stream.cached_info().state;
            let tail = state.last_sequence;
            catch_up_until = Some(tail);
            // Nothing left to replay (an empty stream, or every message expired).
            if state.messages == 0 {
                metrics.caught_up.set(1);
            }
        }
        let deliver_policy = if last_seq == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: last_seq + 1,
            }
        };
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: filter.clone(),
                deliver_policy,
                // The client's idle heartbeat is half the pull expiry, capped at 15 s, and it
                // recreates the consumer after two missed ones: with the defaults a consumer
                // on a NATS node that died goes unnoticed for 30 s. Short pulls notice in ~3 s.
                max_expires: FOLLOW_PULL_EXPIRY,
                ..Default::default()
            })
            .await;
        let mut messages = match consumer {
            Ok(c) => match c.messages().await {
                Ok(m) => m,
                Err(e) => {
                    warn!("fleet: follow the stream: {e}; retrying");
                    tokio::time::sleep(backoff(failures)).await;
                    failures = failures.saturating_add(1);
                    continue;
                }
            },
            Err(e) => {
                if failures == 0 {
                    warn!("fleet: create a consumer on {}: {e}; retrying", s.stream);
                }
                tokio::time::sleep(backoff(failures)).await;
                failures = failures.saturating_add(1);
                continue;
            }
        };
        failures = 0;
        let mut watchdog = tokio::time::interval(STALL_CHECK);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        watchdog.tick().await;
        let mut check = StallCheck::default();
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                _ = watchdog.tick() => {
                    let stall = stalled(&stream, &filter, last_seq, &mut check).await;
                    // The stream's tail message may have expired before it was read.
                    if catch_up_until.is_some_and(|t| check.settled_at >= t) {
                        metrics.caught_up.set(1);
                    }
                    if stall {
                        warn!(
                            "fleet: the stream is past sequence {last_seq} but nothing arrives; \
                             following again from there"
                        );
                        metrics.follower_restarts.inc();
                        break;
                    }
                    continue;
                }
            };
            let Some(next) = next else { break };
            let msg = match next {
                Ok(m) => m,
                Err(e) => {
                    warn!("fleet: reading the stream failed ({e}); resuming after sequence {last_seq}");
                    metrics.follower_restarts.inc();
                    break;
                }
            };
            let Ok(info) = msg.info() else {
                metrics.dropped.with_label_values(&["malformed"]).inc();
                continue;
            };
            let seq = info.stream_sequence;
            if seq <= last_seq {
                continue;
            }
            last_seq = seq;
            metrics.stream_sequence.set(seq as i64);
            let catching_up = catch_up_until.is_some_and(|t| seq <= t);
            handle_batch(&s.host, &msg.payload, catching_up, &*applier, &metrics);
            if catch_up_until == Some(seq) {
                metrics.caught_up.set(1);
                info!("fleet: caught up with the stream (sequence {seq})");
            } else if catch_up_until.is_some_and(|t| seq > t) {
                metrics.caught_up.set(1);
            }
        }
    }
}

/// How often the follower compares the stream's last sequence with its own.
const STALL_CHECK: Duration = Duration::from_secs(2);

/// What the follower's watchdog remembers between two checks.
#[derive(Default)]
struct StallCheck {
    /// The follower's sequence when the last check found the stream ahead of it.
    behind_at: Option<u64>,
    /// The stream's last sequence when nothing after the follower was left in it (every
    /// message past it expired by its TTL): being "behind" that is not a stall.
    settled_at: u64,
}

/// Whether the follower has made no progress for a whole check while the stream holds
/// messages it has not read. The client library only notices a consumer that died with its
/// NATS node after missed heartbeats and retries, and a pull that times out can keep it
/// waiting for a minute; the stream says at once that something is owed. A failed request
/// (a stream leader election) proves nothing either way.
async fn stalled(
    stream: &jetstream::stream::Stream,
    filter: &str,
    last_seq: u64,
    check: &mut StallCheck,
) -> bool {
    let Ok(Ok(info)) = tokio::time::timeout(STALL_CHECK, stream.get_info()).await else {
        return false;
    };
    let tail = info.state.last_sequence;
    if tail <= last_seq || tail <= check.settled_at {
        check.behind_at = None;
        return false;
    }
    // Behind now: stalled only if it was already behind at the same place last time.
    if check.behind_at.replace(last_seq) != Some(last_seq) {
        return false;
    }
    let next = stream
        .raw_message_builder()
        .sequence(last_seq + 1)
        .next_by_subject(filter)
        .send();
    match tokio::time::timeout(STALL_CHECK, next).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
            check.settled_at = tail;
            check.behind_at = None;
            false
        }
        _ => false,
    }
}

/// Applies one message's decisions. Public for the unit tests.
pub fn handle_batch(
    own_host: &str,
    payload: &[u8],
    catching_up: bool,
    applier: &dyn Applier,
    metrics: &FleetMetrics,
) {
    let batch: Batch = match serde_json::from_slice(payload) {
        Ok(b) => b,
        Err(e) => {
            metrics.dropped.with_label_values(&["malformed"]).inc();
            debug!("fleet: a message that is not a decision batch: {e}");
            return;
        }
    };
    if batch.v != WIRE_VERSION {
        metrics
            .dropped
            .with_label_values(&["unknown_version"])
            .inc_by(batch.decisions.len().max(1) as u64);
        return;
    }
    // A host's own decisions echo back: they are in its kernel already.
    if batch.host == own_host && !catching_up {
        return;
    }
    for d in &batch.decisions {
        metrics.received.inc();
        match applier.apply_remote(&batch.host, d) {
            Applied::Changed => {
                let action = match d.action {
                    Action::Block => "block",
                    Action::Unblock => "unblock",
                };
                metrics.applied.with_label_values(&[action]).inc();
                if !catching_up {
                    let lag_ms = unix_now_ms().saturating_sub(d.decided_unix_ms);
                    metrics.lag.observe(lag_ms as f64 / 1000.0);
                }
            }
            Applied::Unchanged => {}
            Applied::Dropped(why) => metrics.dropped.with_label_values(&[why]).inc(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        fn apply_remote(&self, host: &str, d: &Decision) -> Applied {
            self.0.lock().unwrap().push((host.into(), d.clone()));
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
        handle_batch("a", &batch("a"), false, &rec, &metrics);
        assert!(rec.0.lock().unwrap().is_empty());
        handle_batch("a", &batch("a"), true, &rec, &metrics);
        handle_batch("a", &batch("b"), false, &rec, &metrics);
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
        handle_batch("a", b"{not json", false, &rec, &metrics);
        let future = br#"{"v":9,"host":"b","decisions":[]}"#;
        handle_batch("a", future, false, &rec, &metrics);
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
