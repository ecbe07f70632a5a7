//! The framing on drydock's own sockets: one JSON line each way (exec and control sockets), and
//! which I/O errors mean "try again".

/// A read or receive that timed out or was interrupted: try again (after looking at a flag).
pub(crate) fn try_again(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

/// Send `value` as one JSON line: the framing of the exec and control sockets.
pub(crate) fn write_json_line(
    s: &std::os::unix::net::UnixStream,
    value: &impl serde::Serialize,
) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut text = serde_json::to_string(value).map_err(std::io::Error::other)?;
    text.push('\n');
    let mut w = s;
    w.write_all(text.as_bytes())
}

/// Read one JSON line (see [`write_json_line`]); a peer that closed without a line is an error.
pub(crate) fn read_json_line<T: serde::de::DeserializeOwned>(
    r: &mut impl std::io::BufRead,
) -> std::io::Result<T> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the owner closed the connection without an answer",
        ));
    }
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

/// One line, read a byte at a time (what follows it on the stream is left there).
pub(crate) fn read_line_unbuffered(s: &std::os::unix::net::UnixStream) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') && line.len() < 1 << 20 {
        if std::io::Read::read(&mut &*s, &mut byte)? == 0 {
            break;
        }
        line.push(byte[0]);
    }
    Ok(line)
}
