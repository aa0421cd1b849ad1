//! The datapath test harness: the real program loaded into this kernel
//! (unpinned, so tests share no kernel state), driven with crafted frames
//! through `BPF_PROG_TEST_RUN`, its counters and events read back. Used by
//! the packet-by-packet tests and the evasion corpus. Needs root.

use std::net::IpAddr;

use aya::maps::{MapData, RingBuf};
use guard_common::{
    addr::Prefix,
    stats::{Stat, STAT_SLOTS},
    syncookie::{CookieKey, KEY_SLOTS, MODE_ALWAYS},
    BlockEntry, LiveConfig, OverCapEvent,
};
use guard_user::{
    datapath::{Datapath, MapSizes},
    paths::AttachKind,
    testrun::{test_run, test_run_frame, TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_TX},
};

use crate::frames::Frame;

/// The port every harness program protects.
pub const PORT: u16 = 8080;

/// One unpinned copy of the real program, driven through
/// `BPF_PROG_TEST_RUN`.
pub struct Dp {
    pub dp: Datapath,
    events: RingBuf<MapData>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V {
    Pass,
    Drop,
}

impl Dp {
    /// A fresh program protecting port 8080 with a cap that no test
    /// reaches unless it sets one.
    pub fn new() -> Self {
        assert!(
            crate::is_root(),
            "the datapath tests load BPF programs: run them as root (`cargo xtask test`)"
        );
        let sizes = MapSizes {
            sources: 4096,
            aggregates: 1024,
            allow: 64,
            block: 1024,
        };
        let mut dp = Datapath::load(&sizes, None).expect("load the guard program");
        dp.maps_mut().set_ports(&[PORT]).expect("set ports");
        let events = dp.take_events().expect("events ring");
        let mut me = Self { dp, events };
        me.config(|c| {
            c.syn_rate = 0;
            c.syn_burst = 1_000_000;
        });
        me
    }

    pub fn config(&mut self, f: impl FnOnce(&mut LiveConfig)) {
        let mut cfg = self.dp.maps().config().expect("read config");
        f(&mut cfg);
        self.dp.maps_mut().set_config(&cfg).expect("write config");
    }

    pub fn run(&self, frame: &[u8]) -> V {
        let xdp = test_run(self.dp.program(AttachKind::XdpNative), frame, 1)
            .expect("test-run the XDP program");
        match xdp.retval {
            XDP_PASS => V::Pass,
            XDP_DROP => V::Drop,
            other => panic!("unexpected XDP action {other}"),
        }
    }

    pub fn run_tc(&self, frame: &[u8]) -> V {
        let tc = test_run(self.dp.program(AttachKind::Tc), frame, 1)
            .unwrap_or_else(|e| panic!("test-run the tc program on {} bytes: {e}", frame.len()));
        match tc.retval {
            TC_ACT_OK => V::Pass,
            TC_ACT_SHOT => V::Drop,
            other => panic!("unexpected tc action {other}"),
        }
    }

    pub fn try_run_tc(&self, frame: &[u8]) -> Option<V> {
        let tc = test_run(self.dp.program(AttachKind::Tc), frame, 1).ok()?;
        Some(if tc.retval == TC_ACT_SHOT {
            V::Drop
        } else {
            V::Pass
        })
    }

    pub fn stats(&self) -> [u64; STAT_SLOTS as usize] {
        self.dp.maps().stat_totals().expect("read stats")
    }

    /// Runs `frame` and returns the verdict and the single verdict counter
    /// that moved.
    pub fn verdict(&self, frame: &[u8]) -> (V, Stat) {
        self.counting(|| self.run(frame))
    }

    /// As [`Dp::verdict`], with what the XDP program did, TX frames included.
    pub fn xdp_verdict(&self, frame: &[u8]) -> (XdpOutcome, Stat) {
        self.counting(|| self.run_xdp(frame))
    }

    /// Runs one packet through `run`; its result and the single verdict
    /// counter that moved.
    fn counting<T>(&self, run: impl FnOnce() -> T) -> (T, Stat) {
        let before = self.stats();
        let outcome = run();
        let after = self.stats();
        let moved: Vec<Stat> = Stat::ALL
            .into_iter()
            .filter(|s| s.labels().is_some())
            .filter(|s| after[s.index() as usize] != before[s.index() as usize])
            .collect();
        assert_eq!(
            moved.len(),
            1,
            "exactly one verdict counter per packet, got {moved:?}"
        );
        assert_eq!(
            after[Stat::Packets.index() as usize],
            before[Stat::Packets.index() as usize] + 1
        );
        (outcome, moved[0])
    }

    pub fn block(&mut self, prefix: &str, expires_ns: u64) {
        let p: Prefix = prefix.parse().expect("prefix");
        self.dp
            .maps_mut()
            .insert_block(
                &p,
                &BlockEntry {
                    expires_ns,
                    reason: guard_common::state::reason::OPERATOR,
                    _pad: 0,
                },
            )
            .expect("insert block");
    }

    pub fn allow(&mut self, prefix: &str) {
        let p: Prefix = prefix.parse().expect("prefix");
        self.dp.maps_mut().insert_allow(&p).expect("insert allow");
    }

    pub fn events(&mut self) -> Vec<OverCapEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            assert_eq!(item.len(), std::mem::size_of::<OverCapEvent>());
            // SAFETY: the program writes whole OverCapEvent records.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const OverCapEvent) });
        }
        out
    }

    pub fn syns(&self, src: IpAddr, n: usize) -> (usize, usize) {
        let frame = Frame::syn(src, PORT).bytes();
        let mut pass = 0;
        let mut drop = 0;
        for _ in 0..n {
            match self.run(&frame) {
                V::Pass => pass += 1,
                V::Drop => drop += 1,
            }
        }
        (pass, drop)
    }
}

/// The cookie key [`Dp::with_cookies`] puts in `slot`.
pub fn cookie_key(slot: u32) -> CookieKey {
    CookieKey {
        k0: 0x0123_4567_89ab_cdef ^ u64::from(slot),
        k1: 0xfedc_ba98_7654_3210 ^ (u64::from(slot) << 32),
    }
}

impl Dp {
    /// A program answering every unproven SYN with a cookie: a key in every slot, a
    /// full-sized MSS for each family, window scale 7.
    pub fn with_cookies() -> Self {
        let mut dp = Self::new();
        for slot in 0..KEY_SLOTS {
            dp.dp
                .maps_mut()
                .set_cookie_key(slot, &cookie_key(slot))
                .expect("set a cookie key");
        }
        dp.config(|c| {
            c.syn_cookies = MODE_ALWAYS;
            c.cookie_mss_v4 = 1460;
            c.cookie_mss_v6 = 1440;
            c.cookie_wscale = 7;
        });
        dp
    }
}

impl Default for Dp {
    fn default() -> Self {
        Self::new()
    }
}

/// What the XDP program did with a frame, with the frame it left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XdpOutcome {
    Pass,
    Drop,
    /// Sent back out (a cookie SYN-ACK), with its bytes.
    Tx(Vec<u8>),
}

impl Dp {
    /// Runs the XDP program and returns what it did, TX frames included.
    pub fn run_xdp(&self, frame: &[u8]) -> XdpOutcome {
        let (run, out) = test_run_frame(self.dp.program(AttachKind::XdpNative), frame, 1)
            .expect("test-run the XDP program");
        match run.retval {
            XDP_PASS => XdpOutcome::Pass,
            XDP_DROP => XdpOutcome::Drop,
            XDP_TX => XdpOutcome::Tx(out),
            other => panic!("unexpected XDP action {other}"),
        }
    }

    /// Runs the tc program: its action and the frame it left.
    pub fn run_tc_frame(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let (run, out) = test_run_frame(self.dp.program(AttachKind::Tc), frame, 1)
            .expect("test-run the tc program");
        (run.retval, out)
    }

    /// As [`Dp::run_tc_frame`], `None` when the kernel refuses to test-run the frame (it
    /// builds an skb only from frames whose IP header is there).
    pub fn try_run_tc_frame(&self, frame: &[u8]) -> Option<(u32, Vec<u8>)> {
        let (run, out) = test_run_frame(self.dp.program(AttachKind::Tc), frame, 1).ok()?;
        Some((run.retval, out))
    }

    /// Runs the XDP attach's cookie-reply companion: its tc action.
    pub fn run_cookie_ack(&self, frame: &[u8]) -> u32 {
        self.try_run_cookie_ack(frame)
            .expect("test-run the cookie-reply program")
    }

    /// As [`Dp::run_cookie_ack`], `None` when the kernel refuses to test-run the frame.
    pub fn try_run_cookie_ack(&self, frame: &[u8]) -> Option<u32> {
        test_run(self.dp.cookie_ack_program(), frame, 1)
            .ok()
            .map(|r| r.retval)
    }

    pub fn stat(&self, stat: Stat) -> u64 {
        self.stats()[stat.index() as usize]
    }
}
