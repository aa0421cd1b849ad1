//! Frame encoding and incremental decoding.

use std::string::String;
use std::vec::Vec;

use bytes::{Buf, BufMut, BytesMut};

use super::message::{
    ty, BlockInfo, BlockOutcome, BlockRequest, ErrorCode, Message, Request, Response,
};
use super::{ProtoError, HEADER_LEN, MAX_DETAIL_LEN, MAX_FRAME, MAX_NAME_LEN, MAX_ORIGIN_LEN};
use crate::addr::{mask, Prefix, MAX_PREFIX_LEN};

/// Encoded size of a prefix: 16 address bytes and a length byte.
const PREFIX_LEN: usize = 17;
/// The fewest bytes a string can take (its length field).
const MIN_STR_LEN: usize = 2;

/// Appends `msg` as one frame to `dst`. A message that would not fit in
/// [`MAX_FRAME`], or with a string over its limit, is an error and leaves
/// `dst` as it was.
pub fn encode(msg: &Message, dst: &mut BytesMut) -> Result<(), ProtoError> {
    match msg {
        Message::Request(r) => r.encode(dst),
        Message::Response(r) => r.encode(dst),
    }
}

impl Request {
    /// Appends this request as one frame; see [`encode`].
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let start = dst.len();
        let result = encode_request(self, dst, start);
        if result.is_err() {
            dst.truncate(start);
        }
        result
    }
}

impl Response {
    /// Appends this response as one frame; see [`encode`].
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let start = dst.len();
        let result = encode_response(self, dst, start);
        if result.is_err() {
            dst.truncate(start);
        }
        result
    }
}

fn encode_request(r: &Request, dst: &mut BytesMut, start: usize) -> Result<(), ProtoError> {
    dst.put_u32(0);
    dst.put_u8(r.type_byte());
    match r {
        Request::Hello {
            version,
            client_name,
        } => {
            dst.put_u16(*version);
            put_str(dst, "client_name", client_name, MAX_NAME_LEN)?;
        }
        Request::Block(block) => {
            put_prefix(dst, &block.prefix);
            dst.put_u32(block.ttl_secs);
            dst.put_u32(block.reason);
            dst.put_u64(block.detected_at_unix_ns);
            put_str(dst, "detail", &block.detail, MAX_DETAIL_LEN)?;
        }
        Request::Unblock { prefix }
        | Request::Allow { prefix }
        | Request::Disallow { prefix }
        | Request::Escalation { prefix } => put_prefix(dst, prefix),
        Request::ListBlocks { offset, limit } => {
            dst.put_u32(*offset);
            dst.put_u32(*limit);
        }
        Request::ListAllows | Request::Stats | Request::GetConfig => {}
        Request::SetConfig { changes } => put_pairs(dst, start, "changes", changes)?,
        Request::History {
            since_unix_secs,
            prefix,
            limit,
        } => {
            dst.put_u64(*since_unix_secs);
            match prefix {
                None => dst.put_u8(0),
                Some(p) => {
                    dst.put_u8(1);
                    put_prefix(dst, p);
                }
            }
            dst.put_u32(*limit);
        }
    }
    finish_frame(dst, start)
}

fn encode_response(r: &Response, dst: &mut BytesMut, start: usize) -> Result<(), ProtoError> {
    dst.put_u32(0);
    dst.put_u8(r.type_byte());
    match r {
        Response::HelloOk {
            version,
            agent_version,
        } => {
            dst.put_u16(*version);
            put_str(dst, "agent_version", agent_version, u16::MAX as usize)?;
        }
        Response::Ok => {}
        Response::BlockResult {
            outcome,
            reason_text,
            expires_in_secs,
        } => {
            dst.put_u8(outcome.to_u8());
            put_str(dst, "reason_text", reason_text, u16::MAX as usize)?;
            dst.put_u32(*expires_in_secs);
        }
        Response::Blocks { total, entries } => {
            dst.put_u64(*total);
            put_count(dst, "entries", entries.len())?;
            for e in entries {
                put_prefix(dst, &e.prefix);
                dst.put_u32(e.reason);
                dst.put_u32(e.expires_in_secs);
                put_str(dst, "origin", &e.origin, MAX_ORIGIN_LEN)?;
                check_size(dst, start)?;
            }
        }
        Response::Allows { entries } => {
            put_count(dst, "entries", entries.len())?;
            for p in entries {
                put_prefix(dst, p);
                check_size(dst, start)?;
            }
        }
        Response::Stats { counters } => {
            put_count(dst, "counters", counters.len())?;
            for (name, value) in counters {
                put_str(dst, "counter name", name, u16::MAX as usize)?;
                dst.put_u64(*value);
                check_size(dst, start)?;
            }
        }
        Response::Config { entries } => put_pairs(dst, start, "entries", entries)?,
        Response::History { lines } => {
            put_count(dst, "lines", lines.len())?;
            for line in lines {
                put_str(dst, "history line", line, u16::MAX as usize)?;
                check_size(dst, start)?;
            }
        }
        Response::Escalation {
            tracked,
            strikes,
            streak_secs,
        } => {
            dst.put_u8(u8::from(*tracked));
            dst.put_u32(*strikes);
            dst.put_u32(*streak_secs);
        }
        Response::Error { code, message } => {
            dst.put_u16(code.to_u16());
            put_str(dst, "message", message, u16::MAX as usize)?;
        }
    }
    finish_frame(dst, start)
}

/// Stops a long list early instead of serialising all of it only to find
/// it cannot be sent.
fn check_size(dst: &BytesMut, start: usize) -> Result<(), ProtoError> {
    let len = dst.len() - start - HEADER_LEN;
    if len > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(())
}

fn finish_frame(dst: &mut BytesMut, start: usize) -> Result<(), ProtoError> {
    check_size(dst, start)?;
    let len = (dst.len() - start - HEADER_LEN) as u32;
    dst[start..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

fn put_prefix(dst: &mut BytesMut, p: &Prefix) {
    dst.put_slice(&p.addr());
    // Prefix keeps its length within 0..=128.
    dst.put_u8(p.prefix_len() as u8);
}

fn put_str(dst: &mut BytesMut, field: &'static str, s: &str, max: usize) -> Result<(), ProtoError> {
    let max = max.min(u16::MAX as usize);
    if s.len() > max {
        return Err(ProtoError::StringTooLong {
            field,
            len: s.len(),
            max,
        });
    }
    dst.put_u16(s.len() as u16);
    dst.put_slice(s.as_bytes());
    Ok(())
}

fn put_count(dst: &mut BytesMut, field: &'static str, n: usize) -> Result<(), ProtoError> {
    // No list that fits in a frame has this many items; refusing here keeps
    // the `as u32` below exact.
    if n > MAX_FRAME {
        return Err(ProtoError::CountTooLarge {
            field,
            count: n as u64,
        });
    }
    dst.put_u32(n as u32);
    Ok(())
}

fn put_pairs(
    dst: &mut BytesMut,
    start: usize,
    field: &'static str,
    pairs: &[(String, String)],
) -> Result<(), ProtoError> {
    put_count(dst, field, pairs.len())?;
    for (k, v) in pairs {
        put_str(dst, "key", k, u16::MAX as usize)?;
        put_str(dst, "value", v, u16::MAX as usize)?;
        check_size(dst, start)?;
    }
    Ok(())
}

/// Decodes one frame from the front of `src`.
///
/// `Ok(None)` means `src` holds the beginning of a frame that is not
/// complete yet. `Ok(Some((msg, used)))` gives the message and how many
/// bytes it took. A header with a zero or oversized length is an error as
/// soon as its four bytes are present, before any payload is awaited.
pub fn decode_frame(src: &[u8]) -> Result<Option<(Message, usize)>, ProtoError> {
    let Some(len) = frame_len(src)? else {
        return Ok(None);
    };
    let total = HEADER_LEN + len;
    if src.len() < total {
        return Ok(None);
    }
    let msg = decode_body(&src[HEADER_LEN..total])?;
    Ok(Some((msg, total)))
}

/// The validated length field, if the header is complete.
fn frame_len(src: &[u8]) -> Result<Option<usize>, ProtoError> {
    let Some(header) = src.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len == 0 {
        return Err(ProtoError::EmptyFrame);
    }
    if len > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(Some(len))
}

/// Reassembles frames from a byte stream.
///
/// Feed it whatever the socket returned, then call [`FrameDecoder::decode`]
/// until it returns `Ok(None)`. It buffers at most one frame beyond what was
/// fed in one go, because an oversized header is refused as soon as it
/// arrives. A frame whose payload is malformed is consumed with the error, so
/// framing stays in sync; an error in the header itself (zero or oversized
/// length) leaves the stream unrecoverable and repeats on every call: close
/// the connection.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    pub fn decode(&mut self) -> Result<Option<Message>, ProtoError> {
        let Some(len) = frame_len(&self.buf)? else {
            return Ok(None);
        };
        let total = HEADER_LEN + len;
        if self.buf.len() < total {
            // Room for the rest of this frame, once, instead of growing in
            // steps as it trickles in.
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let frame = self.buf.split_to(total);
        decode_body(&frame[HEADER_LEN..]).map(Some)
    }

    /// Bytes received but not yet decoded; non-zero means a frame has
    /// started arriving.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// Decodes a type byte and payload (the frame minus its length field).
fn decode_body(body: &[u8]) -> Result<Message, ProtoError> {
    let mut r = Reader {
        buf: body,
        what: "frame",
    };
    let t = r.u8("type")?;
    let msg = match t {
        ty::HELLO => {
            r.what = "hello";
            Message::Request(Request::Hello {
                version: r.u16("version")?,
                client_name: r.string("client_name", MAX_NAME_LEN)?,
            })
        }
        ty::BLOCK => {
            r.what = "block request";
            Message::Request(Request::Block(BlockRequest {
                prefix: r.prefix("prefix")?,
                ttl_secs: r.u32("ttl_secs")?,
                reason: r.u32("reason")?,
                detected_at_unix_ns: r.u64("detected_at_unix_ns")?,
                detail: r.string("detail", MAX_DETAIL_LEN)?,
            }))
        }
        ty::UNBLOCK => {
            r.what = "unblock request";
            Message::Request(Request::Unblock {
                prefix: r.prefix("prefix")?,
            })
        }
        ty::LIST_BLOCKS => {
            r.what = "list_blocks request";
            Message::Request(Request::ListBlocks {
                offset: r.u32("offset")?,
                limit: r.u32("limit")?,
            })
        }
        ty::ALLOW => {
            r.what = "allow request";
            Message::Request(Request::Allow {
                prefix: r.prefix("prefix")?,
            })
        }
        ty::DISALLOW => {
            r.what = "disallow request";
            Message::Request(Request::Disallow {
                prefix: r.prefix("prefix")?,
            })
        }
        ty::LIST_ALLOWS => Message::Request(Request::ListAllows),
        ty::STATS => Message::Request(Request::Stats),
        ty::GET_CONFIG => Message::Request(Request::GetConfig),
        ty::SET_CONFIG => {
            r.what = "set_config request";
            Message::Request(Request::SetConfig {
                changes: r.pairs("changes")?,
            })
        }
        ty::HISTORY => {
            r.what = "history request";
            let since_unix_secs = r.u64("since_unix_secs")?;
            let prefix = match r.u8("prefix tag")? {
                0 => None,
                1 => Some(r.prefix("prefix")?),
                value => {
                    return Err(ProtoError::BadTag {
                        field: "prefix tag",
                        value: value.into(),
                    })
                }
            };
            Message::Request(Request::History {
                since_unix_secs,
                prefix,
                limit: r.u32("limit")?,
            })
        }
        ty::ESCALATION => {
            r.what = "escalation request";
            Message::Request(Request::Escalation {
                prefix: r.prefix("prefix")?,
            })
        }
        ty::ERROR => {
            r.what = "error reply";
            Message::Response(Response::Error {
                code: ErrorCode::from_u16(r.u16("code")?),
                message: r.string("message", u16::MAX as usize)?,
            })
        }
        ty::HELLO_OK => {
            r.what = "hello_ok reply";
            Message::Response(Response::HelloOk {
                version: r.u16("version")?,
                agent_version: r.string("agent_version", u16::MAX as usize)?,
            })
        }
        ty::OK => Message::Response(Response::Ok),
        ty::BLOCK_RESULT => {
            r.what = "block_result reply";
            let raw = r.u8("outcome")?;
            let outcome = BlockOutcome::from_u8(raw).ok_or(ProtoError::BadTag {
                field: "outcome",
                value: raw.into(),
            })?;
            Message::Response(Response::BlockResult {
                outcome,
                reason_text: r.string("reason_text", u16::MAX as usize)?,
                expires_in_secs: r.u32("expires_in_secs")?,
            })
        }
        ty::BLOCKS => {
            r.what = "blocks reply";
            let total = r.u64("total")?;
            let n = r.count("entries", PREFIX_LEN + 4 + 4 + MIN_STR_LEN)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                entries.push(BlockInfo {
                    prefix: r.prefix("prefix")?,
                    reason: r.u32("reason")?,
                    expires_in_secs: r.u32("expires_in_secs")?,
                    origin: r.string("origin", MAX_ORIGIN_LEN)?,
                });
            }
            Message::Response(Response::Blocks { total, entries })
        }
        ty::ALLOWS => {
            r.what = "allows reply";
            let n = r.count("entries", PREFIX_LEN)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                entries.push(r.prefix("prefix")?);
            }
            Message::Response(Response::Allows { entries })
        }
        ty::STATS_REPLY => {
            r.what = "stats reply";
            let n = r.count("counters", MIN_STR_LEN + 8)?;
            let mut counters = Vec::with_capacity(n);
            for _ in 0..n {
                counters.push((
                    r.string("counter name", u16::MAX as usize)?,
                    r.u64("counter value")?,
                ));
            }
            Message::Response(Response::Stats { counters })
        }
        ty::CONFIG => {
            r.what = "config reply";
            Message::Response(Response::Config {
                entries: r.pairs("entries")?,
            })
        }
        ty::HISTORY_REPLY => {
            r.what = "history reply";
            let n = r.count("lines", MIN_STR_LEN)?;
            let mut lines = Vec::with_capacity(n);
            for _ in 0..n {
                lines.push(r.string("history line", u16::MAX as usize)?);
            }
            Message::Response(Response::History { lines })
        }
        ty::ESCALATION_REPLY => {
            r.what = "escalation reply";
            let tracked = match r.u8("tracked")? {
                0 => false,
                1 => true,
                value => {
                    return Err(ProtoError::BadTag {
                        field: "tracked",
                        value: value.into(),
                    })
                }
            };
            Message::Response(Response::Escalation {
                tracked,
                strikes: r.u32("strikes")?,
                streak_secs: r.u32("streak_secs")?,
            })
        }
        other => return Err(ProtoError::UnknownType(other)),
    };
    if !r.buf.is_empty() {
        return Err(ProtoError::TrailingBytes {
            what: r.what,
            extra: r.buf.len(),
        });
    }
    Ok(msg)
}

/// A bounds-checked cursor over one frame's body.
struct Reader<'a> {
    buf: &'a [u8],
    /// What is being decoded, for error messages.
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated {
                what: self.what,
                field,
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, ProtoError> {
        Ok(self.take(field, 1)?.get_u8())
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, ProtoError> {
        Ok(self.take(field, 2)?.get_u16())
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, ProtoError> {
        Ok(self.take(field, 4)?.get_u32())
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, ProtoError> {
        Ok(self.take(field, 8)?.get_u64())
    }

    fn string(&mut self, field: &'static str, max: usize) -> Result<String, ProtoError> {
        let len = self.u16(field)? as usize;
        if len > max {
            return Err(ProtoError::StringTooLong { field, len, max });
        }
        let bytes = self.take(field, len)?;
        core::str::from_utf8(bytes)
            .map(String::from)
            .map_err(|_| ProtoError::BadUtf8 { field })
    }

    fn prefix(&mut self, field: &'static str) -> Result<Prefix, ProtoError> {
        let bytes = self.take(field, PREFIX_LEN)?;
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&bytes[..16]);
        let len = bytes[16];
        if u32::from(len) > MAX_PREFIX_LEN {
            return Err(ProtoError::BadPrefixLen(len));
        }
        // Only the canonical form is accepted so a prefix decodes to exactly
        // what was meant, never silently to a wider one.
        if mask(&addr, len.into()) != addr {
            return Err(ProtoError::HostBitsSet);
        }
        Ok(Prefix::new(addr, len.into()))
    }

    /// A list count, refused if the rest of the frame cannot hold that many
    /// items of at least `min_item` bytes, so no count sizes an allocation
    /// beyond what was actually received.
    fn count(&mut self, field: &'static str, min_item: usize) -> Result<usize, ProtoError> {
        let n = self.u32(field)?;
        let n_usize = n as usize;
        if n_usize > self.buf.len() / min_item {
            return Err(ProtoError::CountTooLarge {
                field,
                count: n.into(),
            });
        }
        Ok(n_usize)
    }

    fn pairs(&mut self, field: &'static str) -> Result<Vec<(String, String)>, ProtoError> {
        let n = self.count(field, 2 * MIN_STR_LEN)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push((
                self.string("key", u16::MAX as usize)?,
                self.string("value", u16::MAX as usize)?,
            ));
        }
        Ok(out)
    }
}
