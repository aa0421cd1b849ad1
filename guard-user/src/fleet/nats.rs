//! The NATS connection (servers, auth, TLS, connection events) and the stream's config.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self};
use log::{info, warn};

use super::*;

pub(super) async fn connect(
    s: &FleetSettings,
    metrics: Arc<FleetMetrics>,
) -> Result<async_nats::Client> {
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

/// The stream as an agent creates it (also what a test recreates).
pub fn stream_config(s: &FleetSettings, max_ttl: Duration) -> jetstream::stream::Config {
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

/// The stream to follow and publish to. Missing, it is created again or waited for, as
/// `[fleet] missing_stream` says.
pub(super) async fn ensure_stream(
    js: &jetstream::Context,
    s: &FleetSettings,
    max_ttl: Duration,
) -> Result<jetstream::stream::Stream, StreamError> {
    match s.missing_stream {
        MissingStream::Recreate => js
            .get_or_create_stream(stream_config(s, max_ttl))
            .await
            .map_err(|e| StreamError::Other(format!("get or create stream {}: {e}", s.stream))),
        MissingStream::Wait => js.get_stream(&s.stream).await.map_err(|e| match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                StreamError::Missing
            }
            _ => StreamError::Other(format!("get stream {}: {e}", s.stream)),
        }),
    }
}

/// Why the stream could not be had.
#[derive(Debug, thiserror::Error)]
pub(super) enum StreamError {
    #[error(
        "the stream is missing; waiting for it to be created ([fleet] missing_stream = \"wait\")"
    )]
    Missing,
    #[error("fleet: {0}")]
    Other(String),
}

/// Whether a request about the stream failed because the stream does not exist.
pub(super) fn is_stream_not_found(e: &jetstream::stream::InfoError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|j| j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}
