//! Stateless SYN cookies: what the datapath answers a SYN with while it
//! must not keep state for it, and how it recognises the handshake's
//! completing ACK.
//!
//! The server's initial sequence number *is* the cookie. Its low byte holds
//! what the client's SYN negotiated and the key epoch's parity; the upper 24
//! bits are a keyed MAC (SipHash-1-3) over the flow, the client's ISN, the
//! epoch and that low byte, so none of it can be changed without the MAC
//! failing:
//!
//! ```text
//!  31                        8   7     6 5   4     3      0
//! | MAC (24 bits)             | epoch | mss | sack | wscale |
//! ```
//!
//! * `mss`: an index into a per-family table ([`MSS_V4`], [`MSS_V6`]): the
//!   largest entry not above what the client asked for.
//! * `wscale`: the client's window-scale shift 0..=14, or [`WSCALE_NONE`]
//!   when it offered none. Keeping it (and SACK) in the ISN rather than in
//!   the timestamp option means clients without timestamps keep window
//!   scaling and SACK too.
//! * `epoch`: keys change every [`EPOCH_NS`] (~69 s); a cookie is accepted in
//!   its own epoch and the next, so it lives 69 to 137 s. The MAC covers the
//!   whole epoch number, so a stale cookie whose parity matches again is
//!   still refused.
//!
//! Why SipHash-1-3 and not the kernel's 2-4: the MAC is computed for every
//! spoofed SYN of a flood, in BPF, where a round costs ~25 instructions;
//! 1-3 over the four words of an IPv4 flow is 7 rounds instead of 16. It is
//! a keyed PRF (Rust's default hasher uses it against hash flooding), the
//! key is 128 random bits replaced every epoch, and an attacker only ever
//! sees 24 bits of it per flow: guessing stays the best attack (one in 16M
//! per try, against a cookie that expires within two minutes).
//!
//! IPv4 flows are hashed as four words, IPv6 flows as six: the message
//! length (which SipHash mixes in) keeps the two apart, and within a family
//! the encoding is one-to-one, so no two flows ever share a MAC input.
//!
//! # Why a 24-bit MAC is enough: guesses are rate-limited
//!
//! A blind attacker forges a connection by sending the ACK of a SYN-ACK it
//! never saw: it picks the flow, its ISN and the low byte, and must guess
//! the 24 MAC bits, one chance in 2^24 per ACK. An even chance takes
//! ln 2 · 2^24 ≈ 11.6 M guesses. Unlimited, that is nothing: a 10 GbE link
//! carries 14.88 M minimum-size frames a second, so 0.8 s. The format is
//! kept (the low byte has no bit to spare, and the kernel's own cookies are
//! no wider); instead the datapath refuses to check more guesses than the
//! `invalid_ack_*` limits allow, and a refused guess is dropped unchecked,
//! a correct one included, so the line rate no longer matters:
//!
//! * **One chosen address**: 8 failures, then 1 a second. 11.6 M s, about
//!   134 days of uninterrupted guessing for an even chance.
//! * **Some address of one chosen /24 (or /48)**: 64, then 16 a second:
//!   about 8.4 days.
//! * **Some address of a chosen set of prefixes** that fits the tables
//!   (`ACK_FAILS_AGG`, 65 536 prefixes with the default `[maps]` sizes): once each has failed, all of them
//!   together get 200 a second (the global budget): about 16 hours.
//! * **Pushing a chosen address out of the tables** to reset its budget
//!   (LRU: 262 144 sources, 65 536 prefixes) takes that many failures from
//!   other sources and prefixes, which spend the global budget; while it is
//!   dry every address or prefix that failed before is refused, so the
//!   target gets one guess per eviction round: at 10 GbE line rate, one
//!   per 262 144 frames, 57 a second, about 2.4 days of uninterrupted line
//!   rate for an even chance (6 hours at 100 GbE).
//!
//! What the limits do not bound, on purpose: guesses from sources and
//! prefixes that never failed before are always checked, so spraying them
//! across more prefixes than the tables hold still forges a connection
//! from *some* address in about a second at line rate, one the attacker
//! did not choose. Refusing those too would let 200 forged ACKs a second
//! shut out every new client while cookies are on, which is worse than a
//! connection from a stranger's address; a report about such a connection
//! can block that stranger only within the reporters' quota and the TTL
//! clamp.
//!
//! Everything here is pure and shared: the program calls these functions,
//! and host tests check them against references.

use crate::addr::AddrWords;

/// `syn_cookies` modes (the `LiveConfig` field).
pub const MODE_OFF: u8 = 0;
/// Cookies only while the global budget is exhausted.
pub const MODE_UNDER_ATTACK: u8 = 1;
/// Every SYN from a source that is not known good.
pub const MODE_ALWAYS: u8 = 2;

pub const MODE_NAMES: [&str; 3] = ["off", "under-attack", "always"];

/// Key slots in the `COOKIE_KEYS` map: epoch `e` uses slot `e % 4`. Two
/// epochs are live at a time (the current and the one before), so the agent
/// can always write the next epoch's key into a slot nobody reads.
pub const KEY_SLOTS: u32 = 4;
const EPOCH_SHIFT: u32 = 36;
/// One key epoch: 2^36 ns, about 68.7 s.
pub const EPOCH_NS: u64 = 1 << EPOCH_SHIFT;

/// Window-scale field value meaning "the client offered no window scaling".
pub const WSCALE_NONE: u8 = 15;
/// The largest shift RFC 7323 allows.
pub const MAX_WSCALE: u8 = 14;

/// MSS values a cookie can remember, smallest first. The smallest is the
/// least the kernel accepts for a cookie connection (and what a SYN without
/// an MSS option gets, as RFC 9293 says).
pub const MSS_V4: [u16; 4] = [536, 1300, 1440, 1460];
pub const MSS_V6: [u16; 4] = [1220, 1420, 1440, 8940];

/// Which of the host's TCP features the SYN-ACK may offer (`cookie_opts`),
/// as the server's own sysctls allow them: the kernel refuses to build a
/// cookie connection with a feature its namespace has turned off.
pub const OPT_SACK: u8 = 1 << 0;
pub const OPT_TIMESTAMPS: u8 = 1 << 1;
pub const OPT_WSCALE: u8 = 1 << 2;
pub const OPT_ALL: u8 = OPT_SACK | OPT_TIMESTAMPS | OPT_WSCALE;

/// The immediate of the program's call to `bpf_sk_assign_tcp_reqsk`, which
/// the agent replaces with that kfunc's BTF id in the running kernel before
/// loading (the loader cannot relocate kfunc calls). It appears exactly
/// once per program that checks cookie replies.
pub const KFUNC_ASSIGN_REQSK_PLACEHOLDER: u32 = 0x6b66_7563;
/// The whole placeholder instruction as it lies in the object: `call`
/// (0x85), `src_reg` 2 (a kfunc), then the immediate, little endian.
pub const KFUNC_ASSIGN_REQSK_INSN: [u8; 8] = [0x85, 0x20, 0, 0, 0x63, 0x75, 0x66, 0x6b];

/// The window the SYN-ACK advertises (unscaled, as in every SYN-ACK). Below
/// what the kernel gives a new connection, so the client never sends more
/// than the socket it gets will take.
pub const SYNACK_WINDOW: u16 = 64240;

/// A key for one epoch. All zero means "not provisioned": the program then
/// answers no SYN with a cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CookieKey {
    pub k0: u64,
    pub k1: u64,
}

const _: () = assert!(core::mem::size_of::<CookieKey>() == 16);
const _: () = assert!(core::mem::size_of::<CookieState>() == 8);

impl CookieKey {
    #[inline(always)]
    pub const fn is_set(&self) -> bool {
        self.k0 | self.k1 != 0
    }
}

/// Shared cookie state (one entry of `COOKIE_STATE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CookieState {
    /// The last epoch in which any SYN was answered with a cookie. The ACK
    /// check runs only while this is the current epoch or the one before,
    /// so ACKs cost nothing extra while no cookie can be outstanding.
    pub last_sent_epoch: u64,
}

#[inline(always)]
pub const fn epoch_of(now_ns: u64) -> u64 {
    now_ns >> EPOCH_SHIFT
}

#[inline(always)]
pub const fn key_slot(epoch: u64) -> u32 {
    (epoch % KEY_SLOTS as u64) as u32
}

/// Whether a cookie sent in `sent_epoch` may still come back at `now_epoch`.
#[inline(always)]
pub const fn may_be_outstanding(sent_epoch: u64, now_epoch: u64) -> bool {
    sent_epoch == now_epoch || sent_epoch + 1 == now_epoch
}

/// The connection a cookie is bound to, seen from the client: its address
/// and port, the server's address and port (ports in host order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub client: AddrWords,
    pub server: AddrWords,
    pub client_port: u16,
    pub server_port: u16,
}

/// What the client's SYN negotiated, as far as a cookie remembers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub mss_index: u8,
    pub sack: bool,
    /// The client's shift, or [`WSCALE_NONE`].
    pub wscale: u8,
}

impl Negotiated {
    /// From the SYN's options: `mss` 0 when absent, `wscale` `None` when
    /// absent; `allowed` is `cookie_opts`.
    #[inline(always)]
    pub fn from_syn(v6: bool, mss: u16, sack: bool, wscale: Option<u8>, allowed: u8) -> Self {
        let table = if v6 { &MSS_V6 } else { &MSS_V4 };
        let mut mss_index = 0;
        if mss >= table[1] {
            mss_index = 1;
        }
        if mss >= table[2] {
            mss_index = 2;
        }
        if mss >= table[3] {
            mss_index = 3;
        }
        let wscale = match wscale {
            Some(shift) if allowed & OPT_WSCALE != 0 => {
                // RFC 7323 §2.3: a larger shift is used as 14.
                if shift > MAX_WSCALE {
                    MAX_WSCALE
                } else {
                    shift
                }
            }
            _ => WSCALE_NONE,
        };
        Self {
            mss_index,
            sack: sack && allowed & OPT_SACK != 0,
            wscale,
        }
    }

    #[inline(always)]
    pub const fn mss(&self, v6: bool) -> u16 {
        let table = if v6 { &MSS_V6 } else { &MSS_V4 };
        table[(self.mss_index & 3) as usize]
    }

    #[inline(always)]
    pub const fn wscale_ok(&self) -> bool {
        self.wscale != WSCALE_NONE
    }

    #[inline(always)]
    const fn low_byte(&self, epoch: u64) -> u32 {
        (((epoch & 1) as u32) << 7)
            | (((self.mss_index & 3) as u32) << 5)
            | ((self.sack as u32) << 4)
            | (self.wscale & 0x0f) as u32
    }

    #[inline(always)]
    const fn from_low_byte(low: u32) -> Self {
        Self {
            mss_index: ((low >> 5) & 3) as u8,
            sack: (low >> 4) & 1 != 0,
            wscale: (low & 0x0f) as u8,
        }
    }
}

/// The cookie (the server's ISN) for a SYN of `flow` with sequence number
/// `client_isn`, made with the key of `epoch`.
#[inline(always)]
pub fn make(key: &CookieKey, flow: &Flow, client_isn: u32, epoch: u64, n: &Negotiated) -> u32 {
    let low = n.low_byte(epoch);
    (mac24(key, flow, client_isn, epoch, low) << 8) | low
}

/// The epoch a cookie returning at `now_epoch` was made in (its parity bit
/// picks the current epoch or the one before).
#[inline(always)]
pub const fn epoch_for(cookie: u32, now_epoch: u64) -> u64 {
    if ((cookie >> 7) & 1) as u64 == now_epoch & 1 {
        now_epoch
    } else {
        now_epoch.wrapping_sub(1)
    }
}

/// What a cookie says if it is genuine: `cookie` is the ACK's acknowledgment
/// number minus one, `client_isn` its sequence number minus one, `key` the
/// key of `epoch_for(cookie, now)`.
#[inline(always)]
pub fn check(
    key: &CookieKey,
    flow: &Flow,
    client_isn: u32,
    cookie: u32,
    epoch: u64,
) -> Option<Negotiated> {
    let low = cookie & 0xff;
    if (cookie >> 8) != mac24(key, flow, client_isn, epoch, low) {
        return None;
    }
    let n = Negotiated::from_low_byte(low);
    // Only values `make` can produce: a wscale of 15 means none, so 0..=14
    // and 15 are all valid; nothing else to refuse.
    Some(n)
}

#[inline(always)]
fn mac24(key: &CookieKey, flow: &Flow, client_isn: u32, epoch: u64, low: u32) -> u32 {
    let ports_isn =
        ((flow.client_port as u64) << 48) | ((flow.server_port as u64) << 32) | client_isn as u64;
    let tail = (epoch << 8) | low as u64;
    let mut h = SipHasher::<1, 3>::new(key);
    if flow.client.is_v4_mapped() && flow.server.is_v4_mapped() {
        // The first words of IPv4-mapped addresses are the same constant.
        h.write(flow.client.0[1]);
        h.write(flow.server.0[1]);
    } else {
        h.write(flow.client.0[0]);
        h.write(flow.client.0[1]);
        h.write(flow.server.0[0]);
        h.write(flow.server.0[1]);
    }
    h.write(ports_isn);
    h.write(tail);
    (h.finish() >> 40) as u32
}

/// SipHash-C-D over a message of whole 64-bit little-endian words: the
/// reference algorithm for messages whose length is a multiple of 8 (the
/// host tests check it against the reference vectors and an independent
/// implementation).
pub struct SipHasher<const C: usize, const D: usize> {
    v: [u64; 4],
    len: u64,
}

impl<const C: usize, const D: usize> SipHasher<C, D> {
    #[inline(always)]
    pub const fn new(key: &CookieKey) -> Self {
        Self {
            v: [
                key.k0 ^ 0x736f_6d65_7073_6575,
                key.k1 ^ 0x646f_7261_6e64_6f6d,
                key.k0 ^ 0x6c79_6765_6e65_7261,
                key.k1 ^ 0x7465_6462_7974_6573,
            ],
            len: 0,
        }
    }

    #[inline(always)]
    fn round(&mut self) {
        let v = &mut self.v;
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }

    #[inline(always)]
    fn compress(&mut self, m: u64) {
        self.v[3] ^= m;
        for _ in 0..C {
            self.round();
        }
        self.v[0] ^= m;
    }

    #[inline(always)]
    pub fn write(&mut self, word: u64) {
        self.compress(word);
        self.len += 8;
    }

    #[inline(always)]
    pub fn finish(mut self) -> u64 {
        self.compress(self.len << 56);
        self.v[2] ^= 0xff;
        for _ in 0..D {
            self.round();
        }
        self.v[0] ^ self.v[1] ^ self.v[2] ^ self.v[3]
    }
}

/// The longest SYN-ACK TCP header (every option offered).
pub const SYNACK_TCP_LEN: usize = 40;
const TCP_FLAGS_SYN_ACK: u32 = 0x12;

/// The fields of a cookie SYN-ACK's TCP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynAck {
    pub server_port: u16,
    pub client_port: u16,
    pub cookie: u32,
    pub client_isn: u32,
    /// The MSS the server advertises.
    pub mss: u16,
    pub sack: bool,
    /// The server's shift, when the client offered window scaling.
    pub wscale: Option<u8>,
    /// `(our TSval, the client's TSval)` when the client sent timestamps.
    pub timestamps: Option<(u32, u32)>,
}

const NOP: u32 = 1;

impl SynAck {
    /// The header as 32-bit words whose memory is the wire bytes, with a
    /// zero checksum (see [`set_tcp_checksum`]), and how many of the ten
    /// words it uses (the rest are zero, so they add nothing to a checksum).
    ///
    /// Only the options the client offered are written: a SYN-ACK is then
    /// as long as the SYN it answers for the common stacks (Linux, Windows)
    /// or shorter (macOS, bare SYNs padded to Ethernet's minimum), so the
    /// frame is rewritten in place and rarely needs to grow, which some
    /// drivers cannot do for every frame.
    #[inline(always)]
    pub fn words(&self) -> ([u32; SYNACK_TCP_LEN / 4], usize) {
        let be = u32::to_be;
        let mut w = [0u32; SYNACK_TCP_LEN / 4];
        w[0] = be(((self.server_port as u32) << 16) | self.client_port as u32);
        w[1] = be(self.cookie);
        w[2] = be(self.client_isn.wrapping_add(1));
        w[5] = be((2 << 24) | (4 << 16) | self.mss as u32);
        let mut n = 6;
        let sack_or_nops = if self.sack {
            (4 << 8) | 2
        } else {
            (NOP << 8) | NOP
        };
        if let Some((tsval, tsecr)) = self.timestamps {
            w[6] = be((sack_or_nops << 16) | (8 << 8) | 10);
            w[7] = be(tsval);
            w[8] = be(tsecr);
            n = 9;
        } else if self.sack {
            w[6] = be((NOP << 24) | (NOP << 16) | sack_or_nops);
            n = 7;
        }
        if let Some(shift) = self.wscale {
            let ws = be((NOP << 24) | (3 << 16) | (3 << 8) | shift as u32);
            if n == 6 {
                w[6] = ws;
            } else if n == 7 {
                w[7] = ws;
            } else {
                w[9] = ws;
            }
            n += 1;
        }
        w[3] = be(((n as u32) << 28) | (TCP_FLAGS_SYN_ACK << 16) | SYNACK_WINDOW as u32);
        (w, n)
    }
}

/// The ones'-complement sum of `words` as they lie in memory (RFC 1071: the
/// sum of native-order words, folded and stored natively, is the right
/// checksum whatever the byte order).
#[inline(always)]
pub fn sum_words(words: &[u32], mut acc: u64) -> u64 {
    for w in words {
        acc += (*w & 0xffff) as u64 + (*w >> 16) as u64;
    }
    acc
}

/// Folds a sum to 16 bits and complements it: the checksum field's value
/// in memory order.
#[inline(always)]
pub fn fold(mut acc: u64) -> u16 {
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

/// Fills in the TCP checksum: `pseudo` is the pseudo-header's sum (see
/// [`pseudo_v4`], [`pseudo_v6`]).
#[inline(always)]
pub fn set_tcp_checksum(words: &mut [u32; SYNACK_TCP_LEN / 4], pseudo: u64) {
    let csum = fold(sum_words(words, pseudo));
    // The checksum is the first two bytes of word 4 in memory.
    words[4] = u32::from_ne_bytes({
        let c = csum.to_ne_bytes();
        [c[0], c[1], 0, 0]
    });
}

/// The pseudo-header sum for IPv4 addresses as they lie in memory.
#[inline(always)]
pub fn pseudo_v4(src: u32, dst: u32, tcp_len: u16) -> u64 {
    let proto_len = u32::from_be_bytes([0, 6, (tcp_len >> 8) as u8, tcp_len as u8]);
    sum_words(&[src, dst, proto_len.to_be()], 0)
}

/// The pseudo-header sum for IPv6 addresses (two native words each, as
/// [`AddrWords`] holds them).
#[inline(always)]
pub fn pseudo_v6(src: &AddrWords, dst: &AddrWords, tcp_len: u16) -> u64 {
    let halves = |w: u64| [w as u32, (w >> 32) as u32];
    let [a, b] = halves(src.0[0]);
    let [c, d] = halves(src.0[1]);
    let [e, f] = halves(dst.0[0]);
    let [g, h] = halves(dst.0[1]);
    let len = (tcp_len as u32).to_be();
    let next = 6u32.to_be();
    sum_words(&[a, b, c, d, e, f, g, h, len, next], 0)
}

/// An IPv4 header (no options) for the SYN-ACK, checksum filled in; `src`
/// and `dst` as they lie in memory.
#[inline(always)]
pub fn ipv4_header(src: u32, dst: u32, total_len: u16) -> [u32; 5] {
    let be = u32::to_be;
    let mut words = [
        be((0x45 << 24) | total_len as u32),
        be(0x4000), // id 0, don't fragment
        be((64 << 24) | (6 << 16)),
        src,
        dst,
    ];
    let csum = fold(sum_words(&words, 0));
    // The checksum is the last two bytes of word 2 in memory.
    let ttl_proto = words[2].to_ne_bytes();
    let c = csum.to_ne_bytes();
    words[2] = u32::from_ne_bytes([ttl_proto[0], ttl_proto[1], c[0], c[1]]);
    words
}

/// The first eight bytes of the SYN-ACK's IPv6 header (the addresses
/// follow): version 6, no traffic class or flow label, TCP, hop limit 64.
#[inline(always)]
pub fn ipv6_first_words(payload_len: u16) -> [u32; 2] {
    [
        (6u32 << 28).to_be(),
        (((payload_len as u32) << 16) | (6 << 8) | 64).to_be(),
    ]
}

/// The TCP fields of a returning ACK the cookie check needs, read from the
/// packet (`tsecr` when it carries timestamps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckFields {
    pub seq: u32,
    pub ack: u32,
}

impl AckFields {
    /// The client's ISN and the cookie this ACK answers.
    #[inline(always)]
    pub const fn isn_and_cookie(&self) -> (u32, u32) {
        (self.seq.wrapping_sub(1), self.ack.wrapping_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::v4_mapped;

    fn flow() -> Flow {
        Flow {
            client: AddrWords::from_addr(&v4_mapped([198, 19, 4, 5])),
            server: AddrWords::from_addr(&v4_mapped([198, 18, 0, 1])),
            client_port: 40000,
            server_port: 8080,
        }
    }

    const KEY: CookieKey = CookieKey {
        k0: 0x0706_0504_0302_0100,
        k1: 0x0f0e_0d0c_0b0a_0908,
    };

    #[test]
    fn siphash_matches_the_reference_vectors() {
        // SipHash-2-4 reference outputs (Aumasson & Bernstein, appendix A:
        // key 00..0f, message 00..len-1) for the whole-word lengths.
        let expected: [(usize, u64); 3] = [
            (0, 0x726f_db47_dd0e_0e31),
            (8, 0x93f5_f579_9a93_2462),
            (16, 0x3f2a_cc7f_57c2_9bdb),
        ];
        for (len, want) in expected {
            let mut h = SipHasher::<2, 4>::new(&KEY);
            for chunk in (0..len as u8).collect::<std::vec::Vec<_>>().chunks(8) {
                h.write(u64::from_le_bytes(chunk.try_into().unwrap()));
            }
            assert_eq!(h.finish(), want, "message of {len} bytes");
        }
    }

    #[test]
    fn siphash_1_3_matches_an_independent_implementation() {
        use core::hash::Hasher as _;
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            // xorshift64: deterministic inputs without a random crate.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for words in 0..8 {
            let key = CookieKey {
                k0: next(),
                k1: next(),
            };
            let msg: std::vec::Vec<u64> = (0..words).map(|_| next()).collect();
            let mut ours = SipHasher::<1, 3>::new(&key);
            let mut theirs = siphasher::sip::SipHasher13::new_with_keys(key.k0, key.k1);
            for w in &msg {
                ours.write(*w);
                theirs.write(&w.to_le_bytes());
            }
            assert_eq!(ours.finish(), theirs.finish(), "{words} words");
        }
    }

    #[test]
    fn ipv4_and_ipv6_flows_never_share_a_mac_input() {
        // ::ffff:a.b.c.d is IPv4 wherever guard looks; a v6 flow whose
        // second words equal a v4 flow's still hashes as six words.
        let v4 = flow();
        let mut v6 = v4;
        v6.client.0[0] = 1;
        let n = Negotiated::from_syn(false, 1460, false, None, OPT_ALL);
        assert_ne!(make(&KEY, &v4, 9, 3, &n), make(&KEY, &v6, 9, 3, &n));
    }

    #[test]
    fn a_cookie_checks_in_its_epoch_and_the_next_only() {
        let n = Negotiated::from_syn(false, 1460, true, Some(7), OPT_ALL);
        for epoch in [10u64, 11] {
            let c = make(&KEY, &flow(), 12345, epoch, &n);
            assert_eq!(epoch_for(c, epoch), epoch);
            assert_eq!(epoch_for(c, epoch + 1), epoch);
            assert_eq!(check(&KEY, &flow(), 12345, c, epoch), Some(n));
            // Two epochs later the parity matches the current epoch again,
            // and the MAC over the full epoch number refuses it.
            let later = epoch_for(c, epoch + 2);
            assert_eq!(later, epoch + 2);
            assert_eq!(check(&KEY, &flow(), 12345, c, later), None);
        }
    }

    #[test]
    fn any_change_to_flow_isn_key_or_low_byte_is_refused() {
        let n = Negotiated::from_syn(false, 1460, true, Some(7), OPT_ALL);
        let f = flow();
        let c = make(&KEY, &f, 777, 5, &n);
        let mut other = f;
        other.client_port += 1;
        assert_eq!(check(&KEY, &other, 777, c, 5), None, "another port");
        let mut other = f;
        other.client = AddrWords::from_addr(&v4_mapped([198, 19, 4, 6]));
        assert_eq!(check(&KEY, &other, 777, c, 5), None, "another source");
        let mut other = f;
        other.server_port = 8081;
        assert_eq!(check(&KEY, &other, 777, c, 5), None, "another service");
        assert_eq!(check(&KEY, &f, 778, c, 5), None, "another client ISN");
        let other_key = CookieKey { k0: 1, k1: 2 };
        assert_eq!(check(&other_key, &f, 777, c, 5), None, "another key");
        for bit in 0..8 {
            assert_eq!(
                check(&KEY, &f, 777, c ^ (1 << bit), 5),
                None,
                "flipped low bit {bit}"
            );
        }
    }

    #[test]
    fn negotiation_keeps_what_the_client_and_the_host_allow() {
        let n = Negotiated::from_syn(false, 1460, true, Some(9), OPT_ALL);
        assert_eq!((n.mss(false), n.sack, n.wscale), (1460, true, 9));
        let n = Negotiated::from_syn(false, 1400, false, None, OPT_ALL);
        assert_eq!((n.mss(false), n.sack, n.wscale_ok()), (1300, false, false));
        // No MSS option: the RFC default, the table's smallest.
        assert_eq!(
            Negotiated::from_syn(false, 0, false, None, 0).mss(false),
            536
        );
        assert_eq!(
            Negotiated::from_syn(true, 0, false, None, 0).mss(true),
            1220
        );
        assert_eq!(
            Negotiated::from_syn(true, 9000, false, None, 0).mss(true),
            8940
        );
        // Shifts above 14 are used as 14 (RFC 7323 §2.3).
        assert_eq!(
            Negotiated::from_syn(false, 1460, false, Some(200), OPT_ALL).wscale,
            14
        );
        // The host's sysctls win.
        let n = Negotiated::from_syn(false, 1460, true, Some(7), OPT_TIMESTAMPS);
        assert!(!n.sack && !n.wscale_ok());
        // Every field survives the cookie.
        for wscale in [None, Some(0), Some(14)] {
            for sack in [false, true] {
                for mss in [536, 1300, 1440, 1460] {
                    let n = Negotiated::from_syn(false, mss, sack, wscale, OPT_ALL);
                    let c = make(&KEY, &flow(), 1, 3, &n);
                    assert_eq!(check(&KEY, &flow(), 1, c, 3), Some(n));
                }
            }
        }
    }

    /// RFC 1071 over bytes, the plain way.
    fn reference_checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for pair in bytes.chunks(2) {
            let hi = pair[0] as u32;
            let lo = *pair.get(1).unwrap_or(&0) as u32;
            sum += (hi << 8) | lo;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn bytes_of(words: &[u32]) -> std::vec::Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn synack_header_bytes_and_checksums_are_what_the_wire_needs() {
        let src = [198, 18, 0, 1];
        let dst = [198, 19, 4, 5];
        for (sack, wscale, ts) in [
            (true, Some(7), Some((0x1122_3344, 0x5566_7788))),
            (false, None, None),
            (true, None, Some((1, 2))),
            (false, Some(0), None),
            (true, Some(8), None),
            (true, None, None),
            (false, Some(14), Some((5, 6))),
        ] {
            let s = SynAck {
                server_port: 8080,
                client_port: 40000,
                cookie: 0xdead_beef,
                client_isn: 0xffff_ffff,
                mss: 1460,
                sack,
                wscale,
                timestamps: ts,
            };
            let (mut words, n) = s.words();
            let len = n * 4;
            let pseudo = pseudo_v4(u32::from_ne_bytes(src), u32::from_ne_bytes(dst), len as u16);
            set_tcp_checksum(&mut words, pseudo);
            let tcp = bytes_of(&words[..n]);
            let full = bytes_of(&words);
            assert!(full[len..].iter().all(|b| *b == 0), "unused words are zero");
            assert_eq!(&tcp[0..4], &[0x1f, 0x90, 0x9c, 0x40]);
            assert_eq!(&tcp[4..8], &[0xde, 0xad, 0xbe, 0xef]);
            assert_eq!(&tcp[8..12], &[0, 0, 0, 0], "ack wraps to 0");
            assert_eq!(usize::from(tcp[12] >> 4), n, "data offset");
            assert_eq!(tcp[13], 0x12, "SYN|ACK");
            assert_eq!(u16::from_be_bytes([tcp[14], tcp[15]]), SYNACK_WINDOW);
            // Walk the options as a receiver would.
            let mut seen = std::vec::Vec::new();
            let mut i = 20;
            while i < len {
                match tcp[i] {
                    0 => break,
                    1 => i += 1,
                    kind => {
                        let len = tcp[i + 1] as usize;
                        seen.push((kind, tcp[i + 2..i + len].to_vec()));
                        i += len;
                    }
                }
            }
            assert_eq!(i, len, "options fill the header exactly");
            let want_len =
                24 + if ts.is_some() {
                    12
                } else if sack {
                    4
                } else {
                    0
                } + if wscale.is_some() { 4 } else { 0 };
            assert_eq!(len, want_len, "only what was offered");
            let mut want = std::vec![(2u8, std::vec![0x05, 0xb4])];
            if sack {
                want.push((4, std::vec![]));
            }
            if let Some((a, b)) = ts {
                let mut v = a.to_be_bytes().to_vec();
                v.extend(b.to_be_bytes());
                want.push((8, v));
            }
            if let Some(shift) = wscale {
                want.push((3, std::vec![shift]));
            }
            assert_eq!(seen, want);
            // The receiver's check: the sum over pseudo-header and segment.
            let mut pseudo_bytes = std::vec::Vec::new();
            pseudo_bytes.extend(src);
            pseudo_bytes.extend(dst);
            pseudo_bytes.extend([0, 6, 0, len as u8]);
            pseudo_bytes.extend(&tcp);
            assert_eq!(reference_checksum(&pseudo_bytes), 0, "{s:?}");
        }
    }

    #[test]
    fn ipv6_pseudo_header_sum_matches_the_reference() {
        let src: [u8; 16] = [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst: [u8; 16] = [0x20, 1, 0, 2, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0xab, 0xcd];
        let s = SynAck {
            server_port: 443,
            client_port: 1,
            cookie: 7,
            client_isn: 8,
            mss: 1440,
            sack: true,
            wscale: Some(7),
            timestamps: Some((3, 4)),
        };
        let (mut words, n) = s.words();
        assert_eq!(n, 10);
        let pseudo = pseudo_v6(
            &AddrWords::from_addr(&src),
            &AddrWords::from_addr(&dst),
            SYNACK_TCP_LEN as u16,
        );
        set_tcp_checksum(&mut words, pseudo);
        let mut all = std::vec::Vec::new();
        all.extend(src);
        all.extend(dst);
        all.extend([0, 0, 0, 40, 0, 0, 0, 6]);
        all.extend(bytes_of(&words));
        assert_eq!(reference_checksum(&all), 0);
        let first = bytes_of(&ipv6_first_words(40));
        assert_eq!(first, [0x60, 0, 0, 0, 0, 40, 6, 64]);
    }

    #[test]
    fn ipv4_header_is_valid() {
        let src = u32::from_ne_bytes([198, 18, 0, 1]);
        let dst = u32::from_ne_bytes([198, 19, 255, 254]);
        let h = bytes_of(&ipv4_header(src, dst, 60));
        assert_eq!(reference_checksum(&h), 0);
        assert_eq!(&h[..4], &[0x45, 0, 0, 60]);
        assert_eq!(&h[4..8], &[0, 0, 0x40, 0]);
        assert_eq!((h[8], h[9]), (64, 6));
        assert_eq!(&h[12..16], &[198, 18, 0, 1]);
        assert_eq!(&h[16..20], &[198, 19, 255, 254]);
    }
}
