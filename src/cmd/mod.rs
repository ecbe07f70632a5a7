//! One module per subcommand; each turns parsed arguments into an `Outcome`.

pub mod cluster;
pub mod doctor;
pub mod du;
pub mod gc;
pub mod help;
pub mod net;
pub mod reload;
pub mod runs;
pub mod snapshot;
pub mod store;
pub mod store_server;
pub mod test;
pub mod track;
pub mod vm;
