//! The bench's "NIC": a four-instruction XDP program on the switch's attacker port that
//! redirects every frame from the attacker straight into the server's veth, where it arrives
//! as a raw frame (`xdp_frame`), the way a NIC's DMA hands frames to its driver.
//!
//! Without it, frames cross the bridge as socket buffers built on the attacker's core, and
//! the server's veth receives those: native XDP then has to free a socket buffer for every
//! frame it drops, a cost a NIC driver never pays (it recycles the page), while the filters
//! after XDP get their socket buffer built for free. With it, the server's core does what a
//! NIC driver's poll does: run XDP on the raw frame and, for frames that pass (or when no
//! XDP program is attached), build the socket buffer the stack needs. The program itself is
//! the lab's (`crate::raw_xdp`).

use anyhow::{Context as _, Result};

use crate::netns::Netns;
use crate::raw_xdp::{redirect_program, RawXdp};

/// The redirect attached to `from` (a port of the `switch` namespace), sending everything it
/// receives out of `to` (another port there). Dropping it detaches and unloads the program.
///
/// A raw frame carries no checksum state: the sender's veth must compute checksums itself
/// ([`disable_checksum_offload`]), or its own TCP's segments arrive with the partial checksum
/// veth offload leaves in them, and are dropped as corrupt.
pub struct Wire {
    _xdp: RawXdp,
}

impl Wire {
    pub fn attach(switch: &Netns, from: &str, to: &str) -> Result<Self> {
        let to_index = switch.run_in(|| {
            guard_user::datapath::nix_if_index(to)
                .with_context(|| format!("no interface {to} in the switch"))
        })??;
        let xdp = RawXdp::attach(switch, from, "gd_wire", &redirect_program(to_index))
            .with_context(|| format!("the bench's redirect on the switch's {from}"))?;
        Ok(Self { _xdp: xdp })
    }
}

/// Makes the veth `ifname` in `ns` put complete checksums into what it sends.
pub fn disable_checksum_offload(ns: &Netns, ifname: &str) -> Result<()> {
    ns.exec(&["ethtool", "-K", ifname, "tx", "off"])
        .with_context(|| format!("cannot turn checksum offload off on {ifname}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    use crate::lab::{Lab, ATTACKER_PORT, ROLE_IF, SERVER_V4};

    use super::*;

    /// Whether the attacker can open a TCP connection to the server.
    fn attacker_reaches_server(lab: &Lab) -> Result<bool> {
        let listener = lab.server.run_in(|| TcpListener::bind((SERVER_V4, 0)))??;
        let to: SocketAddr = listener.local_addr()?;
        Ok(lab
            .attacker
            .run_in(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))?
            .is_ok())
    }

    /// The bridge refuses to forward anything the attacker sends: then only the redirect can
    /// carry the attacker's frames to the server (and the server's replies still take the
    /// bridge back).
    #[test]
    fn the_redirect_carries_the_attackers_frames_past_the_bridge() {
        if !crate::require_root("the_redirect_carries_the_attackers_frames_past_the_bridge") {
            return;
        }
        let lab = Lab::new().unwrap();
        // The server's veth takes redirected frames only with NAPI on, as the bench has it.
        lab.thread_server_napi().unwrap();
        let rules = format!(
            "table bridge gdwire {{ chain from_attacker {{ type filter hook forward priority 0; \
             iifname \"{ATTACKER_PORT}\" drop; }}; }}"
        );
        lab.switch.exec(&["nft", &rules]).unwrap();
        assert!(
            !attacker_reaches_server(&lab).unwrap(),
            "the bridge still forwards the attacker's frames: the test proves nothing"
        );
        disable_checksum_offload(&lab.attacker, ROLE_IF).unwrap();
        let wire = Wire::attach(&lab.switch, ATTACKER_PORT, "p-srv").unwrap();
        assert!(attacker_reaches_server(&lab).unwrap());
        drop(wire);
        assert!(
            !attacker_reaches_server(&lab).unwrap(),
            "dropping the wire must detach it"
        );
    }
}
