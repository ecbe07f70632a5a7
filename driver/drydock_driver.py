"""drydock's test driver: runs a NixOS-test-driver-style Python `testScript` against a drydock
cluster (`drydock test`).

The script sees the NixOS test driver's API, with its names, signatures, defaults and
semantics: `start_all`, `join_all`, `subtest`, `retry`, `t`, `machines`, and one object per
machine named after it (`-` becomes `_`) with `start`, `shutdown`, `crash`, `succeed`, `fail`,
`execute`, `wait_until_succeeds`, `wait_for_unit`, `wait_for_open_port`, `copy_from_host`, ...

How it reaches the cluster:
- shell commands go straight to the machine's exec socket (the owner's, the one `drydock exec`
  uses): one JSON request line, one JSON reply line, per call; no process per call;
- what changes the cluster (start, shutdown, crash, block, unblock, copies, waiting for a
  machine to stop) is asked of the `drydock test` process that started this one, over the
  channel that is this process's stdin and stdout (a socket; JSON lines both ways), and every
  call of the script and every subtest is reported there, so that drydock prints them and
  builds the report. The script's own output (`print`) goes to drydock's standard error.

Standard library only; Python 3.9 or newer. drydock embeds this file and writes it, private,
into the cluster's folder before it runs it; it is not meant to be run by hand.
"""

import base64
import contextlib
import functools
import json
import linecache
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
import unittest

# A call without a timeout (`succeed(cmd)`, `timeout=None`) still needs one on the wire: a week,
# the NixOS test driver's global timeout.
NO_TIMEOUT = 7 * 24 * 3600
# How much of a command's output an event carries (the rest stays in the script's hands).
EVENT_OUTPUT = 16 * 1024
# How often a wait for console text looks at the console log again when it has nothing new:
# a back-off (the log is a file another process writes; the driver polls its queue likewise).
CONSOLE_POLL = 0.1


class RequestedAssertionFailed(AssertionError):
    """A check of the script failed (a command's status, a timeout, an assertion of `t`)."""


class MachineError(Exception):
    """A machine could not do what was asked (not running, not reachable, not available)."""


class DriverError(Exception):
    """drydock could not serve a request of the driver."""


def pythonize_name(name):
    """A machine's name as a Python identifier, as the NixOS test driver makes it."""
    return re.sub(r"^[^A-Za-z_]|[^A-Za-z0-9_]", "_", name)


def make_command(args):
    return " ".join(map(shlex.quote, map(str, args)))


def retry(fn, timeout_seconds=900, *, timeout=None):
    """Call `fn(last_try)` with one second between tries until it returns True or the timeout
    passes (then once more with `last_try=True`, and raise if that fails too)."""
    if timeout is not None:
        timeout_seconds = timeout
    start = time.monotonic()
    while time.monotonic() - start < timeout_seconds:
        if fn(False):
            return
        time.sleep(1)
    elapsed = time.monotonic() - start
    if not fn(True):
        raise RequestedAssertionFailed(
            f"action timed out after {elapsed:.2f} seconds (timeout={timeout_seconds})"
        )


class AssertionTester(unittest.TestCase):
    """`t`: unittest's assertions, failing with RequestedAssertionFailed."""

    failureException = RequestedAssertionFailed

    def runTest(self):  # pragma: no cover - never run; lets TestCase be made without a method
        pass


def _clip(data):
    if len(data) <= EVENT_OUTPUT:
        return data
    return "[... %d bytes before]\n" % (len(data) - EVENT_OUTPUT) + data[-EVENT_OUTPUT:]


def _shown(args, kwargs):
    """A call's arguments as written in Python, shortened for a line of output."""
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    text = ", ".join(parts)
    if len(text) > 72:
        text = text[:71] + "\u2026"
    return text


class Channel:
    """The connection to `drydock test`: JSON lines both ways on one socket."""

    def __init__(self, fd):
        self.sock = socket.socket(fileno=fd)
        self.reader = self.sock.makefile("rb")
        self.next_id = 0

    def send(self, obj):
        try:
            self.sock.sendall(json.dumps(obj).encode() + b"\n")
        except OSError:
            # drydock went away: nothing is left to report to.
            os._exit(3)

    def receive(self):
        line = self.reader.readline()
        if not line:
            os._exit(3)
        return json.loads(line)

    def op(self, op, **args):
        """Ask drydock to do `op`; its result, or DriverError/MachineError with why not."""
        self.next_id += 1
        self.send(dict(t="op", id=self.next_id, op=op, **args))
        reply = self.receive()
        if reply.get("error"):
            raise MachineError(reply["error"])
        return reply.get("result")


class Console:
    """A machine's console log (`console.log`, written by its owner), read line by line from
    where the last wait stopped, as the driver's queue of console lines: each wait consumes the
    lines it looked at. A new boot starts a new log; a rotated log's rest is read first."""

    def __init__(self, path):
        self.path = path
        self.reset()

    def reset(self):
        self.ino = None
        self.off = 0
        self.partial = b""
        self.lines = []

    def _read_from(self, path, off):
        try:
            with open(path, "rb") as f:
                f.seek(off)
                return f.read()
        except OSError:
            return b""

    def _more(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return b""
        if self.ino is None:
            self.ino, self.off = st.st_ino, 0
        data = b""
        if st.st_ino != self.ino:
            try:
                if os.stat(self.path + ".1").st_ino == self.ino:
                    data = self._read_from(self.path + ".1", self.off)
            except OSError:
                pass
            self.ino, self.off = st.st_ino, 0
        elif st.st_size < self.off:
            self.off = 0
        new = self._read_from(self.path, self.off)
        self.off += len(new)
        return data + new

    def next_line(self):
        """The next line, or None if there is none yet."""
        if not self.lines:
            chunk = self.partial + self._more()
            *complete, self.partial = chunk.split(b"\n")
            self.lines = [
                c.decode(errors="ignore").replace("\r", "").rstrip() for c in complete
            ]
        return self.lines.pop(0) if self.lines else None

    def whole(self):
        return self._read_from(self.path, 0).decode(errors="replace").replace("\r", "")


class Driver:
    """The state of one run: the channel, the machines, the call being made."""

    def __init__(self, chan, config):
        self.chan = chan
        self.config = config
        self.depth = 0
        self.last_exec = None
        self.failure = None
        self.subtests = []
        self.machines = [Machine(self, m) for m in config["machines"]]

    def emit(self, **event):
        self.chan.send(event)

    def log(self, message, machine=None):
        self.emit(t="log", machine=machine, text=str(message))

    def start_all(self):
        """Start every machine that is not running (in parallel); returns once they are
        ready."""
        names = [m.name for m in self.machines if not m.booted]
        if names:
            self.chan.op("start", machines=names)
        for m in self.machines:
            m._started()

    def partition(self, *groups):
        """Split the cluster's networks: frames cross only within a group (machines, or their
        names); machines in no group keep their links. `heal()` undoes it."""
        names = [[m if isinstance(m, str) else m.name for m in g] for g in groups]
        self.chan.op("net", net={"do": "partition", "groups": names})

    def shape(self, *machines, delay_ms=0, jitter_ms=0, loss_pct=0.0, rate_bytes=None, vlan=None):
        """Delay, lose or pace the frames leaving `machines` (all if none); no value: undo."""
        names = [m if isinstance(m, str) else m.name for m in machines]
        shape = dict(delay_ms=int(delay_ms), jitter_ms=int(jitter_ms), loss_pct=float(loss_pct), rate_bytes=rate_bytes)
        self.chan.op("net", net={"do": "shape", "machines": names, "vlan": vlan, "shape": shape})

    def heal(self):
        """Undo every network fault (blocks, the partition, shapes)."""
        self.chan.op("net", net={"do": "heal"})

    def join_all(self):
        """Wait until every machine has stopped."""
        self.chan.op("wait_down", machines=[m.name for m in self.machines])
        for m in self.machines:
            m.booted = False

    @contextlib.contextmanager
    def subtest(self, name):
        """Group the calls made in the block under `name` (a test case of the report)."""
        self.subtests.append(name)
        path = list(self.subtests)
        self.emit(t="subtest", phase="start", path=path)
        start = time.monotonic()
        try:
            yield
        except BaseException as e:
            self.emit(
                t="subtest",
                phase="end",
                path=path,
                secs=time.monotonic() - start,
                ok=False,
                error=f"{type(e).__name__}: {e}",
            )
            raise
        else:
            self.emit(
                t="subtest", phase="end", path=path, secs=time.monotonic() - start, ok=True
            )
        finally:
            self.subtests.pop()

    def serial_stdout_on(self):
        self.emit(t="serial", on=True)

    def serial_stdout_off(self):
        self.emit(t="serial", on=False)

    def unavailable(self, what):
        raise MachineError(f"{what} is not available in drydock")


def _api(retrying=False):
    """Report a call of the script (not the calls inside it) to drydock as it begins (whether
    it retries) and as it ends (its duration and outcome)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            this = args[0]
            if isinstance(this, Machine):
                drv, machine, shown = this.driver, this.name, _shown(args[1:], kwargs)
            else:
                drv, machine, shown = this, None, _shown(args[1:], kwargs)
            if drv.depth > 0:
                return fn(*args, **kwargs)
            call = dict(machine=machine, call=fn.__name__, args=shown)
            drv.emit(t="begin", retrying=retrying, **call)
            drv.depth += 1
            drv.last_exec = None
            start = time.monotonic()
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:
                record = dict(
                    call,
                    secs=time.monotonic() - start,
                    ok=False,
                    error=f"{type(e).__name__}: {e}",
                    exec=drv.last_exec,
                )
                drv.failure = (e, record)
                drv.emit(t="call", **record)
                raise
            finally:
                drv.depth -= 1
            drv.emit(t="call", ok=True, secs=time.monotonic() - start, **call)
            return result

        return wrapper

    return deco


class Machine:
    """One machine of the cluster, as the NixOS test driver's `Machine`."""

    def __init__(self, driver, m):
        self.driver = driver
        self.name = m["name"]
        self.exec_socket = m["exec"]
        self.console = Console(m["console"])
        self.booted = bool(m.get("running"))
        self.systemd = None
        self.out_dir = driver.config.get("out_dir") or os.getcwd()

    def __repr__(self):
        return f"<Machine '{self.name}'>"

    def log(self, msg):
        self.driver.log(msg, self.name)

    @contextlib.contextmanager
    def nested(self, msg, attrs=None):
        self.log(msg)
        yield

    # ---- lifecycle: asked of drydock ----

    def _started(self):
        if not self.booted:
            self.booted = True
        self.console.reset()
        self.systemd = None

    def is_up(self):
        return self.booted

    @_api()
    def start(self, allow_reboot=False):
        """Boot the machine (returns once its backdoor is ready; a running one is left alone)."""
        if self.booted:
            return
        self.driver.chan.op("start", machines=[self.name])
        self._started()

    @_api()
    def shutdown(self):
        """Stop the machine in order (ACPI power button, then QEMU's quit) and wait for it."""
        if not self.booted:
            return
        self.driver.chan.op("shutdown", machine=self.name)
        self.booted = False

    @_api()
    def crash(self):
        """Stop the machine at once, as a power failure."""
        if not self.booted:
            return
        self.driver.chan.op("crash", machine=self.name)
        self.booted = False

    @_api()
    def wait_for_shutdown(self):
        """Wait until the machine has stopped (it powered itself off)."""
        if not self.booted:
            return
        self.driver.chan.op("wait_down", machines=[self.name])
        self.booted = False

    @_api()
    def block(self):
        """Unplug the machine from its VLANs: its frames are dropped at every hub."""
        self.driver.chan.op("block", machine=self.name)

    @_api()
    def unblock(self):
        """Plug it back in."""
        self.driver.chan.op("unblock", machine=self.name)

    def reboot(self):
        self.driver.unavailable(
            f"{self.name}.reboot() (a reboot in a drydock guest ends its VM): use shutdown() and start()"
        )

    # ---- commands: straight to the exec socket ----

    def _exec(self, command, timeout):
        """Run `command` (a shell command line) in the guest: (status, stdout, stderr)."""
        if not self.booted:
            self.start()
        secs = NO_TIMEOUT if timeout is None else max(float(timeout), 0.001)
        req = {"cmd": command, "timeout_ms": int(secs * 1000), "stdin_bytes": 0}
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                s.connect(self.exec_socket)
            except OSError as e:
                raise MachineError(
                    f"{self.name}: its backdoor does not answer ({e.strerror}): "
                    "is it running? (`drydock ps` shows it)"
                ) from None
            s.sendall(json.dumps(req).encode() + b"\n")
            reply = s.makefile("rb").readline()
        finally:
            s.close()
        if not reply:
            raise MachineError(f"{self.name}: the call ended without an answer (did the machine stop?)")
        r = json.loads(reply)
        if r.get("error"):
            raise MachineError(f"{self.name}: {r['error']}")
        out = base64.b64decode(r.get("stdout") or "")
        err = base64.b64decode(r.get("stderr") or "")
        status = r.get("status", 0)
        self.driver.last_exec = dict(
            command=command,
            status=status,
            stdout=_clip(out.decode(errors="replace")),
            stderr=_clip(err.decode(errors="replace")),
        )
        return status, out, err

    @_api()
    def execute(self, command, check_return=True, check_output=True, timeout=900):
        """Run a shell command (with `set -euo pipefail`): (status, stdout). `check_output=False`
        starts it detached and returns (-2, "") at once; `check_return=False` returns -1 as the
        status (and "" if the machine went away under it, as a `poweroff` does)."""
        if not check_output:
            detached = f"setsid sh -c {shlex.quote('set -euo pipefail; ' + command)} </dev/null >/dev/null 2>&1 &"
            self._exec(detached, 30)
            return (-2, "")
        try:
            status, out, _ = self._exec(f"set -euo pipefail; {command}", timeout)
        except MachineError:
            if check_return:
                raise
            return (-1, "")
        self.driver.last_exec["command"] = command
        if not check_return:
            return (-1, out.decode(errors="replace"))
        return (status, out.decode(errors="replace"))

    @_api()
    def succeed(self, *commands, timeout=None):
        """Run each command; raise if one exits non-zero; return their stdout, concatenated."""
        output = ""
        for command in commands:
            status, out = self.execute(command, timeout=timeout)
            if status != 0:
                raise RequestedAssertionFailed(
                    f"command `{command}` failed (exit code {status})"
                )
            output += out
        return output

    @_api()
    def fail(self, *commands, timeout=None):
        """As `succeed`, but each command must exit non-zero."""
        output = ""
        for command in commands:
            status, out = self.execute(command, timeout=timeout)
            if status == 0:
                raise RequestedAssertionFailed(f"command `{command}` unexpectedly succeeded")
            output += out
        return output

    @_api(retrying=True)
    def wait_until_succeeds(self, command, timeout=900):
        """Run the command every second until it exits 0 (its stdout), within `timeout`."""
        output = ""

        def check(_last_try):
            nonlocal output
            status, output = self.execute(command, timeout=timeout)
            return status == 0

        retry(check, timeout)
        return output

    @_api(retrying=True)
    def wait_until_fails(self, command, timeout=900):
        """Run the command every second until it exits non-zero, within `timeout`."""
        output = ""

        def check(_last_try):
            nonlocal output
            status, output = self.execute(command, timeout=timeout)
            return status != 0

        retry(check, timeout)
        return output

    @_api()
    def sleep(self, secs):
        """Sleep in guest time."""
        self.succeed(f"sleep {secs}")

    @_api(retrying=True)
    def wait_for_file(self, filename, timeout=900):
        def check(_last_try):
            status, _ = self.execute(f"test -e {filename}")
            return status == 0

        retry(check, timeout)

    def _port_open(self, addr, port):
        # `nc -z` as the NixOS test driver; busybox's nc has no -z: then a connection that is
        # closed at once stands for it.
        probe = (
            f"nc -z {addr} {port} 2>/dev/null || {{ ! {{ nc -h 2>&1 || true; }} | grep -q -- -z"
            f" && timeout 5 nc -w 2 {addr} {port} </dev/null >/dev/null 2>&1; }}"
        )
        status, _ = self.execute(probe)
        return status == 0

    @_api(retrying=True)
    def wait_for_open_port(self, port, addr="localhost", timeout=900):
        """Wait until something listens on TCP `port` at `addr` (in the guest's view)."""
        retry(lambda _: self._port_open(addr, port), timeout)

    @_api(retrying=True)
    def wait_for_closed_port(self, port, addr="localhost", timeout=900):
        retry(lambda _: not self._port_open(addr, port), timeout)

    @_api(retrying=True)
    def wait_for_open_unix_socket(self, addr, is_datagram=False, timeout=900):
        flags = "-uU" if is_datagram else "-U"

        def check(_last_try):
            status, _ = self.execute(f"nc -z {flags} {addr}")
            return status == 0

        retry(check, timeout)

    # ---- systemd ----

    def _need_systemd(self, what):
        if self.systemd is None:
            status, _ = self.execute("test -d /run/systemd/system")
            self.systemd = status == 0
        if not self.systemd:
            raise MachineError(
                f"{self.name}: {what} needs systemd, and this guest does not run it "
                "(no /run/systemd/system): it has no units to wait for"
            )

    @_api()
    def systemctl(self, q, user=None):
        """`systemctl Q` (as USER with `--user`): (status, output)."""
        self._need_systemd("systemctl")
        if user is not None:
            q = q.replace("'", "\\'")
            return self.execute(
                f"su -l {user} --shell /bin/sh -c "
                "$'XDG_RUNTIME_DIR=/run/user/`id -u` "
                f"systemctl --user {q}'"
            )
        return self.execute(f"systemctl {q}")

    def start_job(self, jobname, user=None):
        return self.systemctl(f"start {jobname}", user)

    def stop_job(self, jobname, user=None):
        return self.systemctl(f"stop {jobname}", user)

    def get_unit_info(self, unit, user=None):
        status, lines = self.systemctl(f'--no-pager show "{unit}"', user)
        if status != 0:
            raise RequestedAssertionFailed(
                f'retrieving systemctl info for unit "{unit}"'
                + ("" if user is None else f' under user "{user}"')
                + f" failed with exit code {status}"
            )
        pattern = re.compile(r"^([^=]+)=(.*)$")
        return dict(
            (m[1], m[2]) for m in map(pattern.match, lines.split("\n")) if m is not None
        )

    def get_unit_property(self, unit, property, user=None):
        status, lines = self.systemctl(
            f'--no-pager show "{unit}" --property="{property}"', user
        )
        if status != 0:
            raise RequestedAssertionFailed(
                f'retrieving systemctl property "{property}" for unit "{unit}"'
                + ("" if user is None else f' under user "{user}"')
                + f" failed with exit code {status}"
            )
        m = re.match(r"^([^=]+)=(.*)$", lines)
        if m is None or m[1] != property:
            raise RequestedAssertionFailed(
                f'systemctl show --property "{property}" "{unit}" produced invalid output: {lines}'
            )
        return m[2]

    @_api(retrying=True)
    def wait_for_unit(self, unit, user=None, timeout=900):
        """Wait until the systemd unit is active; raise if it failed, or is inactive with no
        job pending."""
        self._need_systemd("wait_for_unit")

        def check_active(_last_try):
            state = self.get_unit_property(unit, "ActiveState", user)
            if state == "failed":
                raise RequestedAssertionFailed(f'unit "{unit}" reached state "{state}"')
            if state == "inactive":
                _, jobs = self.systemctl("list-jobs --full 2>&1", user)
                if "No jobs" in jobs:
                    info = self.get_unit_info(unit, user)
                    if info["ActiveState"] == state:
                        raise RequestedAssertionFailed(
                            f'unit "{unit}" is inactive and there are no pending jobs'
                        )
            return state == "active"

        retry(check_active, timeout)

    @_api()
    def require_unit_state(self, unit, require_state="active"):
        state = self.get_unit_info(unit)["ActiveState"]
        if state != require_state:
            raise RequestedAssertionFailed(
                f"Expected unit '{unit}' to to be in state '{require_state}' but it is in state '{state}'"
            )

    # ---- console ----

    @_api(retrying=True)
    def wait_for_console_text(self, regex, timeout=None):
        """Wait until the console lines read since the last such wait match `regex` (the lines
        it reads are consumed, as the driver's queue of console lines)."""
        pattern = re.compile(regex)
        seen = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            line = self.console.next_line()
            if line is not None:
                seen.append(line + "\n")
                if pattern.search("".join(seen)):
                    return
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise RequestedAssertionFailed(
                    f"no console text matched {regex!r} within {timeout} seconds"
                )
            time.sleep(CONSOLE_POLL)

    def get_console_log(self):
        """Everything the machine printed on its console since it booted."""
        return self.console.whole()

    # ---- files ----

    @_api()
    def copy_from_host(self, source, target):
        """Copy a file or directory of the host to `target` in the machine (its folder made)."""
        parent = os.path.dirname(target.rstrip("/")) or "/"
        self.succeed(make_command(["mkdir", "-p", parent]))
        self.driver.chan.op(
            "copy_to", machine=self.name, source=os.path.abspath(source), target=target
        )

    def copy_from_host_via_shell(self, source, target):
        return self.copy_from_host(source, target)

    @_api()
    def copy_from_machine(self, source, target_dir=""):
        """Copy a file or directory of the machine into `$out/TARGET_DIR` on the host (`$out`:
        the environment's, else the current directory)."""
        dest = os.path.join(self.out_dir, target_dir)
        os.makedirs(dest, exist_ok=True)
        self.driver.chan.op(
            "copy_from", machine=self.name, source=source, target=os.path.abspath(dest)
        )

    def copy_from_vm(self, source, target_dir=""):
        return self.copy_from_machine(source, target_dir)

    # ---- interactive ----

    def shell_interact(self, address=None):
        """drydock's `shell` on this machine, on the terminal (for writing tests, not for CI)."""
        try:
            tty = open("/dev/tty", "rb+", buffering=0)
        except OSError:
            raise MachineError("shell_interact() needs a terminal") from None
        with tty:
            try:
                subprocess.run(
                    self.driver.config["shell"] + [self.name],
                    stdin=tty,
                    stdout=tty,
                    stderr=tty,
                )
            except KeyboardInterrupt:
                pass

    # ---- what a drydock machine does not have ----

    def _no_display(self, what):
        raise MachineError(
            f"{self.name}.{what}() is not available: drydock machines have no display "
            "(no screen, keyboard or mouse)"
        )

    def screenshot(self, filename):
        self._no_display("screenshot")

    def send_key(self, key, delay=0.01, log=True):
        self._no_display("send_key")

    def send_chars(self, chars, delay=0.01):
        self._no_display("send_chars")

    def get_screen_text(self):
        self._no_display("get_screen_text")

    def get_screen_text_variants(self):
        self._no_display("get_screen_text_variants")

    def wait_for_text(self, regex, timeout=900):
        self._no_display("wait_for_text")

    def wait_for_x(self, timeout=900):
        self._no_display("wait_for_x")

    def get_window_names(self):
        self._no_display("get_window_names")

    def wait_for_window(self, regexp, timeout=900):
        self._no_display("wait_for_window")

    def get_tty_text(self, tty):
        self._no_display("get_tty_text")

    def wait_until_tty_matches(self, tty, regexp, timeout=900):
        self._no_display("wait_until_tty_matches")

    def dump_tty_contents(self, tty):
        self._no_display("dump_tty_contents")

    def send_monitor_command(self, command):
        self.driver.unavailable(f"{self.name}.send_monitor_command() (drydock keeps QEMU's monitor)")

    def forward_port(self, host_port=8080, guest_port=80):
        self.driver.unavailable(f"{self.name}.forward_port() (machines are on private VLANs only)")

    def send_console(self, chars):
        self.driver.unavailable(f"{self.name}.send_console() (the console is output only)")

    def console_interact(self):
        self.driver.unavailable(f"{self.name}.console_interact(): use shell_interact()")


class Output:
    """The script's `sys.stdout` and `sys.stderr`: each line goes to drydock, which prints it in
    order with the calls (its children's output goes to drydock's standard error directly)."""

    def __init__(self, chan, name):
        self.chan = chan
        self.name = name
        self.buf = ""
        self.encoding = "utf-8"
        self.errors = "replace"

    def write(self, text):
        self.buf += str(text)
        if "\n" in self.buf:
            lines, self.buf = self.buf.rsplit("\n", 1)
            self.chan.send(dict(t="out", text=lines + "\n"))
        return len(text)

    def flush(self):
        if self.buf:
            self.chan.send(dict(t="out", text=self.buf))
            self.buf = ""

    def isatty(self):
        return False

    def fileno(self):
        return 2 if self.name == "stderr" else 1

    def writable(self):
        return True


class Log:
    """`log`: messages into drydock's output."""

    def __init__(self, driver):
        self.driver = driver

    def log(self, message, attributes=None):
        self.driver.log(message)

    info = warning = error = log

    @contextlib.contextmanager
    def nested(self, message, attributes=None):
        self.driver.log(message)
        yield


def symbols(drv):
    """The names a script sees, as the NixOS test driver's `test_symbols`."""
    api = _api()
    g = dict(
        __name__="__main__",
        start_all=api(Driver.start_all).__get__(drv),
        join_all=api(Driver.join_all).__get__(drv),
        partition=api(Driver.partition).__get__(drv),
        shape=api(Driver.shape).__get__(drv),
        heal=api(Driver.heal).__get__(drv),
        subtest=drv.subtest,
        retry=retry,
        t=AssertionTester(),
        machines=drv.machines,
        machines_qemu=drv.machines,
        driver=drv,
        log=Log(drv),
        os=os,
        serial_stdout_on=drv.serial_stdout_on,
        serial_stdout_off=drv.serial_stdout_off,
        RequestedAssertionFailed=RequestedAssertionFailed,
        MachineError=MachineError,
    )
    for name in ("polling_condition", "create_machine"):
        g[name] = functools.partial(drv.unavailable, f"{name}()")
    for m in drv.machines:
        g[pythonize_name(m.name)] = m
    if len(drv.machines) == 1:
        g["machine"] = drv.machines[0]
    return g


def read_script(path, label):
    with open(path, "rb") as f:
        source = f.read().decode("utf-8", errors="replace")
    # Tracebacks show the script's lines under its label (the label need not be a file).
    lines = source.splitlines(True)
    linecache.cache[label] = (len(source), None, lines, label)
    return source


def check(path, label):
    """`--check`: compile the script; print {"ok": true} or {"error": {...}} on stdout."""
    try:
        compile(read_script(path, label), label, "exec")
    except SyntaxError as e:
        print(
            json.dumps(
                {
                    "error": {
                        "type": type(e).__name__,
                        "message": e.msg,
                        "file": e.filename or label,
                        "line": e.lineno,
                        "offset": e.offset,
                        "text": (e.text or "").rstrip("\n"),
                    }
                }
            )
        )
        return
    except (OSError, ValueError) as e:
        print(json.dumps({"error": {"type": type(e).__name__, "message": str(e), "file": label}}))
        return
    print(json.dumps({"ok": True}))


def failure(drv, exc, label, source):
    """What the report says of the exception that ended the script."""
    lines = source.splitlines()
    frames = []
    for f in traceback.extract_tb(exc.__traceback__):
        if f.filename == label and f.lineno:
            text = lines[f.lineno - 1].strip() if f.lineno <= len(lines) else ""
            frames.append(dict(line=f.lineno, function=f.name, text=text))
    call = drv.failure[1] if drv.failure and drv.failure[0] is exc else None
    return dict(
        type=type(exc).__name__,
        message=str(exc),
        frames=frames,
        call=call,
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    )


def run():
    # drydock handles Ctrl-C (it stops what it started, then this process).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    chan = Channel(os.dup(0))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # The script's output (and its children's) goes to drydock's standard error.
    os.dup2(2, 1)
    config = chan.receive()
    sys.stdout = Output(chan, "stdout")
    sys.stderr = Output(chan, "stderr")
    label = config["label"]
    source = read_script(config["script"], label)
    drv = Driver(chan, config)
    try:
        code = compile(source, label, "exec")
        exec(code, symbols(drv))
    except SystemExit as e:
        if e.code not in (None, 0):
            return finish(drv, failure(drv, e, label, source))
    except BaseException as e:
        return finish(drv, failure(drv, e, label, source))
    return finish(drv, None)


def finish(drv, error):
    """Say how the script ended (its last output first); the exit status."""
    for out in (sys.stdout, sys.stderr):
        if isinstance(out, Output):
            out.flush()
    drv.emit(t="end", ok=error is None, error=error)
    return 0 if error is None else 1


def main():
    if sys.version_info < (3, 9):
        print(json.dumps({"error": {"type": "Python", "message": f"Python {sys.version.split()[0]} is too old: drydock's test driver needs 3.9 or newer"}}))
        return 2
    if len(sys.argv) == 4 and sys.argv[1] == "--check":
        check(sys.argv[2], sys.argv[3])
        return 0
    if len(sys.argv) == 2 and sys.argv[1] == "--version-check":
        print(json.dumps({"ok": True}))
        return 0
    return run()


if __name__ == "__main__":
    sys.exit(main())
