//! The only place in this crate with `unsafe`: thin wrappers over system calls that std does not
//! offer. Each block carries a `SAFETY:` comment; everything above this module is safe Rust.

pub(crate) mod daemon;
pub(crate) mod fs;
pub(crate) mod kvm;
pub(crate) mod poll;
pub(crate) mod proc;
