//! `guard run`: load and attach the program, start the agent, then serve the
//! control socket and metrics, pump kernel events and logs, and handle signals.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use guard_common::{addr::Prefix, OverCapEvent};
use log::{error, info, warn};
use tokio::io::unix::AsyncFd;

use super::{config::apply_log_level, Agent};
use crate::{
    audit::AuditLog,
    control::{ControlServer, ControlServerConfig},
    datapath::{Datapath, GuardMaps},
    paths::PinLayout,
    settings::{RunArgs, Settings},
};

/// `guard run`.
pub async fn run(args: RunArgs) -> Result<()> {
    let settings = Settings::load(&args)?;
    apply_log_level(settings.log_level.as_deref());
    // A broken $NOTIFY_SOCKET must not keep protection from starting: under systemd a missing
    // READY=1 still shows up (the start times out), so a warning is enough here.
    let notifier = crate::notify::Notifier::from_env().unwrap_or_else(|e| {
        warn!("readiness notifications are off: {e}");
        crate::notify::Notifier::disabled()
    });
    let notify = |what: &str, sent: Result<(), crate::notify::NotifyError>| {
        if let Err(e) = sent {
            warn!("cannot tell the service manager {what}: {e}");
        }
    };
    let layout = PinLayout::new(&settings.pin_root);
    let mut dp = Datapath::load(&settings.map_sizes, Some(&layout))?;
    let fresh = dp.is_fresh();
    info!(
        "guard program loaded ({}) with pins under {}",
        if fresh {
            "new maps"
        } else {
            "adopting pinned maps: counters and blocks carry over"
        },
        layout.dir().display()
    );
    let logger = match aya_log::EbpfLogger::init(dp.ebpf_mut()) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!("kernel-side logging unavailable: {e}");
            None
        }
    };
    let events = dp.take_events().context("the events ring buffer")?;
    let mut attached = Vec::new();
    for iface in &settings.interfaces {
        let kind = dp.attach(iface, settings.attach)?;
        attached.push((iface.clone(), kind));
    }
    // The agent works on its own handles of the pinned maps; `dp` stays
    // alive for the run so its program objects outlive every attach.
    let maps = GuardMaps::open_pinned(&layout)?;
    let audit = AuditLog::open(settings.audit_log.as_deref())
        .with_context(|| format!("open the audit log {:?}", settings.audit_log))?;
    let cookie = match crate::datapath::netns_cookie() {
        Ok(c) => c,
        Err(e) => {
            warn!("cannot read this network namespace's cookie ({e}); connection tracking counts every namespace's sockets in its cgroup");
            0
        }
    };
    let cgroup = match (&settings.cgroup, &settings.host_cgroup_mount) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(host)) => match crate::pod_cgroup::pod_cgroup(host) {
            Ok(found) => {
                info!(
                    "connection tracking counts the pod's cgroup {} (this container: {})",
                    found.pod.display(),
                    found.container.display()
                );
                Some(found.pod)
            }
            Err(e) => {
                warn!("connection tracking is off (conn_limit, known-good): the pod's cgroup was not found: {e}");
                None
            }
        },
        (None, None) => {
            let root = crate::datapath::cgroup2_mount();
            if root.is_none() {
                warn!("no cgroup v2 mount found: connection tracking (conn_limit, known-good) is off; pass --cgroup");
            }
            root
        }
    };
    if let Some(path) = &cgroup {
        if let Err(e) = dp.attach_sockops(path) {
            let e = anyhow::Error::new(e);
            warn!("connection tracking is off ({e:#}): conn_limit and the known-good budget cannot work");
        }
    }
    let agent = Arc::new(Agent::new(
        maps,
        settings.clone(),
        audit,
        cookie,
        dp.cookies_supported(),
    ));
    agent.start_cookie_keys()?;
    agent.apply(&settings)?;
    agent.adopt_blocks()?;
    for (iface, kind) in &attached {
        agent
            .metrics
            .attach_info
            .with_label_values(&[iface, kind.metric_label()])
            .set(1);
    }

    let fleet = match settings.fleet.clone() {
        Some(fs) => {
            let metrics = Arc::new(crate::fleet::FleetMetrics::register(
                &agent.metrics.registry,
            ));
            let link = crate::fleet::Fleet::start(
                fs,
                settings.blocks.max_ttl,
                metrics,
                agent.clone() as Arc<dyn crate::fleet::Applier>,
            )
            .await?;
            let _ = agent.fleet.set(link.outbox.clone());
            Some(link)
        }
        None => None,
    };

    let control = ControlServer::bind(ControlServerConfig::from_settings(&settings))?;
    *agent.control_stats.lock().expect("stats lock") = Some(control.stats());

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let control_task = tokio::spawn(control.serve(agent.clone(), wait(shutdown_rx.clone())));
    let metrics_listener = tokio::net::TcpListener::bind(settings.metrics_addr)
        .await
        .with_context(|| {
            format!(
                "listen for metrics on {} (set --metrics-addr)",
                settings.metrics_addr
            )
        })?;
    let metrics_task = tokio::spawn(serve_metrics(
        metrics_routes(agent.clone()),
        metrics_listener,
        wait(shutdown_rx.clone()),
    ));
    let events_task = tokio::spawn(consume_events(
        agent.clone(),
        events,
        wait(shutdown_rx.clone()),
    ));
    let log_task = logger.map(|l| tokio::spawn(pump_kernel_log(l, wait(shutdown_rx.clone()))));

    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut sweeps: u64 = 0;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    info!(
        "guard running on {:?} protecting ports {:?}; metrics on http://{}/metrics, control socket {}",
        settings.interfaces,
        settings.ports,
        settings.metrics_addr,
        settings.control_socket.path.display()
    );
    // Only now: the program is attached, the control socket and metrics listen, so whatever
    // systemd starts after guard (the app) can report at once.
    let status = format!(
        "protecting ports {:?} on {}",
        settings.ports,
        attached
            .iter()
            .map(|(iface, kind)| format!("{iface} ({})", kind.metric_label()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    notify("it is ready", notifier.ready(&status));
    loop {
        tokio::select! {
            _ = sweep.tick() => {
                agent.sweep_expired();
                agent.adaptive_tick();
                agent.rotate_cookie_keys();
                sweeps += 1;
                if sweeps.is_multiple_of(60) {
                    agent.prune_connections();
                }
            }
            _ = hup.recv() => {
                notify("a reload starts", notifier.reloading());
                agent.reload(&args);
                notify("the reload ended", notifier.ready(&status));
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    notify("it stops", notifier.stopping());
    info!(
        "stopping: the program stays attached and pinned under {} (`guard unload` removes it)",
        layout.dir().display()
    );
    let _ = shutdown_tx.send(true);
    let _ = control_task.await;
    let _ = metrics_task.await;
    let _ = events_task.await;
    if let Some(t) = log_task {
        let _ = t.await;
    }
    if let Some(link) = fleet {
        link.shutdown(Duration::from_secs(3)).await;
    }
    drop(dp);
    Ok(())
}

fn metrics_routes(
    agent: Arc<Agent>,
) -> warp::filters::BoxedFilter<(warp::http::Response<String>,)> {
    use warp::Filter as _;
    let metrics = warp::path("metrics").and(warp::path::end()).map(move || {
        warp::http::Response::builder()
            .header(
                warp::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )
            .body(agent.render_metrics())
            .expect("static header")
    });
    let health = warp::path("healthz")
        .and(warp::path::end())
        .map(|| warp::http::Response::new(String::from("ok\n")));
    metrics.or(health).unify().boxed()
}

async fn serve_metrics(
    routes: warp::filters::BoxedFilter<(warp::http::Response<String>,)>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    warp::serve(routes)
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
}

async fn consume_events(
    agent: Arc<Agent>,
    ring: RingBuf<MapData>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    // SAFETY: the AsyncFd owns the ring buffer, so the fd it polls lives
    // exactly as long as the registration.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            error!("events: cannot poll the ring buffer: {}", e);
            return;
        }
    };
    tokio::pin!(shutdown);
    let mut logged = Instant::now() - Duration::from_secs(10);
    let mut since_log = 0u64;
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            guard = fd.readable_mut() => {
                let Ok(mut guard) = guard else { return };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if item.len() < std::mem::size_of::<OverCapEvent>() {
                        continue;
                    }
                    // SAFETY: the program writes whole OverCapEvent records.
                    let ev = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const OverCapEvent) };
                    drop(item);
                    since_log += 1;
                    if logged.elapsed() >= Duration::from_secs(5) {
                        let p = Prefix::new(ev.addr, ev.prefix_len as u32);
                        info!("{since_log} over-cap event(s) in the last {}s, latest: {p} ({} SYNs, {} over cap{})",
                            logged.elapsed().as_secs().min(99), ev.syns, ev.over_cap, if ev.dry_run != 0 { ", dry-run" } else { "" });
                        logged = Instant::now();
                        since_log = 0;
                    }
                    agent.on_event(&ev);
                }
                guard.clear_ready();
            }
        }
    }
}

async fn pump_kernel_log(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    // SAFETY: as for the events ring: the AsyncFd owns the logger's fd.
    let mut fd = match unsafe { AsyncFd::register(logger) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!("kernel log: {}", e);
            return;
        }
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            guard = fd.readable_mut() => {
                let Ok(mut guard) = guard else { return };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    }
}
