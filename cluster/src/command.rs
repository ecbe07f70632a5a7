//! What `exec` and `cp` run in a guest, as the text the backdoor's shell evaluates: pure, and
//! tested as data (and against real busybox `sh` and bash in `tests/backdoor.rs`).
//!
//! - One word after `--` is a shell command line, run as written (the NixOS test driver's
//!   `succeed`); several are an argv, each word passed intact (`docker exec`): every word is
//!   single-quoted for the guest's `sh`, so spaces, quotes, `$`, globs and newlines arrive as
//!   typed.
//! - A command's stdin travels in the same call, base64 in a here-document that `base64 -d`
//!   writes to a temporary file before the command runs with its stdin from that file; so it is
//!   binary-safe and has an end (EOF), and nothing but the call's own text crosses the console.

use serde::{Deserialize, Serialize};

use crate::backdoor::sh_quote;

/// The most stdin a call carries (the console moves about a megabyte a second under TCG).
pub const MAX_STDIN: usize = 64 << 20;

/// What to run in a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestCommand {
    /// A shell command line, run by the guest's `sh` as written.
    Line(String),
    /// Words passed intact: the program and its arguments.
    Argv(Vec<String>),
}

impl GuestCommand {
    /// The command of `exec`'s words: one word is a command line, several an argv.
    pub fn from_words(mut words: Vec<String>) -> Self {
        if words.len() == 1 {
            Self::Line(words.remove(0))
        } else {
            Self::Argv(words)
        }
    }

    /// The shell text that runs it.
    pub fn script(&self) -> String {
        match self {
            Self::Line(line) => line.clone(),
            Self::Argv(words) => words
                .iter()
                .map(|w| sh_quote(w))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    /// How a person would type it (for messages).
    pub fn shown(&self) -> String {
        match self {
            Self::Line(line) => line.clone(),
            Self::Argv(words) => words
                .iter()
                .map(|w| {
                    let plain = !w.is_empty()
                        && w.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
                    if plain { w.clone() } else { sh_quote(w) }
                })
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// The here-document's delimiter: base64 never contains `-` or `_`.
const STDIN_END: &str = "DRYDOCK_STDIN_END";
/// Characters of base64 per line of the here-document.
const B64_LINE: usize = 76;

/// `script` with `stdin` as its standard input. Empty input is no input: the call's own stdin
/// is `/dev/null` already.
pub fn with_stdin(script: &str, stdin: &[u8]) -> String {
    use base64::Engine as _;
    if stdin.is_empty() {
        return script.to_string();
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(stdin);
    let mut text = String::with_capacity(b64.len() + b64.len() / B64_LINE + script.len() + 300);
    text.push_str("drydock_in=$(mktemp) || exit 125\nbase64 -d >\"$drydock_in\" <<'");
    text.push_str(STDIN_END);
    text.push_str("' || { rm -f \"$drydock_in\"; exit 125; }\n");
    for line in b64.as_bytes().chunks(B64_LINE) {
        // base64 is ASCII.
        text.push_str(std::str::from_utf8(line).unwrap_or_default());
        text.push('\n');
    }
    text.push_str(STDIN_END);
    text.push('\n');
    // The command runs in a subshell of its own, so an `exit` in it still removes the file.
    text.push_str("(eval ");
    text.push_str(&sh_quote(script));
    text.push_str(") <\"$drydock_in\"\ndrydock_s=$?\nrm -f \"$drydock_in\"\nexit $drydock_s");
    text
}

/// Where `exec -t`'s command leaves its exit status (`token`: a nonce of the call's own).
pub fn tty_status_file(token: &str) -> String {
    format!("/tmp/drydock-exec-{token}.status")
}

/// `exec -t`'s text: `script`, then its exit status into `status_file`, which a later call
/// reads (a session's end carries no status).
pub fn tty_script(script: &str, status_file: &str) -> String {
    format!(
        "(eval {}); echo $? >{}",
        sh_quote(script),
        sh_quote(status_file)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_word_is_a_command_line_and_several_are_an_argv() {
        let w = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        for (words, script, shown) in [
            (w(&["echo a; echo b"]), "echo a; echo b", "echo a; echo b"),
            (
                w(&["sh", "-c", "exit 3"]),
                "'sh' '-c' 'exit 3'",
                "sh -c 'exit 3'",
            ),
            (w(&["echo", "a   b"]), "'echo' 'a   b'", "echo 'a   b'"),
            (
                w(&["printf", "%s\\n", "x y"]),
                r"'printf' '%s\n' 'x y'",
                r"printf '%s\n' 'x y'",
            ),
            (
                w(&["echo", "it's", "$HOME"]),
                r"'echo' 'it'\''s' '$HOME'",
                r"echo 'it'\''s' '$HOME'",
            ),
            (w(&["touch", ""]), "'touch' ''", "touch ''"),
            (w(&["cat", "a\nb"]), "'cat' 'a\nb'", "cat 'a\nb'"),
        ] {
            let c = GuestCommand::from_words(words.clone());
            assert_eq!(c.script(), script, "{words:?}");
            assert_eq!(c.shown(), shown, "{words:?}");
        }
    }

    #[test]
    fn a_tty_command_leaves_its_status_in_a_file() {
        let f = tty_status_file("12-34");
        assert_eq!(f, "/tmp/drydock-exec-12-34.status");
        assert_eq!(
            tty_script("exit 3", &f),
            "(eval 'exit 3'); echo $? >'/tmp/drydock-exec-12-34.status'"
        );
    }

    #[test]
    fn stdin_travels_as_base64_lines_before_the_command() {
        assert_eq!(with_stdin("cat", b""), "cat");
        let t = with_stdin("cat 'x'", &[0, 255, b'\n']);
        assert!(t.starts_with("drydock_in=$(mktemp)"), "{t}");
        assert!(t.contains("\nAP8K\nDRYDOCK_STDIN_END\n"), "{t}");
        assert!(
            t.contains(r#"(eval 'cat '\''x'\''') <"$drydock_in""#),
            "{t}"
        );
        assert!(t.ends_with("exit $drydock_s"), "{t}");
        let big = with_stdin("cat", &vec![7u8; 1000]);
        let lines: Vec<&str> = big.lines().collect();
        let body = &lines[2..lines.iter().position(|l| *l == STDIN_END).unwrap()];
        assert!(body.iter().all(|l| l.len() <= B64_LINE));
        assert_eq!(body.concat().len(), 1000_usize.div_ceil(3) * 4);
    }
}
