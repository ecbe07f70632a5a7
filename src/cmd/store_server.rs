//! `drydock __store-server` (hidden): the store share's server process. drydock starts it itself
//! through `drydock_vm::StoreServer`; it prints a ready line on stdout, serves one vhost-user
//! frontend, and exits 0 when that frontend disconnects.

use std::io::Read;

use drydock_vm::{StoreServeOptions, StoreServerError, parse_allow_list, serve_store};

use crate::cli::StoreServerArgs;
use anyhow::Context as _;

use crate::exit::Outcome;

pub fn run(args: &StoreServerArgs) -> anyhow::Result<Outcome> {
    let allow = match &args.allow_list {
        None => None,
        Some(path) => {
            let mut text = String::new();
            let read = if path.as_os_str() == "-" {
                std::io::stdin().read_to_string(&mut text)
            } else {
                std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text))
            };
            read.map_err(StoreServerError::AllowList)
                .context("--allow-list")?;
            Some(parse_allow_list(&text).context("--allow-list")?)
        }
    };
    let mut opts = StoreServeOptions::new(args.socket.clone(), args.shared_dir.clone(), allow);
    opts.thread_pool_size = args.thread_pool_size;
    opts.sandbox = !args.no_sandbox;
    opts.writable = args.writable;
    serve_store(&opts).context("store server")?;
    Ok(Outcome::Success)
}
