//! Frames counted as they arrive, before the codec assembles them.
//!
//! tungstenite joins a fragmented message silently: 65 536 empty
//! continuation frames reach the app as one message, so rate buckets
//! charged per message never see the flood. [`Metered`] sits between the
//! upgraded connection and the codec and reads each frame header as its
//! bytes pass, so every frame (control frames and fragments included) and
//! every payload byte can be charged the moment it arrives.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest frame header: 2 bytes, a 64-bit length, a 4-byte mask.
const MAX_HEADER: usize = 14;

/// Frames read before the codec is made to stop once (see
/// [`Metered::poll_read`]), so the socket's task gets to charge them and
/// can close a flood within this many frames, however fast they come.
pub(super) const FRAMES_PER_YIELD: u32 = 64;

/// Outbound bytes gathered before they go to the socket: the codec's own
/// write buffer (`Limits::ws_write_buffer_size`) stays small, because it
/// keeps what it grew to for the connection's life, while this one is
/// given back whenever it drains, so only a connection that is writing
/// right now holds it. Without it every few KiB of echoes is a `send`
/// (64-byte echoes ran at about half of warp's rate).
const WRITE_GATHER: usize = 64 * 1024;

/// Inbound bytes read at once while a peer keeps the socket full. The
/// codec reads in pieces of `Limits::ws_read_buffer_size` (small, because
/// it holds that for the connection's life): a 16 KiB message would be
/// four reads of the socket, and a stream of them ran at about 0.8 of
/// warp's rate, whose codec reads 128 KiB at a time. So once a read fills
/// the codec's piece (more is likely waiting), the meter reads this much
/// and hands it out piece by piece; a read that does not fill it ends that,
/// and the buffer is given back as soon as the codec has taken it all, so
/// a quiet connection holds none of it.
const READ_AHEAD: usize = 64 * 1024;

/// What arrived since the counts were last taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Arrived {
    /// Frames whose header is complete.
    pub frames: u64,
    /// Of those, the ones that end a message: a control frame, or the last
    /// (FIN) frame of a text or binary message.
    pub messages: u64,
    /// Their announced payload lengths, added up (whether or not the
    /// payload has arrived yet: it is on its way and the codec will buffer
    /// it).
    pub payload: u64,
}

/// Parses WebSocket frame headers out of a byte stream fed in pieces of
/// any size, skipping payloads.
#[derive(Debug, Default)]
pub(crate) struct FrameMeter {
    header: [u8; MAX_HEADER],
    /// Header bytes collected so far.
    have: usize,
    /// Payload bytes still to skip before the next header.
    skip: u64,
    arrived: Arrived,
}

/// The header's full length once its first two bytes are known.
fn header_len(first_two: [u8; 2]) -> usize {
    let ext = match first_two[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if first_two[1] & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// The payload length a complete header announces.
fn payload_len(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => {
            let mut be = [0u8; 8];
            be.copy_from_slice(&header[2..10]);
            u64::from_be_bytes(be)
        }
        n => u64::from(n),
    }
}

impl FrameMeter {
    /// Accounts for `data`, the next bytes of the stream.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = usize::try_from(self.skip).map_or(data.len(), |s| s.min(data.len()));
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            // A header that arrived whole is read where it lies: small
            // frames come many to a read, and this is most of what the
            // meter costs them.
            if self.have == 0 && data.len() >= 2 {
                let len = header_len([data[0], data[1]]);
                if let Some(header) = data.get(..len) {
                    self.count(header);
                    data = &data[len..];
                    continue;
                }
            }
            let want = if self.have < 2 {
                2
            } else {
                header_len([self.header[0], self.header[1]])
            };
            let n = (want - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < 2 || self.have < header_len([self.header[0], self.header[1]]) {
                continue;
            }
            let header = self.header;
            self.count(&header[..self.have]);
            self.have = 0;
        }
    }

    /// Counts the frame `header` (complete) begins.
    fn count(&mut self, header: &[u8]) {
        let len = payload_len(header);
        self.arrived.frames += 1;
        let (fin, control) = (header[0] & 0x80 != 0, header[0] & 0x08 != 0);
        if fin || control {
            self.arrived.messages += 1;
        }
        self.arrived.payload = self.arrived.payload.saturating_add(len);
        self.skip = len;
    }

    /// What arrived since the last call.
    pub(crate) fn take(&mut self) -> Arrived {
        std::mem::take(&mut self.arrived)
    }
}

/// The upgraded connection as the codec reads it, with every frame
/// counted on the way.
#[derive(Debug)]
pub(crate) struct Metered<S> {
    io: S,
    meter: FrameMeter,
    /// Frames counted since the codec was last made to stop.
    since_yield: u32,
    /// The codec was made to stop by the meter, not by a socket with
    /// nothing to read; see [`Metered::take_paused`].
    paused: bool,
    /// Written by the codec, not yet by the socket (see [`WRITE_GATHER`]).
    gathered: Vec<u8>,
    /// Read from the socket, not yet by the codec (see [`READ_AHEAD`]):
    /// `ahead[taken..filled]` is still to hand out. Kept between fills
    /// while the socket keeps filling it, given back otherwise.
    ahead: Vec<u8>,
    taken: usize,
    filled: usize,
    /// The last read of the socket filled what it was given.
    busy: bool,
}

impl<S> Metered<S> {
    pub(crate) fn new(io: S) -> Self {
        Self {
            io,
            meter: FrameMeter::default(),
            since_yield: 0,
            paused: false,
            gathered: Vec::new(),
            ahead: Vec::new(),
            taken: 0,
            filled: 0,
            busy: false,
        }
    }

    /// Moves what was read ahead into `buf`; once all of it is taken, the
    /// buffer is given back unless the socket is still busy.
    fn hand_out(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.filled - self.taken);
        buf.put_slice(&self.ahead[self.taken..self.taken + n]);
        self.taken += n;
        if self.taken == self.filled {
            (self.taken, self.filled) = (0, 0);
            if !self.busy {
                self.ahead = Vec::new();
            }
        }
    }

    /// Frames and payload bytes that arrived since the last call.
    pub(crate) fn take(&mut self) -> Arrived {
        self.meter.take()
    }

    /// Whether the last read stopped only to have its frames charged (and
    /// clears that). Such a stop is no sign of a quiet peer: its reader
    /// charges and reads on, rather than flushing and waiting as it does
    /// when the socket runs dry, which would cost a flush and a wake-up per
    /// [`FRAMES_PER_YIELD`] frames of a busy connection.
    pub(crate) fn take_paused(&mut self) -> bool {
        std::mem::take(&mut self.paused)
    }
}

impl<S: AsyncWrite + Unpin> Metered<S> {
    /// Writes out everything gathered, then gives its memory back.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut written = 0;
        let result = loop {
            if written == self.gathered.len() {
                break Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.io).poll_write(cx, &self.gathered[written..]) {
                Poll::Ready(Ok(0)) => break Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => written += n,
                other => break other.map(|r| r.map(drop)),
            }
        };
        self.gathered.drain(..written);
        if self.gathered.is_empty() {
            self.gathered = Vec::new();
        }
        result
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // The codec keeps reading for as long as a message is incomplete
        // and bytes are there: without a stop, a client that keeps the
        // socket readable with tiny fragments would hold the task inside
        // one read for as long as it likes, its frames never charged. A
        // read that would block is one the codec resumes exactly where it
        // was. The wake-up keeps a reader that does not look at
        // `take_paused` going.
        if this.since_yield >= FRAMES_PER_YIELD {
            this.since_yield = 0;
            this.paused = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let frames_before = this.meter.arrived.frames;
        let res = if this.taken < this.filled {
            this.hand_out(buf);
            Poll::Ready(Ok(()))
        } else if this.busy {
            if this.ahead.is_empty() {
                this.ahead = vec![0; READ_AHEAD];
            }
            let mut into = ReadBuf::new(&mut this.ahead);
            let res = Pin::new(&mut this.io).poll_read(cx, &mut into);
            if let Poll::Ready(Ok(())) = res {
                this.filled = into.filled().len();
                this.busy = this.filled == READ_AHEAD;
                this.hand_out(buf);
            } else {
                // Drained (or failed): a connection that waits holds none of it.
                this.busy = false;
                this.ahead = Vec::new();
            }
            res
        } else {
            let res = Pin::new(&mut this.io).poll_read(cx, buf);
            this.busy = buf.remaining() == 0 && buf.filled().len() > before;
            res
        };
        if let Poll::Ready(Ok(())) = res {
            this.meter.feed(&buf.filled()[before..]);
            let counted = this.meter.arrived.frames.wrapping_sub(frames_before);
            this.since_yield = this
                .since_yield
                .saturating_add(u32::try_from(counted).unwrap_or(u32::MAX));
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.gathered.len() + buf.len() > WRITE_GATHER {
            std::task::ready!(this.poll_drain(cx))?;
        }
        if buf.len() >= WRITE_GATHER {
            return Pin::new(&mut this.io).poll_write(cx, buf);
        }
        this.gathered.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A client frame (masked) with `payload`, as a browser would send it; for the tests of the
/// meter and of the socket above it.
#[cfg(test)]
pub(super) fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counts_each_length_encoding() {
        let mut m = FrameMeter::default();
        m.feed(&client_frame(true, 1, b"hi"));
        m.feed(&client_frame(true, 2, &[7; 300]));
        m.feed(&client_frame(true, 2, &[7; 70_000]));
        assert_eq!(
            m.take(),
            Arrived {
                frames: 3,
                messages: 3,
                payload: 2 + 300 + 70_000
            }
        );
        assert_eq!(m.take(), Arrived::default());
    }

    #[test]
    fn empty_continuations_are_frames_too() {
        let mut wire = client_frame(false, 1, b"x");
        for _ in 0..1000 {
            wire.extend(client_frame(false, 0, b""));
        }
        wire.extend(client_frame(true, 0, b""));
        let mut m = FrameMeter::default();
        m.feed(&wire);
        assert_eq!(
            m.take(),
            Arrived {
                frames: 1002,
                messages: 1,
                payload: 1
            }
        );
    }

    #[test]
    fn unmasked_headers_are_shorter() {
        // Server-to-client frames: no mask, 16-bit length; a ping (FIN
        // set, as control frames always have) in the middle of a message.
        let mut wire = vec![0x02, 126, 0x01, 0x00];
        wire.extend([0u8; 256]);
        wire.extend([0x89, 0x00]);
        let mut m = FrameMeter::default();
        m.feed(&wire);
        assert_eq!(
            m.take(),
            Arrived {
                frames: 2,
                messages: 1,
                payload: 256
            }
        );
    }

    /// A frame's payload length, whether it ends a message, and its bytes
    /// on the wire.
    fn arb_frame() -> impl Strategy<Value = (u64, bool, Vec<u8>)> {
        (
            any::<bool>(),
            prop_oneof![Just(0u8), Just(1), Just(2), Just(9), Just(10)],
            prop_oneof![0usize..130, 120usize..300, 65_530usize..65_545,],
        )
            .prop_map(|(fin, op, len)| {
                (
                    len as u64,
                    fin || op >= 8,
                    client_frame(fin, op, &vec![0xa5; len]),
                )
            })
    }

    proptest! {
        #[test]
        fn split_reads_count_as_one_read(
            frames in prop::collection::vec(arb_frame(), 1..20),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let wire: Vec<u8> = frames.iter().flat_map(|f| f.2.iter().copied()).collect();
            let expected = Arrived {
                frames: frames.len() as u64,
                messages: frames.iter().filter(|f| f.1).count() as u64,
                payload: frames.iter().map(|f| f.0).sum(),
            };
            let mut whole = FrameMeter::default();
            whole.feed(&wire);
            prop_assert_eq!(whole.take(), expected);

            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            points.push(0);
            points.push(wire.len());
            points.sort_unstable();
            let mut split = FrameMeter::default();
            for w in points.windows(2) {
                split.feed(&wire[w[0]..w[1]]);
            }
            prop_assert_eq!(split.take(), expected);
            // Nothing half-read is left over.
            prop_assert_eq!((split.have, split.skip), (0, 0));
        }

        #[test]
        fn byte_at_a_time(frames in prop::collection::vec(arb_frame(), 1..6)) {
            let wire: Vec<u8> = frames.iter().flat_map(|f| f.2.iter().copied()).collect();
            let mut m = FrameMeter::default();
            for b in &wire {
                m.feed(std::slice::from_ref(b));
            }
            prop_assert_eq!(m.take().frames, frames.len() as u64);
        }
    }

    /// A socket that takes at most `per_write` bytes a call and refuses
    /// every other call, to exercise partial and postponed writes.
    struct Trickle {
        written: Vec<u8>,
        per_write: usize,
        refuse_next: bool,
        flushes: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.refuse_next = !self.refuse_next;
            if !self.refuse_next {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(self.per_write);
            self.written.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A socket holding `data`, giving as much as each read asks for; EOF
    /// once it is all read.
    struct Holding {
        data: Vec<u8>,
        at: usize,
        reads: usize,
    }

    impl Holding {
        fn new(data: Vec<u8>) -> Self {
            Self {
                data,
                at: 0,
                reads: 0,
            }
        }
    }

    impl AsyncRead for Holding {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads += 1;
            let n = buf.remaining().min(self.data.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    /// Reads `m` to its end in pieces of `piece` bytes, as the codec does;
    /// returns what was read and how many pieces it took.
    async fn read_in_pieces(m: &mut Metered<Holding>, piece: usize) -> (Vec<u8>, usize) {
        use tokio::io::AsyncReadExt as _;
        let (mut got, mut pieces) = (Vec::new(), 0);
        let mut buf = vec![0; piece];
        loop {
            let n = m.read(&mut buf).await.unwrap();
            if n == 0 {
                return (got, pieces);
            }
            pieces += 1;
            got.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn a_full_socket_is_read_ahead_and_the_buffer_given_back() {
        let frame = client_frame(true, 2, &[7; 16 * 1024]);
        let wire: Vec<u8> = frame
            .iter()
            .copied()
            .cycle()
            .take(frame.len() * 40)
            .collect();
        let mut m = Metered::new(Holding::new(wire.clone()));
        let (got, pieces) = read_in_pieces(&mut m, 4096).await;
        assert_eq!(got, wire, "every byte, in order");
        assert_eq!(m.take().frames, 40, "every frame charged");
        // One read filled the codec's piece; then 64 KiB at a time, and
        // the EOF.
        let expected_reads = 1 + (wire.len() - 4096).div_ceil(READ_AHEAD) + 1;
        assert_eq!(m.io.reads, expected_reads, "{pieces} pieces");
        assert!(pieces > 4 * m.io.reads);
        assert_eq!(m.ahead.capacity(), 0, "a drained read-ahead is given back");
    }

    #[tokio::test]
    async fn a_peer_that_never_fills_a_piece_is_read_straight() {
        use tokio::io::AsyncReadExt as _;
        let frame = client_frame(true, 1, b"hello");
        let mut m = Metered::new(Holding::new(frame.clone()));
        let mut buf = [0; 4096];
        assert_eq!(m.read(&mut buf).await.unwrap(), frame.len());
        assert_eq!(m.ahead.capacity(), 0);
        assert!(!m.busy);
        assert_eq!(m.read(&mut buf).await.unwrap(), 0);
        assert_eq!(m.io.reads, 2);
    }

    #[tokio::test]
    async fn writes_gather_until_a_flush_and_leave_no_buffer_behind() {
        use tokio::io::AsyncWriteExt as _;
        let mut m = Metered::new(Trickle {
            written: Vec::new(),
            per_write: 1000,
            refuse_next: false,
            flushes: 0,
        });
        let mut sent = Vec::new();
        for i in 0..50u8 {
            let piece = vec![i; 100];
            m.write_all(&piece).await.unwrap();
            sent.extend_from_slice(&piece);
        }
        assert!(m.io.written.is_empty(), "small writes went out one by one");
        m.flush().await.unwrap();
        assert_eq!(m.io.written, sent);
        assert_eq!(m.io.flushes, 1);
        assert_eq!(m.gathered.capacity(), 0, "a drained buffer is given back");

        // More than the gathering holds goes out without a flush, in order,
        // whatever the socket takes at a time.
        let big: Vec<u8> = (0..3 * WRITE_GATHER).map(|i| (i % 251) as u8).collect();
        for chunk in big.chunks(4096) {
            m.write_all(chunk).await.unwrap();
        }
        assert!(m.io.written.len() > sent.len() + WRITE_GATHER);
        m.shutdown().await.unwrap();
        sent.extend_from_slice(&big);
        assert_eq!(m.io.written, sent);
        assert_eq!(m.gathered.capacity(), 0);
    }
}
