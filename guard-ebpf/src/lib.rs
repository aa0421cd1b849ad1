// A library target lets guard-user build-depend on this crate, so cargo
// rebuilds the embedded object when the eBPF code changes.
#![no_std]
