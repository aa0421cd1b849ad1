//! The baselines guard is compared with: an nftables meter and an iptables hashlimit rule
//! with guard's own per-source limit, at the earliest IP hook.

use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use super::{PORT, SYN_BURST, SYN_RATE};

/// The nftables baseline: a per-source meter with guard's rate and burst on connection-opening
/// SYNs, at the earliest IP hook (prerouting, raw priority), dropping what is over.
pub(super) fn nft_ruleset() -> String {
    format!(
        "table inet gdbench {{
  chain pre {{
    type filter hook prerouting priority -300; policy accept;
    tcp dport {PORT} tcp flags & (syn | ack) == syn meter gdsyn size 65535 {{ ip saddr limit rate over {SYN_RATE}/second burst {SYN_BURST} packets }} counter drop
  }}
}}
"
    )
}

/// The iptables baseline: hashlimit per source IP with the same limit, in the raw table's
/// PREROUTING (the same point in the path as the nftables chain).
pub(super) fn ipt_rule() -> Vec<String> {
    [
        "-t",
        "raw",
        "-I",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        &PORT.to_string(),
        "--tcp-flags",
        "SYN,ACK",
        "SYN",
        "-m",
        "hashlimit",
        "--hashlimit-above",
        &format!("{SYN_RATE}/second"),
        "--hashlimit-burst",
        &SYN_BURST.to_string(),
        "--hashlimit-mode",
        "srcip",
        "--hashlimit-name",
        "gdbench",
        "-j",
        "DROP",
    ]
    .map(String::from)
    .into()
}

/// The classic iptables if installed (what "iptables hashlimit" usually means), else the
/// nf_tables-backed one.
pub(super) fn iptables() -> &'static str {
    static BIN: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let legacy = Command::new("iptables-legacy")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if legacy {
            "iptables-legacy"
        } else {
            "iptables"
        }
    })
}

pub(super) fn nft_counter(json: &str) -> Result<u64> {
    let v: serde_json::Value = serde_json::from_str(json).context("nft -j")?;
    let items = v["nftables"].as_array().context("nft -j: no list")?;
    for item in items {
        if let Some(exprs) = item["rule"]["expr"].as_array() {
            for e in exprs {
                if let Some(p) = e["counter"]["packets"].as_u64() {
                    return Ok(p);
                }
            }
        }
    }
    bail!("no counter in the nft chain: {json}")
}

/// The packet count of the (only) hashlimit rule in `iptables -L -v -x -n` output.
pub(super) fn ipt_counter(text: &str) -> Result<u64> {
    text.lines()
        .find(|l| l.contains("gdbench") || l.contains("limit: above"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no hashlimit rule in: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse() {
        let nft = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"chain": {"name": "pre"}}, {"rule": {"expr": [{"match": {}}, {"counter": {"packets": 4711, "bytes": 188440}}, {"drop": null}]}}]}"#;
        assert_eq!(nft_counter(nft).unwrap(), 4711);
        assert!(nft_counter(r#"{"nftables": []}"#).is_err());
        let ipt = "Chain PREROUTING (policy ACCEPT 0 packets, 0 bytes)\n    pkts      bytes target     prot opt in     out     source               destination\n   12345   493800 DROP       6    --  *      *       0.0.0.0/0            0.0.0.0/0            tcp dpt:8080 flags:0x12/0x02 limit: above 20/sec burst 40 mode srcip\n";
        assert_eq!(ipt_counter(ipt).unwrap(), 12_345);
        assert!(ipt_counter("Chain PREROUTING\n").is_err());
    }

    #[test]
    fn baselines_use_guards_limit() {
        let nft = nft_ruleset();
        assert!(
            nft.contains("limit rate over 20/second burst 40 packets"),
            "{nft}"
        );
        assert!(nft.contains("tcp dport 8080"), "{nft}");
        let ipt = ipt_rule().join(" ");
        assert!(
            ipt.contains("--hashlimit-above 20/second --hashlimit-burst 40"),
            "{ipt}"
        );
    }
}
