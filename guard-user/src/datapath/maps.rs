//! Typed access to the program's maps: open the pins, read and write entries.

use aya::{
    maps::{lpm_trie::Key, Map, MapData, MapError},
    Ebpf,
};
use guard_common::{
    addr::Prefix,
    maps as names,
    stats::{Stat, STAT_SLOTS},
    syncookie::{CookieKey, CookieState, KEY_SLOTS},
    Addr, BlockEntry, LiveConfig, SourceState,
};

use crate::paths::PinLayout;

use super::*;

pub(super) fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::Map {
        name,
        source: MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

fn open_pinned<T>(layout: &PinLayout, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let data = MapData::from_pin(layout.map(name))
        .map_err(|source| DatapathError::Map { name, source })?;
    let map = Map::from_map_data(data).map_err(|source| DatapathError::Map { name, source })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// A removal's result as whether the entry existed: the kernel reports a missing key
/// either way, depending on the map type and version.
fn existed(removed: Result<(), MapError>, name: &'static str) -> Result<bool, DatapathError> {
    match removed {
        Ok(()) => Ok(true),
        Err(MapError::KeyNotFound) => Ok(false),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(source) => Err(DatapathError::Map { name, source }),
    }
}

fn key_of(prefix: &Prefix) -> Key<Addr> {
    Key::new(prefix.prefix_len(), prefix.addr())
}

fn prefix_of(key: &Key<Addr>) -> Prefix {
    // `Key` is packed: copy the fields out before use.
    let len = key.prefix_len();
    let data = key.data();
    Prefix::new(data, len)
}

impl GuardMaps {
    /// Opens the maps an agent pinned, without loading anything (for
    /// `guard status` and friends).
    pub fn open_pinned(layout: &PinLayout) -> Result<Self, DatapathError> {
        check_layout(layout)?;
        Ok(Self {
            config: open_pinned(layout, names::CONFIG)?,
            stats: open_pinned(layout, names::STATS)?,
            ports: open_pinned(layout, names::PORTS)?,
            sources: open_pinned(layout, names::SOURCES)?,
            aggregates: open_pinned(layout, names::AGGREGATES)?,
            allow: open_pinned(layout, names::ALLOW)?,
            block: open_pinned(layout, names::BLOCK)?,
            conns: open_pinned(layout, names::CONNS)?,
            known_good: open_pinned(layout, names::KNOWN_GOOD)?,
            global: open_pinned(layout, names::GLOBAL)?,
            cookie_keys: open_pinned(layout, names::COOKIE_KEYS)?,
            cookie_state: open_pinned(layout, names::COOKIE_STATE)?,
            in_flight: open_pinned(layout, names::IN_FLIGHT)?,
            synack_dests: open_pinned(layout, names::SYNACK_DESTS)?,
        })
    }

    /// The SYN cookie key of each epoch slot.
    pub fn cookie_keys(&self) -> Result<[CookieKey; KEY_SLOTS as usize], DatapathError> {
        let mut out = [CookieKey::default(); KEY_SLOTS as usize];
        for (slot, key) in out.iter_mut().enumerate() {
            *key = self
                .cookie_keys
                .get(&(slot as u32), 0)
                .map_err(map_err(names::COOKIE_KEYS))?;
        }
        Ok(out)
    }

    pub fn set_cookie_key(&mut self, slot: u32, key: &CookieKey) -> Result<(), DatapathError> {
        self.cookie_keys
            .set(slot, key, 0)
            .map_err(map_err(names::COOKIE_KEYS))
    }

    pub fn cookie_state(&self) -> Result<CookieState, DatapathError> {
        self.cookie_state
            .get(&0, 0)
            .map_err(map_err(names::COOKIE_STATE))
    }

    /// Open connections per source key, as the sockops program counts them.
    pub fn connections(&self) -> Result<Vec<(Addr, u64)>, DatapathError> {
        let mut out = Vec::new();
        for item in self.conns.iter() {
            match item {
                Ok((k, v)) if (v as i64) > 0 => out.push((k, v)),
                Ok(_) | Err(MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(DatapathError::Map {
                        name: names::CONNS,
                        source,
                    })
                }
            }
        }
        Ok(out)
    }

    /// Deletes per-source connection counters that are back at zero so the
    /// table keeps room for new sources. Racing a new connection of the same
    /// source can undercount it by one (read as zero by the program, never
    /// as a wrapped huge count).
    pub fn prune_idle_connections(&mut self) -> Result<usize, DatapathError> {
        let idle: Vec<Addr> = self
            .conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| (*v as i64) <= 0)
            .map(|(k, _)| k)
            .collect();
        let mut removed = 0;
        for key in idle {
            if self.conns.remove(&key).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub fn config(&self) -> Result<LiveConfig, DatapathError> {
        self.config.get(&0, 0).map_err(map_err(names::CONFIG))
    }

    /// Validates, then replaces the live config in one map write; the
    /// program sees either the old or the new config, never a mix.
    pub fn set_config(&mut self, cfg: &LiveConfig) -> Result<(), DatapathError> {
        cfg.validate()?;
        self.config.set(0, cfg, 0).map_err(map_err(names::CONFIG))
    }

    /// Sums of the per-CPU counters, indexed by [`Stat`].
    pub fn stat_totals(&self) -> Result<[u64; STAT_SLOTS as usize], DatapathError> {
        let mut out = [0u64; STAT_SLOTS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self
                .stats
                .get(&(i as u32), 0)
                .map_err(map_err(names::STATS))?;
            *slot = values.iter().copied().fold(0u64, u64::wrapping_add);
        }
        Ok(out)
    }

    pub fn stat(&self, stat: Stat) -> Result<u64, DatapathError> {
        let values = self
            .stats
            .get(&stat.index(), 0)
            .map_err(map_err(names::STATS))?;
        Ok(values.iter().copied().fold(0u64, u64::wrapping_add))
    }

    /// Makes exactly `ports` protected.
    pub fn set_ports(&mut self, ports: &[u16]) -> Result<(), DatapathError> {
        let want: std::collections::HashSet<u16> = ports.iter().copied().collect();
        for port in 0..=u16::MAX {
            let wanted = want.contains(&port) as u8;
            let current = self
                .ports
                .get(&(port as u32), 0)
                .map_err(map_err(names::PORTS))?;
            if current != wanted {
                self.ports
                    .set(port as u32, wanted, 0)
                    .map_err(map_err(names::PORTS))?;
            }
        }
        Ok(())
    }

    pub fn ports(&self) -> Result<Vec<u16>, DatapathError> {
        let mut out = Vec::new();
        for (port, value) in self.ports.iter().enumerate() {
            if value.map_err(map_err(names::PORTS))? != 0 {
                out.push(port as u16);
            }
        }
        Ok(out)
    }

    pub fn insert_block(
        &mut self,
        prefix: &Prefix,
        entry: &BlockEntry,
    ) -> Result<(), DatapathError> {
        self.block
            .insert(&key_of(prefix), entry, 0)
            .map_err(map_err(names::BLOCK))
    }

    /// Whether an entry existed.
    pub fn remove_block(&mut self, prefix: &Prefix) -> Result<bool, DatapathError> {
        existed(self.block.remove(&key_of(prefix)), names::BLOCK)
    }

    pub fn get_block(&self, prefix: &Prefix) -> Option<BlockEntry> {
        // LPM lookups return the longest match; we want this exact prefix.
        let entry = self.block.get(&key_of(prefix), 0).ok()?;
        self.blocks()
            .ok()?
            .into_iter()
            .find(|(p, _)| p == prefix)
            .map(|_| entry)
    }

    pub fn blocks(&self) -> Result<Vec<(Prefix, BlockEntry)>, DatapathError> {
        self.block
            .iter()
            .map(|r| {
                r.map(|(k, v)| (prefix_of(&k), v))
                    .map_err(map_err(names::BLOCK))
            })
            .collect()
    }

    pub fn insert_allow(&mut self, prefix: &Prefix) -> Result<(), DatapathError> {
        self.allow
            .insert(&key_of(prefix), 1, 0)
            .map_err(map_err(names::ALLOW))
    }

    /// Whether an entry existed.
    pub fn remove_allow(&mut self, prefix: &Prefix) -> Result<bool, DatapathError> {
        existed(self.allow.remove(&key_of(prefix)), names::ALLOW)
    }

    pub fn allows(&self) -> Result<Vec<Prefix>, DatapathError> {
        self.allow
            .keys()
            .map(|r| r.map(|k| prefix_of(&k)).map_err(map_err(names::ALLOW)))
            .collect()
    }

    /// One address's entries, as the program looks them up (for `guard
    /// explain`): reads only, so explaining never changes a verdict.
    pub fn point(&self, ip: std::net::IpAddr, cfg: &LiveConfig) -> PointState {
        let source_key = Prefix::of(ip, cfg.source_prefix_v4, cfg.source_prefix_v6);
        let aggregate_key = Prefix::of(ip, cfg.aggregate_prefix_v4, cfg.aggregate_prefix_v6);
        let host = Key::new(guard_common::addr::MAX_PREFIX_LEN, Prefix::host(ip).addr());
        PointState {
            source: self.sources.get(&source_key.addr(), 0).ok(),
            aggregate: self.aggregates.get(&aggregate_key.addr(), 0).ok(),
            // Negative counts are transient (see guard-ebpf/src/conns.rs); the
            // program reads them as zero too.
            open_connections: self
                .conns
                .get(&source_key.addr(), 0)
                .map_or(0, |v| (v as i64).max(0) as u64),
            in_flight: self.in_flight.get(&source_key.addr(), 0).ok(),
            synack_dest: self
                .synack_dests
                .get(
                    &guard_common::state::synack_slot(&guard_common::addr::AddrWords::from_addr(
                        &source_key.addr(),
                    )),
                    0,
                )
                .ok()
                // A slot never used holds a full burst.
                .filter(|b| b.last_ns != 0),
            last_handshake_ns: self.known_good.get(&source_key.addr(), 0).ok(),
            allowed: self.allow.get(&host, 0).is_ok(),
            block: self.block.get(&host, 0).ok(),
            global: self.global.get(&0, 0).ok(),
            source_key,
            aggregate_key,
        }
    }

    /// Reads every per-source entry (the tuner's view); does not modify
    /// them, so observing never changes what the program decides.
    pub fn sources(&self) -> Result<Vec<(Addr, SourceState)>, DatapathError> {
        let mut out = Vec::new();
        for item in self.sources.iter() {
            match item {
                Ok(kv) => out.push(kv),
                // The LRU can evict a key between next_key and lookup.
                Err(MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(DatapathError::Map {
                        name: names::SOURCES,
                        source,
                    })
                }
            }
        }
        Ok(out)
    }
}
