//! The test guest's firewall (`scripts/guest/system.nix`'s `firewall`: NixOS's
//! `networking.firewall` on nftables, with Debian's `nft` and the guest kernel's netfilter
//! modules from `scripts/guest/fetch-nft`), on a cluster of a server behind it and an agent
//! (`vmcommon::firewall_composition`): an allowed port is answered, an allowed port nothing
//! listens on is refused at once (a reset), any other port is dropped (no answer at all) and the
//! refused connection is logged as NixOS logs it (`refused connection: ... DPT=6443`, in the
//! server's `dmesg` and on its console), ping is allowed; a hot reload that allows the port makes
//! it answer, and one that disables the firewall removes the table. Needs root for the store
//! server's sandbox, and the guest cache (`scripts/setup`).

use std::time::Instant;

use crate::common::Checks;
use crate::vmcommon;
use vmcommon::{
    Cluster, actions, firewall_composition, firewall_composition_with, firewall_guest_ready, row,
    text, up_json, wait_until,
};

/// What `nc -w WAIT server PORT` did on `from`, timed inside the guest.
#[derive(Debug)]
struct Connect {
    /// nc's exit status.
    status: i32,
    /// What it printed, stdout and stderr.
    out: String,
    /// How long it took, by the guest's clock.
    secs: f64,
}

fn connect(c: &Cluster, from: &str, port: u16, wait: u32) -> Connect {
    let o = c.exec(
        from,
        "60",
        &format!(
            "a=$(cut -d' ' -f1 /proc/uptime); nc -w {wait} server {port} </dev/null 2>&1; \
             rc=$?; b=$(cut -d' ' -f1 /proc/uptime); \
             echo \"nc-status $rc $(awk -v a=$a -v b=$b 'BEGIN {{ print b - a }}')\""
        ),
    );
    let all = text(&o.stdout);
    let (out, last) = all
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", all.trim_end()));
    let fields: Vec<&str> = last.split_whitespace().collect();
    match fields[..] {
        ["nc-status", status, secs] => Connect {
            status: status.parse().unwrap(),
            out: out.to_string(),
            secs: secs.parse().unwrap(),
        },
        _ => panic!(
            "nc to server:{port} on {from}: exit {:?}, {all}{}",
            o.status.code(),
            text(&o.stderr)
        ),
    }
}

/// The lines of the server's kernel log with NixOS's prefix for a refused connection.
fn refused_lines(c: &Cluster) -> Vec<String> {
    let o = c.exec(
        "server",
        "30",
        "dmesg | grep 'refused connection: ' || true",
    );
    assert!(o.status.success(), "dmesg: {}", text(&o.stderr));
    text(&o.stdout).lines().map(str::to_string).collect()
}

#[test]
fn the_firewall_drops_unallowed_ports_logs_them_and_a_switch_opens_them() {
    firewall_guest_ready();
    let t = Instant::now();
    let c = Cluster::named("firewall")
        .composition(&firewall_composition(&[7000, 7001], &[7000, 6443], 1))
        .up();
    eprintln!(
        "firewall: up --detach of 2 machines {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let mut checks = Checks::new();
    checks.check("an allowed port is answered", || {
        let r = connect(&c, "agent1", 7000, 10);
        assert_eq!((r.status, r.out.as_str()), (0, "server:7000"), "{r:?}");
    });
    checks.check(
        "an allowed port nothing listens on is refused at once (a reset)",
        || {
            let r = connect(&c, "agent1", 7001, 10);
            assert!(
                r.status != 0 && r.out.contains("Connection refused") && r.secs < 3.0,
                "{r:?}"
            );
        },
    );
    checks.check(
        "a port not allowed is dropped: no answer until nc gives up, though a service listens",
        || {
            let r = connect(&c, "agent1", 6443, 5);
            assert!(
                r.status != 0 && !r.out.contains("refused") && r.secs >= 4.5,
                "{r:?}"
            );
        },
    );
    checks.check(
        "the server's kernel log has NixOS's line for the dropped connection, none for allowed ports",
        || {
            let lines = refused_lines(&c);
            eprintln!("firewall: {}", lines.first().map_or("(none)", String::as_str));
            assert!(
                lines.iter().any(|l| l.contains("refused connection: IN=eth0 OUT= MAC=")
                    && l.contains("SRC=192.168.1.1 DST=192.168.1.2 ")
                    && l.contains("PROTO=TCP ")
                    && l.contains("DPT=6443 ")
                    && l.contains(" SYN ")),
                "{lines:#?}"
            );
            assert!(
                !lines
                    .iter()
                    .any(|l| l.contains("DPT=7000 ") || l.contains("DPT=7001 ")),
                "{lines:#?}"
            );
        },
    );
    checks.check("and so has its console (drydock logs)", || {
        wait_until(
            "refused connection: ... DPT=6443 in logs server",
            std::time::Duration::from_secs(30),
            || {
                let log = text(&c.verb("logs").arg("server").run().stdout);
                log.lines()
                    .any(|l| l.contains("refused connection: ") && l.contains("DPT=6443 "))
            },
        );
    });
    checks.check("ping is allowed", || {
        let o = c.exec("agent1", "30", "ping -c 1 -W 5 server");
        assert!(
            o.status.success() && text(&o.stdout).contains("1 packets received"),
            "{}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
    });
    checks.check("the ruleset is NixOS's, nft is on PATH", || {
        let o = c.exec("server", "30", "nft list table inet nixos-fw");
        let rules = text(&o.stdout);
        for want in [
            "chain input {",
            "type filter hook input priority filter; policy drop;",
            "iifname \"lo\" accept",
            "ct state vmap { invalid : drop, established : accept, related : accept, new : jump input-allow, untracked : jump input-allow }",
            "tcp flags syn / fin,syn,rst,ack log prefix \"refused connection: \" level info",
            "tcp dport { 7000, 7001 } accept",
            "icmp type echo-request accept",
            "fib saddr . mark . iif oif exists accept",
        ] {
            assert!(rules.contains(want), "no {want:?} in:\n{rules}{}", text(&o.stderr));
        }
    });

    let opened = checks.check(
        "a hot reload allowing 6443 switches the server only, and 6443 is answered",
        || {
            std::fs::write(
                c.file(),
                firewall_composition(&[7000, 7001, 6443], &[7000, 6443], 1),
            )
            .unwrap();
            let t = Instant::now();
            let (code, report, err) = up_json(&c, &["--detach"]);
            assert_eq!(code, Some(0), "{err}");
            assert_eq!(
                actions(&report),
                vec![
                    row("agent1", "keep", "planned"),
                    row("server", "switch", "done")
                ]
            );
            eprintln!(
                "firewall: hot reload allowing 6443 {:.1} s",
                t.elapsed().as_secs_f64()
            );
            let r = connect(&c, "agent1", 6443, 10);
            assert_eq!((r.status, r.out.as_str()), (0, "server:6443"), "{r:?}");
            let r = connect(&c, "agent1", 7000, 10);
            assert_eq!((r.status, r.out.as_str()), (0, "server:7000"), "{r:?}");
        },
    );
    if opened {
        checks.check(
            "a hot reload with enable = false removes the table and restores the console's log level",
            || {
                std::fs::write(
                    c.file(),
                    firewall_composition_with("enable = false;", &[7000, 6443], 1),
                )
                .unwrap();
                let (code, report, err) = up_json(&c, &["--detach"]);
                assert_eq!(code, Some(0), "{err}");
                assert_eq!(
                    actions(&report),
                    vec![
                        row("agent1", "keep", "planned"),
                        row("server", "switch", "done")
                    ]
                );
                let o = c.exec(
                    "server",
                    "30",
                    "nft list tables; cut -f1 /proc/sys/kernel/printk",
                );
                assert_eq!(text(&o.stdout), "4\n", "{}", text(&o.stderr));
                // Nothing filters any more: the web server on port 80, never allowed, answers.
                let o = c.exec("agent1", "30", "timeout 10 wget -qO- http://server/");
                assert_eq!(
                    text(&o.stdout),
                    "hello from server\n",
                    "{}",
                    text(&o.stderr)
                );
            },
        );
    }
    c.down();
}
