//! The progress of a cluster's boot while `up --detach` waits: on a terminal one line, redrawn
//! (`booting 4 machines: server ready 12.1 s · agent1 booting 14 s · ...`); elsewhere a line per
//! machine as it becomes ready. The line itself is a pure function of the states and the time.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// One machine: ready after how long, or still booting.
#[derive(Debug, Clone, PartialEq)]
pub struct Booting {
    pub machine: String,
    pub ready_after: Option<f64>,
}

/// The progress line for `machines`, `elapsed` seconds after the boot started.
pub fn line(machines: &[Booting], elapsed: f64) -> String {
    let ready = machines.iter().filter(|m| m.ready_after.is_some()).count();
    let parts: Vec<String> = machines
        .iter()
        .map(|m| match m.ready_after {
            Some(s) => format!("{} ready {s:.1} s", m.machine),
            None => format!("{} booting {elapsed:.0} s", m.machine),
        })
        .collect();
    format!("{ready}/{} ready: {}", machines.len(), parts.join(" · "))
}

/// The display: see the module documentation.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    machines: Vec<Booting>,
    terminal: bool,
    drawn: Option<Instant>,
}

impl Progress {
    /// For `machines`, on stderr (redrawn only if it is a terminal).
    pub fn new(machines: impl IntoIterator<Item = String>) -> Self {
        Self {
            started: Instant::now(),
            machines: machines
                .into_iter()
                .map(|machine| Booting {
                    machine,
                    ready_after: None,
                })
                .collect(),
            terminal: std::io::stderr().is_terminal(),
            drawn: None,
        }
    }

    /// Look again: `ready(machine)` says after how many seconds a machine became ready.
    pub fn update(&mut self, ready: impl Fn(&str) -> Option<f64>) {
        let now = self.started.elapsed().as_secs_f64();
        for m in &mut self.machines {
            if m.ready_after.is_some() {
                continue;
            }
            if let Some(secs) = ready(&m.machine) {
                m.ready_after = Some(secs);
                if !self.terminal {
                    eprintln!("drydock: {} ready after {secs:.1} s", m.machine);
                }
            }
        }
        if self.terminal
            && self
                .drawn
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(250))
        {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[K{}", line(&self.machines, now));
            let _ = e.flush();
            self.drawn = Some(Instant::now());
        }
    }

    /// Take the line off the terminal.
    pub fn clear(&mut self) {
        if self.terminal && self.drawn.is_some() {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[K");
            let _ = e.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_each_machine_s_state() {
        let b = |m: &str, r: Option<f64>| Booting {
            machine: m.into(),
            ready_after: r,
        };
        assert_eq!(
            line(&[b("agent1", None), b("server", Some(12.06))], 14.4),
            "1/2 ready: agent1 booting 14 s · server ready 12.1 s"
        );
        assert_eq!(line(&[b("solo", None)], 0.2), "0/1 ready: solo booting 0 s");
    }
}
