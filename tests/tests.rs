//! drydock's integration tests: one test binary (built and linked once) with a module per area,
//! each running the real `drydock` binary (through `common::Drydock`; where no command reaches
//! the code, the libraries' public API) against real QEMU, real chroot Nix stores, real
//! processes and signals: whatever a hermetic unit test cannot do. Fixtures are built by
//! `scripts/` once per run and shared through `common` and `vmcommon`. Every `tests/*.rs` must
//! be listed here (`scripts/test` checks).

mod common;
mod vmcommon;

mod backdoor;
mod cluster;
mod cluster_faults;
mod cluster_security;
mod cluster_snapshot;
mod compose;
mod doctor;
mod doctor_builders;
mod etcd;
mod eval;
mod example;
mod firewall;
mod gc_all;
mod gc_du;
mod gc_nix;
mod gc_nix_conf;
mod gc_props;
mod gc_robust;
mod gc_stores;
mod gc_system_store;
mod hostile;
mod images;
mod net;
mod nixos_map;
mod nixos_test;
mod qemu72;
mod qmp;
mod reload;
mod store_drv;
mod store_repair;
mod store_server;
mod testscript;
mod track_gc;
mod vm;
mod vm_restart;
