//! Standard output for reports. Every report goes through [`stdout`], a buffered writer whose
//! "the reader went away" error is marked as such, so that `drydock runs | head -1` ends quietly
//! with exit 0 (as ripgrep does) instead of panicking or reporting a failure. Other broken pipes
//! (a socket, a child's stdin) stay errors: only this writer's are marked.

use std::io::{self, BufWriter, StdoutLock, Write};

/// The marker inside the `io::Error` of a write to a closed standard output.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Buffered standard output; see the module documentation.
#[derive(Debug)]
pub struct Out(BufWriter<StdoutLock<'static>>);

/// The report writer. Flush it (or let `?` on a write surface the error) before returning.
pub fn stdout() -> Out {
    Out(BufWriter::new(io::stdout().lock()))
}

fn mark(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        io::Error::new(io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        e
    }
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(mark)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(mark)
    }
}

/// One pretty JSON document and a newline, streamed (a plan of a million paths is never one
/// string in memory). serde_json keeps only the kind of an I/O error, so a broken pipe from
/// this writer is marked again here.
pub fn json<T: serde::Serialize + ?Sized>(out: &mut Out, value: &T) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(|e| {
        if e.io_error_kind() == Some(io::ErrorKind::BrokenPipe) {
            anyhow::Error::new(io::Error::new(io::ErrorKind::BrokenPipe, StdoutClosed))
        } else {
            anyhow::Error::new(e)
        }
    })?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Whether an error chain ends in a write to a closed standard output.
pub fn is_closed_stdout(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .and_then(|e| e.get_ref())
            .is_some_and(|inner| inner.is::<StdoutClosed>())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_marked_broken_pipes_count_as_a_closed_stdout() {
        let marked = anyhow::Error::new(mark(io::Error::from(io::ErrorKind::BrokenPipe)));
        assert!(is_closed_stdout(&marked));
        assert!(is_closed_stdout(&marked.context("printing the report")));
        let other = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(
            !is_closed_stdout(&other),
            "a socket's broken pipe is an error"
        );
        let not_pipe = anyhow::Error::new(mark(io::Error::from(io::ErrorKind::NotFound)));
        assert!(!is_closed_stdout(&not_pipe));
    }
}
