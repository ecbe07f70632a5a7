//! drydock-gc's library functions that run Nix, called directly against real chroot stores
//! (moved here from the library's unit tests, which run no external program).

use std::process::Command;

use crate::common;

use drydock_gc::{StoreLayout, ensure_store};

#[test]
fn a_new_chroot_store_is_created_once_for_concurrent_first_users() {
    // Without the lock, 8 Nix commands opening a new store at once lose the race for its
    // database now and then ("schema is corrupt", "database is busy").
    let dir = common::scratch("gc-nix-ensure-store");
    for round in 0..10 {
        let layout = StoreLayout::chroot(dir.join(format!("store-{round}")));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let layout = layout.clone();
                std::thread::spawn(move || {
                    ensure_store(&layout).unwrap();
                    Command::new("nix-instantiate")
                        .arg("--store")
                        .arg(layout.root.as_ref().unwrap())
                        .args(["--eval", "-E", "1"])
                        .output()
                        .unwrap()
                })
            })
            .collect();
        for t in threads {
            let o = t.join().unwrap();
            assert!(
                o.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        assert!(layout.has_database());
    }
}
