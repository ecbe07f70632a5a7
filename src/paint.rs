//! Machine prefixes coloured per machine on a terminal (`NO_COLOR` honoured). The lines after
//! them are escaped by drydock-vm's `escape_control`, the one function that makes what a guest
//! prints safe for a terminal. Pure but for [`Paint::for_stdout`].

use std::io::IsTerminal;

/// Whether colour is wanted: a terminal, and `NO_COLOR` unset or empty.
pub fn colour_on(terminal: bool) -> bool {
    terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// How machine prefixes are printed.
#[derive(Debug, Clone, Copy)]
pub struct Paint {
    colour: bool,
}

/// Six distinct foreground colours (green, yellow, blue, magenta, cyan, red).
const COLOURS: [u8; 6] = [32, 33, 34, 35, 36, 31];

impl Paint {
    pub fn new(colour: bool) -> Self {
        Self { colour }
    }

    /// Colour when stdout is a terminal and `NO_COLOR` is not set.
    pub fn for_stdout() -> Self {
        Self::new(colour_on(std::io::stdout().is_terminal()))
    }

    /// `text` in green (a test passed) when colour is on.
    pub fn good(&self, text: &str) -> String {
        self.sgr("32", text)
    }

    /// `text` in bold red (a test failed) when colour is on.
    pub fn bad(&self, text: &str) -> String {
        self.sgr("1;31", text)
    }

    fn sgr(&self, code: &str, text: &str) -> String {
        match self.colour {
            true => format!("\x1b[{code}m{text}\x1b[0m"),
            false => text.to_string(),
        }
    }

    /// `machine` padded to `width`, in its own colour when colour is on.
    pub fn machine(&self, machine: &str, width: usize) -> String {
        let padded = format!("{machine:width$}");
        if !self.colour {
            return padded;
        }
        let h = machine
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        format!(
            "\x1b[{}m{padded}\x1b[0m",
            COLOURS[h as usize % COLOURS.len()]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_coloured_only_when_asked() {
        assert_eq!(Paint::new(false).machine("db", 5), "db   ");
        let c = Paint::new(true).machine("db", 5);
        assert!(
            c.starts_with("\x1b[3") && c.ends_with("db   \x1b[0m"),
            "{c:?}"
        );
        assert_eq!(Paint::new(true).machine("db", 5), c, "stable per machine");
    }
}
