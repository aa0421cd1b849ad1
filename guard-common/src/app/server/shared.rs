//! The state one [`Guard`] shares between all its servers: the waiting
//! budget, the offenders, the descriptor count.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus::Registry;
use tokio::sync::Notify;

use super::conn::Conn;
use super::fd;
use super::metrics::{ServerClose, ServerMetrics};
use super::offenders::Offenders;
use super::waiting::{Caps, Eviction, Phase, Waiting};
use super::ServerLimits;
use crate::addr::Prefix;
use crate::app::{Guard, GuardError};
use crate::state::reason;

/// At most one warning per this long for descriptor exhaustion.
pub(super) const WARN_EVERY: Duration = Duration::from_secs(10);

/// The server state one [`Guard`] shares between all its servers: the
/// waiting budget is one budget however many listeners feed it.
pub(crate) struct ServerShared {
    pub(super) limits: ServerLimits,
    pub(super) metrics: ServerMetrics,
    pub(super) waiting: Mutex<Waiting<Arc<Conn>>>,
    pub(super) offenders: Mutex<Offenders>,
    /// Connection descriptors open now (sockets accepted and not dropped,
    /// upgraded ones included).
    pub(super) live: AtomicU64,
    /// Other descriptors of the process, as of the sweeper's last count.
    pub(super) baseline: AtomicU64,
    pub(super) soft_limit: AtomicU64,
    /// A connection's descriptor was closed.
    pub(super) freed: Notify,
    pub(super) last_fd_warning_ns: AtomicU64,
}

impl ServerShared {
    pub fn new(
        limits: ServerLimits,
        source_prefix_v4: u8,
        source_prefix_v6: u8,
        registry: Option<&Registry>,
    ) -> Result<Self, GuardError> {
        limits.validate_with(source_prefix_v4, source_prefix_v6)?;
        let caps = Caps {
            global: limits.max_waiting,
            per_source: limits.max_waiting_per_source,
            per_network: limits.max_waiting_per_network,
            source_v4: source_prefix_v4,
            source_v6: source_prefix_v6,
            network_v4: limits.network_prefix_v4,
            network_v6: limits.network_prefix_v6,
        };
        let offenders = Offenders::new(
            limits.offender_threshold,
            crate::app::admission::duration_ns(limits.offender_window),
            limits.max_tracked_offenders,
        );
        Ok(Self {
            metrics: ServerMetrics::new(registry)?,
            waiting: Mutex::new(Waiting::new(caps)),
            offenders: Mutex::new(offenders),
            live: AtomicU64::new(0),
            baseline: AtomicU64::new(0),
            soft_limit: AtomicU64::new(u64::MAX),
            freed: Notify::new(),
            last_fd_warning_ns: AtomicU64::new(0),
            limits,
        })
    }

    pub fn limits(&self) -> &ServerLimits {
        &self.limits
    }

    pub(super) fn lock_waiting(&self) -> MutexGuard<'_, Waiting<Arc<Conn>>> {
        // Every update leaves the table consistent and nothing panics under
        // the lock, so a poisoned lock is still good.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn deadline(&self, phase: Phase) -> Duration {
        match phase {
            Phase::Head => self.limits.head_timeout,
            Phase::Idle => self.limits.keep_alive_idle,
        }
    }

    /// Puts `conn` in the budget (unless it is busy, done or closing),
    /// closing whoever must go to make room.
    pub(super) fn enter(&self, guard: &Guard, conn: &Arc<Conn>, phase: Phase) {
        let deadline = guard.now_ns() + crate::app::admission::duration_ns(self.deadline(phase));
        let mut evicted = Vec::new();
        {
            let mut table = self.lock_waiting();
            if conn.in_flight.load(Ordering::Relaxed) > 0
                || conn.done.load(Ordering::Relaxed)
                || conn.closing.load(Ordering::Relaxed) != 0
            {
                return;
            }
            conn.bytes_at_wait
                .store(conn.bytes_read.load(Ordering::Relaxed), Ordering::Relaxed);
            let seq = table.enter(
                conn.remote.ip(),
                phase,
                deadline,
                conn.clone(),
                &mut evicted,
            );
            conn.seq.store(seq, Ordering::Relaxed);
            self.metrics.waiting.set(table.len() as i64);
        }
        for (victim, why) in evicted {
            let reason = match why {
                Eviction::Prefix => ServerClose::BudgetPrefix,
                Eviction::Global => ServerClose::BudgetGlobal,
            };
            self.close_by_server(guard, &victim, reason);
        }
    }

    /// `conn` has a request in flight: it no longer waits.
    pub(super) fn begin_request(&self, conn: &Conn) {
        let mut table = self.lock_waiting();
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        let seq = conn.seq.swap(0, Ordering::Relaxed);
        if seq != 0 {
            table.leave(seq);
            self.metrics.waiting.set(table.len() as i64);
        }
    }

    /// A response of `conn` is done (sent, or abandoned); with none left in
    /// flight it waits again, under the idle deadline.
    pub(super) fn end_request(&self, guard: &Guard, conn: &Arc<Conn>) {
        let idle = {
            let _table = self.lock_waiting();
            conn.in_flight.fetch_sub(1, Ordering::Relaxed) == 1
        };
        if idle {
            self.enter(guard, conn, Phase::Idle);
        }
    }

    /// `conn` ended; it leaves the budget if it was in it.
    pub(super) fn leave(&self, conn: &Conn) {
        let seq = conn.seq.swap(0, Ordering::Relaxed);
        if seq != 0 {
            let mut table = self.lock_waiting();
            table.leave(seq);
            self.metrics.waiting.set(table.len() as i64);
        }
    }

    /// Closes waiting connections past their deadline.
    pub(super) fn sweep(&self, guard: &Guard) {
        let mut expired = Vec::new();
        {
            let mut table = self.lock_waiting();
            table.expire(guard.now_ns(), &mut expired);
            self.metrics.waiting.set(table.len() as i64);
        }
        for (conn, phase) in expired {
            let reason = match phase {
                Phase::Head => ServerClose::HeadDeadline,
                Phase::Idle => ServerClose::IdleDeadline,
            };
            self.close_by_server(guard, &conn, reason);
        }
    }

    /// Closes the `n` longest-waiting connections to free descriptors;
    /// how many there were.
    pub(super) fn shed(&self, guard: &Guard, n: usize) -> usize {
        let mut shed = Vec::new();
        {
            let mut table = self.lock_waiting();
            table.shed_oldest(n, &mut shed);
            self.metrics.waiting.set(table.len() as i64);
        }
        for conn in &shed {
            self.close_by_server(guard, conn, ServerClose::FdShed);
        }
        shed.len()
    }

    pub(super) fn close_by_server(&self, guard: &Guard, conn: &Conn, reason: ServerClose) {
        if !conn.close(reason) {
            return;
        }
        self.metrics.closed(reason).inc();
        log::debug!("closed {} ({})", conn.remote, reason.label());
        if conn.sent_partial_head() {
            self.strike(guard, conn.remote.ip(), reason);
        }
    }

    pub(super) fn strike(&self, guard: &Guard, ip: IpAddr, reason: ServerClose) {
        let limits = guard.limits();
        let source = Prefix::of(
            ip.to_canonical(),
            limits.source_prefix_v4,
            limits.source_prefix_v6,
        );
        let offender = self
            .offenders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .strike(source, guard.now_ns());
        if offender {
            let detail = format!(
                "{} connections closed with a partial request head within {:?} (last: {})",
                self.limits.offender_threshold,
                self.limits.offender_window,
                reason.label()
            );
            guard.report_source(ip, reason::SLOW_CONNECTIONS, detail);
        }
    }

    /// Descriptors left before the soft limit, by the server's own count.
    pub(super) fn headroom(&self) -> i64 {
        let soft = self.soft_limit.load(Ordering::Relaxed);
        let open = self
            .baseline
            .load(Ordering::Relaxed)
            .saturating_add(self.live.load(Ordering::Relaxed));
        let headroom = i128::from(soft) - i128::from(open);
        i64::try_from(headroom).unwrap_or(if headroom < 0 { i64::MIN } else { i64::MAX })
    }

    /// Recounts the process's descriptors and re-reads the limit.
    pub(super) fn recount_fds(&self) {
        self.soft_limit.store(fd::soft_limit(), Ordering::Relaxed);
        if let Some(open) = fd::count_open() {
            let live = self.live.load(Ordering::Relaxed);
            self.baseline
                .store(open.saturating_sub(live), Ordering::Relaxed);
        }
        self.metrics.fd_headroom.set(self.headroom());
    }

    pub(super) fn warn_fds(&self, guard: &Guard, what: &str) {
        let now = guard.now_ns();
        let last = self.last_fd_warning_ns.load(Ordering::Relaxed);
        let every = crate::app::admission::duration_ns(WARN_EVERY);
        if (last == 0 || now.saturating_sub(last) >= every)
            && self
                .last_fd_warning_ns
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!(
                "{what}: shedding waiting connections (soft limit {}, see guard_app_server_fd_headroom)",
                self.soft_limit.load(Ordering::Relaxed)
            );
        }
    }
}
