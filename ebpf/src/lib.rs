//! User-space side of warden's eBPF access monitor.
//!
//! This crate will load and attach the kernel programs (aya): the `sock_ops`
//! attribution map (client address → pid/uid/cgroup), `cgroup/connect4` and
//! `connect6` access events and the deny map used to freeze a workload, plus the
//! ring-buffer consumer. The kernel programs themselves will live in a `no_std`
//! sibling crate outside `default-members`, with a shared `#[repr(C)]` types
//! crate.
//!
//! Nothing is implemented yet (see the "eBPF access monitor" issue); `unsafe`
//! is confined to this folder when it arrives.
