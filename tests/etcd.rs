//! A real distributed service on a cluster: three machines of the busybox test guest run Debian's
//! etcd (`scripts/guest/etcd-cluster.nix`, fetched by `scripts/guest/fetch-etcd`) and form one
//! healthy cluster of three members, bootstrapped statically by name over VLAN 1, with their
//! data on each machine's disk; a key put on one member is read on another; `down` leaves
//! nothing running. The cluster snapshot tests build on the same composition and helpers
//! (`vmcommon::etcd_*`). Needs root for the store server's sandbox, and the guest cache
//! (`scripts/setup`).

use std::time::{Duration, Instant};

use crate::common::Checks;
use crate::vmcommon;
use vmcommon::{
    Cluster, actions, etcd_composition, etcd_get, etcd_guest_ready, etcd_machines, etcd_members,
    etcd_put, etcd_wait_healthy, row, text, up_json,
};

#[test]
fn three_machines_form_a_healthy_etcd_cluster() {
    etcd_guest_ready();
    let t = Instant::now();
    let c = Cluster::named("etcd")
        .composition(&etcd_composition(3, ""))
        .up();
    let up = t.elapsed();
    // Forming takes an election after the three have booted; a loaded host with TCG guests
    // needs tens of seconds for what takes one on KVM.
    let formed = etcd_wait_healthy(&c, 3, Duration::from_secs(300));
    eprintln!(
        "etcd: up --detach of 3 machines {:.1} s, then healthy after {:.1} s more ({:.1} s in all)",
        up.as_secs_f64(),
        formed.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );

    let mut checks = Checks::new();
    checks.check(
        "member list: etcd1, etcd2, etcd3, every one started",
        || {
            for m in etcd_machines(3) {
                assert_eq!(etcd_members(&c, &m), etcd_machines(3), "on {m}");
            }
        },
    );
    checks.check("a key put on etcd1 is read on etcd3 and etcd2", || {
        etcd_put(&c, "etcd1", "drydock/greeting", "hello from etcd1");
        assert_eq!(
            etcd_get(&c, "etcd3", "drydock/greeting").as_deref(),
            Some("hello from etcd1")
        );
        assert_eq!(
            etcd_get(&c, "etcd2", "drydock/greeting").as_deref(),
            Some("hello from etcd1")
        );
        assert_eq!(etcd_get(&c, "etcd2", "drydock/none"), None);
    });
    checks.check("the data is on the machine's disk, not in RAM", || {
        for m in etcd_machines(3) {
            let o = c.exec(
                &m,
                "30",
                "awk '$2 == \"/var/lib\" { print $1, $3 }' /proc/mounts; ls /var/lib/etcd",
            );
            assert_eq!(
                text(&o.stdout),
                "/dev/vda ext4\nmember\n",
                "{m}: {}",
                text(&o.stderr)
            );
        }
    });
    checks.check("memory per guest", || {
        // What the guest has left (MemAvailable) and what etcd holds (its RSS), in KiB, and
        // what each QEMU holds on the host.
        for m in etcd_machines(3) {
            let o = c.exec(
                &m,
                "30",
                "awk '/^MemTotal|^MemAvailable/ { printf \"%s %s \", $1, $2 }' /proc/meminfo; \
                 awk '/^VmRSS/ { print \"etcd-\" $1, $2 }' /proc/$(cat /run/drydock/services.pid)/status",
            );
            assert!(o.status.success(), "{m}: {}", text(&o.stderr));
            eprintln!("etcd: {m}: {}", text(&o.stdout).trim());
        }
        for (m, pid) in c.qemu_pids() {
            let pid = pid.expect("a running QEMU");
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let rss: Vec<&str> = status
                .lines()
                .filter(|l| l.starts_with("VmRSS") || l.starts_with("RssShmem"))
                .collect();
            eprintln!("etcd: {m}: QEMU {}", rss.join(", ").replace('\t', " "));
        }
    });
    checks.check("etcd logs to the console", || {
        let o = c.verb("logs").arg("etcd2").run();
        let log = text(&o.stdout);
        assert!(
            log.contains("\"msg\":\"serving client traffic insecurely"),
            "{}",
            &log[log.len().saturating_sub(3000)..]
        );
    });
    checks.check(
        "a hot reload restarts etcd on its data: the cluster is healthy again, the key kept",
        || {
            std::fs::write(c.file(), etcd_composition(3, "variant = \"v2\";")).unwrap();
            let t = Instant::now();
            let (code, report, err) = up_json(&c, &["--detach"]);
            assert_eq!(code, Some(0), "{err}");
            assert_eq!(
                actions(&report),
                etcd_machines(3)
                    .iter()
                    .map(|m| row(m, "switch", "done"))
                    .collect::<Vec<_>>()
            );
            let switched = t.elapsed();
            let formed = etcd_wait_healthy(&c, 3, Duration::from_secs(300));
            eprintln!(
                "etcd: hot reload of 3 machines {:.1} s, then healthy after {:.1} s more",
                switched.as_secs_f64(),
                formed.as_secs_f64()
            );
            assert_eq!(etcd_members(&c, "etcd2"), etcd_machines(3));
            assert_eq!(
                etcd_get(&c, "etcd2", "drydock/greeting").as_deref(),
                Some("hello from etcd1")
            );
        },
    );
    c.down();
}
