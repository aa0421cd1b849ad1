//! Packet sockets bound to one interface of the namespace they were opened in: a sender that
//! hands frames straight to the driver (no qdisc, as trafgen does) and a sniffer that sees
//! every frame the interface receives or transmits. A socket stays in the namespace it was
//! opened in, so it can be used from any thread once opened inside `Netns::run_in`.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::Duration;

use anyhow::{Context as _, Result};

/// A frame a sniffer saw, and which way it went.
#[derive(Debug, Clone)]
pub struct Seen {
    pub outgoing: bool,
    pub frame: Vec<u8>,
}

pub struct PacketSocket(OwnedFd);

impl PacketSocket {
    /// A socket that sends on `iface` and receives nothing.
    pub fn sender(iface: &str) -> Result<Self> {
        let socket = Self::open(0)?;
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads one c_int from a live local.
        let rc = unsafe {
            libc::setsockopt(
                socket.0.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("PACKET_QDISC_BYPASS");
        }
        socket.bind(iface, 0)?;
        Ok(socket)
    }

    /// A socket that receives every frame `iface` receives or sends.
    pub fn sniffer(iface: &str) -> Result<Self> {
        let all = (libc::ETH_P_ALL as u16).to_be();
        let socket = Self::open(i32::from(all))?;
        socket.bind(iface, all)?;
        Ok(socket)
    }

    fn open(protocol: i32) -> Result<Self> {
        // SAFETY: plain socket(2); protocol 0 means nothing is ever received on it.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("cannot open a packet socket (needs CAP_NET_RAW)");
        }
        // SAFETY: a new descriptor nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn bind(&self, iface: &str, protocol_be: u16) -> Result<()> {
        let index = guard_user::datapath::nix_if_index(iface)
            .with_context(|| format!("no interface {iface} in this namespace"))?;
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol_be;
        addr.sll_ifindex = index as i32;
        // SAFETY: bind reads a sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                self.0.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot bind a packet socket to {iface}"));
        }
        Ok(())
    }

    /// Sends one frame; `false` when the device had no room (counted, not fatal).
    pub fn send(&self, frame: &[u8]) -> Result<bool> {
        // SAFETY: send reads `frame.len()` bytes from a live slice.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n >= 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOBUFS) | Some(libc::EAGAIN) => Ok(false),
            _ => Err(e).context("send on the packet socket"),
        }
    }

    /// The next frame, or `None` once nothing came for `quiet`.
    pub fn recv(&self, quiet: Duration) -> Result<Option<Seen>> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(quiet.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: poll on one live descriptor.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            return Err(std::io::Error::last_os_error()).context("poll the packet socket");
        }
        if ready == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65_536];
        // SAFETY: sockaddr_ll is plain data; recvfrom fills at most `len` bytes of it.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: recvfrom writes at most buf.len() bytes into our buffer and the address
        // into `from`.
        let n = unsafe {
            libc::recvfrom(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("read the packet socket");
        }
        buf.truncate(n as usize);
        Ok(Some(Seen {
            outgoing: from.sll_pkttype == libc::PACKET_OUTGOING,
            frame: buf,
        }))
    }
}
