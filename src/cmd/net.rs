//! `drydock net`: the cluster's networks. Without a subcommand, the faults in force, the
//! findings from what the hubs saw (`--since`) and the hubs' counters; `capture` writes pcap;
//! `block`, `unblock`, `partition`, `shape`, `heal` change the faults. Each calls one library
//! function and prints its report (text, or the same struct as `--json`).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use drydock_cluster::{NetReport, NetRequest, ShapeSpec};

use crate::cli::{NetAction, NetArgs};
use crate::cmd::cluster::target;
use crate::context::Context;
use crate::exit::{Outcome, bad_input};

pub fn run(ctx: &Context, a: &NetArgs) -> anyhow::Result<Outcome> {
    let name = target(ctx, &a.cluster)?.name;
    let since = match &a.since {
        Some(d) => Some(Duration::from_secs(
            drydock_gc::parse_duration(d)?.max(0) as u64
        )),
        None => None,
    };
    let req = match &a.action {
        None => NetRequest::show(since),
        Some(NetAction::Capture {
            machines,
            vlan,
            out,
            count,
            seconds,
        }) => {
            crate::cancel::install();
            let mut sink: Box<dyn Write> = match out {
                Some(p) => Box::new(drydock_gc::create_nofollow(p).map_err(|e| {
                    anyhow::Error::new(e).context(format!("creating {}", p.display()))
                })?),
                None if std::io::stdout().is_terminal() => {
                    return Err(bad_input(
                        "net capture writes pcap, which is binary: give -w FILE, or pipe it (| tcpdump -r -)",
                    ));
                }
                None => Box::new(std::io::stdout().lock()),
            };
            let c = drydock_cluster::CaptureRequest {
                machines: machines.clone(),
                vlan: *vlan,
                count: *count,
                seconds: *seconds,
            };
            let r = drydock_cluster::net_capture(
                &ctx.state_dir,
                &name,
                &c,
                &mut sink,
                &crate::cancel::CANCEL,
            )?;
            eprintln!(
                "drydock: captured {} frames ({} bytes of pcap)",
                r.frames, r.bytes
            );
            return Ok(Outcome::Success);
        }
        Some(NetAction::Block { machine, vlan }) => NetRequest::Block {
            machine: machine.clone(),
            vlan: *vlan,
        },
        Some(NetAction::Unblock { machine, vlan }) => NetRequest::Unblock {
            machine: machine.clone(),
            vlan: *vlan,
        },
        Some(NetAction::Partition { groups }) => NetRequest::Partition {
            groups: drydock_cluster::parse_groups(groups),
        },
        Some(NetAction::Shape {
            machines,
            vlan,
            delay,
            jitter,
            loss,
            rate,
        }) => NetRequest::Shape {
            machines: machines.clone(),
            vlan: *vlan,
            shape: ShapeSpec {
                delay_ms: match delay {
                    Some(d) => drydock_cluster::parse_millis("--delay", d)?,
                    None => 0,
                },
                jitter_ms: match jitter {
                    Some(d) => drydock_cluster::parse_millis("--jitter", d)?,
                    None => 0,
                },
                loss_pct: match loss {
                    Some(l) => drydock_cluster::parse_percent(l)?,
                    None => 0.0,
                },
                rate_bytes: match rate {
                    Some(r) => Some(drydock_cluster::parse_rate(r)?),
                    None => None,
                },
            },
        },
        Some(NetAction::Heal) => NetRequest::Heal,
    };
    let report = drydock_cluster::net_request(&ctx.state_dir, &name, req)?;
    if ctx.json {
        crate::out::json(&mut crate::out::stdout(), &report)?;
    } else {
        let mut out = crate::out::stdout();
        write!(out, "{}", text(&report))?;
        out.flush()?;
    }
    Ok(Outcome::Success)
}

/// The report as text: faults in force, findings, the hubs' counters.
fn text(r: &NetReport) -> String {
    let mut s = String::new();
    let f = &r.faults;
    if f.is_empty() {
        s.push_str("faults in force: none\n");
    } else {
        s.push_str("faults in force (`drydock net heal` undoes them):\n");
        for (m, v) in &f.blocked {
            s.push_str(&format!("  blocked     {m} on VLAN {v}\n"));
        }
        if !f.partition.is_empty() {
            let groups: Vec<String> = f
                .partition
                .iter()
                .map(|g| g.iter().cloned().collect::<Vec<_>>().join(","))
                .collect();
            s.push_str(&format!("  partition   {}\n", groups.join(" | ")));
        }
        for (l, sh) in &f.shaped {
            let mut parts = Vec::new();
            if sh.delay_ms > 0 {
                parts.push(format!("delay {}ms", sh.delay_ms));
            }
            if sh.jitter_ms > 0 {
                parts.push(format!("jitter {}ms", sh.jitter_ms));
            }
            if sh.loss_pct > 0.0 {
                parts.push(format!("loss {}%", sh.loss_pct));
            }
            if let Some(b) = sh.rate_bytes {
                parts.push(format!("rate {} kbit/s", b * 8 / 1000));
            }
            s.push_str(&format!(
                "  shaped      {l} (leaving): {}\n",
                parts.join(", ")
            ));
        }
    }
    s.push('\n');
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    s.push_str(&drydock_cluster::render_net(&r.findings, now));
    s.push('\n');
    for h in &r.hubs {
        s.push_str(&format!(
            "VLAN {}: {} frames, {} copies delivered, {} waited for room, {} dropped (absent or full), {} blocked, {} partitioned, {} lost, {} delayed, {} broadcast over the limit\n",
            h.vlan, h.frames, h.delivered, h.queued, h.dropped, h.blocked, h.partitioned, h.lost, h.delayed, h.storm_dropped
        ));
    }
    s
}
