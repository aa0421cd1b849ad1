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
use std::prelude::rust_2021::*;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest frame header: 2 bytes, a 64-bit length, a 4-byte mask.
const MAX_HEADER: usize = 14;

/// Frames read before the codec is made to stop once (see
/// [`Metered::poll_read`]), so the socket's task gets to charge them and
/// can close a flood within this many frames, however fast they come.
pub(super) const FRAMES_PER_YIELD: u32 = 64;

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
            let len = payload_len(&self.header[..self.have]);
            self.arrived.frames += 1;
            let (fin, control) = (self.header[0] & 0x80 != 0, self.header[0] & 0x08 != 0);
            if fin || control {
                self.arrived.messages += 1;
            }
            self.arrived.payload = self.arrived.payload.saturating_add(len);
            self.skip = len;
            self.have = 0;
        }
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
}

impl<S> Metered<S> {
    pub(crate) fn new(io: S) -> Self {
        Self {
            io,
            meter: FrameMeter::default(),
            since_yield: 0,
        }
    }

    /// Frames and payload bytes that arrived since the last call.
    pub(crate) fn take(&mut self) -> Arrived {
        self.meter.take()
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
        // was.
        if this.since_yield >= FRAMES_PER_YIELD {
            this.since_yield = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let frames_before = this.meter.arrived.frames;
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
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
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A client frame (masked) with `payload`, as a browser would send it.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
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

    #[test]
    fn counts_each_length_encoding() {
        let mut m = FrameMeter::default();
        m.feed(&frame(true, 1, b"hi"));
        m.feed(&frame(true, 2, &[7; 300]));
        m.feed(&frame(true, 2, &[7; 70_000]));
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
        let mut wire = frame(false, 1, b"x");
        for _ in 0..1000 {
            wire.extend(frame(false, 0, b""));
        }
        wire.extend(frame(true, 0, b""));
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
                (len as u64, fin || op >= 8, frame(fin, op, &vec![0xa5; len]))
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
}
