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
//! - A hot reload's switch ([`switch_start`], [`switch_wait`]) runs detached from the backdoor,
//!   so that a switch that restarts the backdoor does not kill itself: on a systemd guest as a
//!   transient unit of its own (`systemd-run`, as nixos-rebuild does), otherwise in a session of
//!   its own (`setsid`). It leaves its output and its exit status in a private folder of the
//!   guest, [`switch_dir`]; the call that started it, or a later call when the backdoor
//!   restarted under that one, waits for the status there.

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

/// The most of a switch's output a call brings back: its last bytes (the guest's console has
/// all of it).
pub const MAX_SWITCH_OUTPUT: usize = 64 << 10;

/// The guest folder of the detached switch `id` (a nonce: no other guest process can have made
/// it first): `job` (the script it runs), `pid` (its process group), `output` (what it printed,
/// stdout and stderr), `status` (its exit status, renamed into place when it ended), `wake` (a
/// fifo its end is announced on). Made with mode 0700, so only root reads what is in it.
pub fn switch_dir(id: &str) -> String {
    format!("/tmp/drydock-switch-{id}")
}

/// The transient systemd unit a detached switch runs as on a systemd guest.
pub fn switch_unit(id: &str) -> String {
    format!("drydock-switch-{id}")
}

/// What the detached switch runs, as `sh DIR/job TOPLEVEL DIR`: the switch with its output tee'd
/// to the console (so `up` streams it) and to `output`, its exit status written to a temporary
/// file and renamed to `status` once the output is complete, then one line on `wake`. `$` must
/// not reach systemd (it expands `$VAR` in a unit's command line): the text is a file.
const SWITCH_JOB: &str = r#"echo $$ >"$2/pid"
{ "$1/bin/switch-to-configuration" test; echo $? >"$2/status.tmp"; } </dev/null 2>&1 | tee /dev/console >"$2/output"
mv -f "$2/status.tmp" "$2/status" 2>/dev/null || : >"$2/status"
echo done 1<>"$2/wake"
"#;

/// The text of a backdoor call that starts `TOPLEVEL/bin/switch-to-configuration test` detached
/// from the backdoor (see the module's doc) as the switch `id`, then waits for it as
/// [`switch_wait`] does (at most `secs` seconds). When PID 1 is systemd (`/run/systemd/system`
/// is a directory, what `sd_booted` checks) the switch is the transient unit [`switch_unit`]
/// (`--collect`: it goes away when it ends, failed or not; nothing waits on the caller);
/// otherwise it runs under `setsid` in a session of its own. Its stdin is `/dev/null` either
/// way. A folder that exists already, or a start that fails, is status 125.
pub fn switch_start(toplevel: &str, id: &str, secs: u64) -> String {
    format!(
        r#"d={dir}
mkdir -m 0700 "$d" || exit 125
printf '%s' {job} >"$d/job" && mkfifo -m 0600 "$d/wake" || exit 125
if [ -d /run/systemd/system ]; then
  sh=$(command -v sh) || sh=/bin/sh
  systemd-run --unit={unit} --collect --quiet --no-ask-password --service-type=exec --setenv=PATH="$PATH" -- "$sh" "$d/job" {top} "$d" </dev/null || exit 125
else
  setsid sh "$d/job" {top} "$d" </dev/null >/dev/null 2>&1 &
fi
{wait}"#,
        dir = sh_quote(&switch_dir(id)),
        job = sh_quote(SWITCH_JOB),
        unit = sh_quote(&switch_unit(id)),
        top = sh_quote(toplevel),
        wait = switch_wait(id, secs),
    )
}

/// The text of a backdoor call that waits for the detached switch `id` to end, at most `secs`
/// seconds (the guest's uptime says when), then prints the last [`MAX_SWITCH_OUTPUT`] bytes of
/// its output and exits with its status. It blocks in the shell's own `read -t 1` on the
/// switch's `wake` fifo, held open across the loop so that no announcement is lost; the
/// one-second timeout is a back-off that looks at `status` again whatever happens to the fifo.
/// At `secs` it stops the switch (SIGTERM to its process group) and exits 124. No folder (it
/// never started, or it was removed) or no readable status is 125, saying so on stderr.
pub fn switch_wait(id: &str, secs: u64) -> String {
    format!(
        r#"d={dir}
[ -p "$d/wake" ] || {{ echo "no such switch in the guest: $d is missing" >&2; exit 125; }}
exec 8<>"$d/wake"
read -r t x </proc/uptime; e=$((${{t%.*}} + {secs}))
while [ ! -e "$d/status" ]; do
  read -r t x </proc/uptime
  if [ "${{t%.*}}" -ge "$e" ]; then
    read -r p <"$d/pid" && kill -TERM -- "-$p" 2>/dev/null
    echo "the switch did not end within {secs} s: it was stopped" >&2
    exit 124
  fi
  read -t 1 x <&8
done
tail -c {max} "$d/output"
read -r s <"$d/status"
case "$s" in ''|*[!0-9]*) echo "the switch ended without an exit status" >&2; exit 125 ;; esac
exit "$s""#,
        dir = sh_quote(&switch_dir(id)),
        max = MAX_SWITCH_OUTPUT,
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
    fn a_switch_starts_detached_and_leaves_its_status_in_a_private_folder() {
        let top = "/nix/store/abc-it's $sys";
        let t = switch_start(top, "5e1f", 120);
        // The folder, the unit: the switch's own, named by its id.
        assert_eq!(switch_dir("5e1f"), "/tmp/drydock-switch-5e1f");
        assert_eq!(switch_unit("5e1f"), "drydock-switch-5e1f");
        assert!(
            t.starts_with("d='/tmp/drydock-switch-5e1f'\nmkdir -m 0700 \"$d\" || exit 125\n"),
            "{t}"
        );
        // Both ways to start it: a systemd unit of its own (collected, nothing waits on the
        // caller), else a session of its own; stdin /dev/null either way.
        let quoted_top = r"'/nix/store/abc-it'\''s $sys'";
        assert!(t.contains("if [ -d /run/systemd/system ]; then"), "{t}");
        assert!(
            t.contains(&format!(
                "systemd-run --unit='drydock-switch-5e1f' --collect --quiet --no-ask-password --service-type=exec --setenv=PATH=\"$PATH\" -- \"$sh\" \"$d/job\" {quoted_top} \"$d\" </dev/null || exit 125"
            )),
            "{t}"
        );
        assert!(!t.contains("--wait") && !t.contains("--pipe"), "{t}");
        assert!(
            t.contains(&format!(
                "setsid sh \"$d/job\" {quoted_top} \"$d\" </dev/null >/dev/null 2>&1 &"
            )),
            "{t}"
        );
        // The job: the switch's output to the console and to `output`, its status renamed
        // into place once complete, then the wake-up.
        let job = sh_quote(SWITCH_JOB);
        assert!(t.contains(&format!("printf '%s' {job} >\"$d/job\"")), "{t}");
        assert!(SWITCH_JOB.contains(
            r#"{ "$1/bin/switch-to-configuration" test; echo $? >"$2/status.tmp"; } </dev/null 2>&1 | tee /dev/console >"$2/output""#
        ));
        assert!(SWITCH_JOB.contains(r#"mv -f "$2/status.tmp" "$2/status""#));
        assert!(SWITCH_JOB.ends_with("echo done 1<>\"$2/wake\"\n"));
        // Then it waits, as a later call would.
        assert!(t.ends_with(&switch_wait("5e1f", 120)), "{t}");
    }

    #[test]
    fn a_switch_is_waited_for_by_its_folder_within_a_bound() {
        let w = switch_wait("5e1f", 77);
        assert!(w.starts_with("d='/tmp/drydock-switch-5e1f'\n"), "{w}");
        // It starts nothing.
        assert!(
            !w.contains("systemd-run") && !w.contains("setsid") && !w.contains("mkdir"),
            "{w}"
        );
        assert!(w.contains(r#"[ -p "$d/wake" ] || {"#), "{w}");
        assert!(w.contains(r#"e=$((${t%.*} + 77))"#), "{w}");
        assert!(w.contains(r#"while [ ! -e "$d/status" ]; do"#), "{w}");
        assert!(w.contains("read -t 1 x <&8"), "{w}");
        assert!(
            w.contains(r#"kill -TERM -- "-$p""#) && w.contains("exit 124"),
            "{w}"
        );
        assert!(
            w.contains(&format!(r#"tail -c {MAX_SWITCH_OUTPUT} "$d/output""#)),
            "{w}"
        );
        assert!(w.ends_with(r#"exit "$s""#), "{w}");
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
