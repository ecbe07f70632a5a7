# The systemd flavour of drydock's nixos-test node: nixos-node.nix with `init = "systemd"`
# imports this file for its toplevel. Everything before stage 2 is the node's own (the fstab,
# stage 1 in the initrd, switch_root into the ext4 `/`); from stage 2 on, Debian's systemd
# (fetched by fetch-systemd, put into the store here with builtins.path like the kernel) is
# PID 1, with the node's services as real units, as on a NixOS test node:
#
#   - stage 2 (TOPLEVEL/init, busybox): the regInfo= check, then `activate` (the root's /usr
#     and /etc from the system, the hostname, the activation snippet, /run/current-system),
#     then `exec` systemd
#   - the units (TOPLEVEL/etc/systemd/system, linked into /etc as NixOS does): Debian's
#     targets and journald (volatile, forwarded to the console), network-setup.service
#     (NICs by MAC, addresses), udhcpc.service (DHCP on eth0), httpd.service, app.service
#     (the `services` snippet), one unit per `units` entry, backdoor.service (the root shell
#     on hvc0, as NixOS's test-instrumentation) and drydock-ready.service; no udev, no getty,
#     no logind, no D-Bus
#   - bin/switch-to-configuration test: what NixOS's does, in shell: units removed are
#     stopped, `activate`, `systemctl daemon-reload`, units whose file changed are restarted,
#     new ones started
#
# The binaries are Debian's, dynamically linked: their program interpreter is
# /lib64/ld-linux-x86-64.so.2 and the loader looks for libraries in /lib/x86_64-linux-gnu and
# /usr/lib/x86_64-linux-gnu (systemd's own under the RUNPATH /usr/lib/x86_64-linux-gnu/systemd).
# So the root's /usr is a link to the system's `sw` (busybox's applets and systemd's tools in
# bin, Debian's lib and lib64), and /bin, /sbin, /lib and /lib64 are links into it (a merged
# /usr, as Debian's): every path the binaries name resolves into the store. No binary is
# patched.
#
# scripts/guest/README.md ("The systemd flavour") documents it.
{ build             # system.nix's derivation helper
, busybox           # the guest's busybox
, systemd           # absolute host path of fetch-systemd's output (CACHE/systemd)
, system            # "x86_64-linux"
, hostName
, nodeNumber
, fstab             # /etc/fstab's text
, hosts             # /etc/hosts's text
, nics              # "V MAC" lines
, dhcpScript        # udhcpc's script (text)
, stage2Prelude     # shell: the start of stage 2 (API file systems, console, markers)
, regInfoCheck      # shell: the regInfo= check (uses $systemConfig)
, nicSetup          # shell: the NICs renamed and addressed (reads the file $nics)
, services          # shell: app.service's script ("" = no app.service)
, www               # httpd's page ("" = "hello from HOSTNAME")
, units             # name -> script or { script, type, after, wants, wantedBy, ... }
, activation        # shell run by activate
, backdoorRevision
, variantDrv        # "" or the variant's store path
, kernelParams
, kernelFile
, initrdDrv
}:
let
  inherit (builtins) attrNames concatStringsSep elem isAttrs isString listToAttrs map match
    replaceStrings readFile throw;

  version = replaceStrings [ "\n" ] [ "" ] (readFile (systemd + "/version"));
  # Store path names allow [A-Za-z0-9+._?=-]: Debian versions may hold ~ and :.
  storeVersion = replaceStrings [ "~" ":" ] [ "_" "_" ] version;
  debian = builtins.path {
    path = systemd + "/root";
    name = "drydock-debian-systemd-${storeVersion}";
  };

  # The system's software, which the root's /usr links to: busybox's applets and systemd's
  # tools in bin (systemctl also as halt, poweroff, reboot and shutdown: busybox's would signal
  # PID 1 as busybox's init expects), sbin a link to bin, Debian's lib and lib64.
  sw = build "drydock-sw-systemd" { inherit busybox debian; } ''
    set -e
    mkdir -p $out/bin
    for a in $busybox/bin/*; do ln -s "$a" "$out/bin/''${a##*/}"; done
    for b in $debian/usr/bin/*; do ln -sfn "$b" "$out/bin/''${b##*/}"; done
    for b in halt poweroff reboot shutdown; do ln -sfn $debian/usr/bin/systemctl "$out/bin/$b"; done
    ln -s bin $out/sbin
    ln -s $debian/usr/lib $out/lib
    ln -s $debian/usr/lib64 $out/lib64
  '';

  # What a unit's processes find on PATH (the running system's, as NixOS units do, then busybox).
  unitPath = "/run/current-system/sw/bin:${busybox}/bin";

  # A unit file's lines, the empty ones left out.
  lines = ls: concatStringsSep "\n" (builtins.filter (l: l != "") ls) + "\n";

  # A script of its own store path, so a unit's file changes only when its script does.
  script = name: text: build "drydock-unit-script-${name}" {
    text = ''
      #!${busybox}/bin/sh
      set -e
    '' + text;
  } ''
    printf '%s\n' "$text" > $out
    chmod 0555 $out
  '';

  # The built-in units' names: `units` may not take them (nor systemd-*, Debian's).
  builtinNames = [ "network-setup" "udhcpc" "httpd" "app" "backdoor" "drydock-ready" ];

  # A unit entry of `units`: a script (Type=simple) or its settings.
  userUnit = name: v:
    let
      u = if isString v then { script = v; } else v;
      type = u.type or "simple";
    in
    if match "[A-Za-z0-9:_.-]+" name == null then
      throw "nixos-node.nix: units.${name}: a unit name is [A-Za-z0-9:_.-]+"
    else if elem name builtinNames then
      throw "nixos-node.nix: units.${name}: ${name}.service is one of the node's own units"
    else if builtins.substring 0 8 name == "systemd-" then
      throw "nixos-node.nix: units.${name}: names starting with systemd- are systemd's"
    else if !(isAttrs u) || !(u ? script) then
      throw "nixos-node.nix: units.${name} is a script or { script = ...; ... }"
    else if !(elem type [ "simple" "exec" "oneshot" "forking" "notify" ]) then
      throw "nixos-node.nix: units.${name}.type ${type} is not one of simple, exec, oneshot, forking, notify"
    else {
      inherit name;
      wantedBy = u.wantedBy or [ "multi-user.target" ];
      text = lines ([
        "[Unit]"
        "Description=${u.description or "${name} (drydock test unit)"}"
        "After=${concatStringsSep " " (u.after or [ "network.target" ])}"
      ] ++ (if (u.wants or [ ]) == [ ] then [ ] else [ "Wants=${concatStringsSep " " u.wants}" ])
        ++ [ (u.unitConfig or "") "\n[Service]" "Type=${type}" ]
        ++ (if u.remainAfterExit or (type == "oneshot") then [ "RemainAfterExit=yes" ] else [ ])
        ++ [ "Environment=PATH=${unitPath}" "ExecStart=${script name u.script}" (u.serviceConfig or "") ]);
    };

  wwwDrv = build "drydock-www" {
    page = if www == "" then "hello from ${hostName}" else www;
  } ''
    mkdir -p $out && printf '%s\n' "$page" > $out/index.html
  '';

  dhcpScriptDrv = build "drydock-dhcp-script" { text = dhcpScript; } ''
    printf '%s' "$text" > $out && chmod 0555 $out
  '';

  # network-setup.service's script: the node's NIC setup, then the markers for eth0.
  networkSetup = script "network-setup" ''
    export PATH=${busybox}/bin
    nics=${builtins.toFile "drydock-nics" (nics + "\n")}
    exec >/dev/console 2>&1
    set +e
    ${nicSetup}
    [ -e /sys/class/net/eth0 ] || echo "DRYDOCK-NIC-MISSING: eth0 (QEMU's user-mode network)"
    exit 0
  '';

  # The backdoor, as test-instrumentation.nix's backdoor.service: a root shell reading commands
  # from hvc0. Its store path (so the unit's file) changes with backdoorRevision.
  backdoor = build "drydock-backdoor" {
    inherit backdoorRevision;
    text = ''
      #!${busybox}/bin/sh
      # drydock nixos-test node (systemd): the backdoor, revision @revision@
      export PATH=${unitPath}
      export HOME=/root USER=root PAGER= SYSTEMD_PAGER= SYSTEMD_COLORS=0
      if [ ! -c /dev/hvc0 ]; then echo "DRYDOCK-BACKDOOR: no /dev/hvc0" > /dev/console; exit 1; fi
      mkdir -p /root
      cd /tmp
      # Open first, then set the mode: the hvc driver resets a console's termios when its last
      # user closes it (test-instrumentation does it so too, stty after exec).
      exec </dev/hvc0 >/dev/hvc0 2>/dev/console
      stty raw -echo
      echo "Spawning backdoor root shell..."
      exec sh /dev/hvc0
    '';
  } ''
    printf '%s' "$text" | sed -e "s|@revision@|$backdoorRevision|g" > $out
    chmod 0555 $out
  '';

  readyScript = script "drydock-ready" ''
    read -r up rest < /proc/uptime
    echo "DRYDOCK-READY (multi-user.target reached, uptime ''${up}s)" > /dev/console
  '';

  # The node's own units (name, what wants it, text).
  ownUnits = [
    {
      name = "network-setup";
      wantedBy = [ "network.target" "multi-user.target" ];
      # As NixOS's scripted networking's network-setup.service.
      text = ''
        [Unit]
        Description=Networking Setup (NICs by MAC, static addresses)
        DefaultDependencies=no
        After=network-pre.target
        Before=network.target shutdown.target
        Wants=network.target
        Conflicts=shutdown.target

        [Service]
        Type=oneshot
        RemainAfterExit=yes
        ExecStart=${networkSetup}
      '';
    }
    {
      name = "udhcpc";
      wantedBy = [ "multi-user.target" ];
      text = ''
        [Unit]
        Description=DHCP client on eth0 (busybox udhcpc)
        After=network-setup.service
        Before=network-online.target
        ConditionPathExists=/sys/class/net/eth0

        [Service]
        Type=simple
        ExecStart=${busybox}/bin/udhcpc -f -i eth0 -s ${dhcpScriptDrv} -t 10 -T 1 -A 1
      '';
    }
    {
      name = "httpd";
      wantedBy = [ "multi-user.target" ];
      text = ''
        [Unit]
        Description=Web server on port 80 (busybox httpd)
        After=network.target

        [Service]
        Type=simple
        ExecStart=${busybox}/bin/httpd -f -p 80 -h ${wwwDrv}
      '';
    }
    {
      name = "backdoor";
      wantedBy = [ "multi-user.target" ];
      text = ''
        [Unit]
        Description=Backdoor root shell on hvc0 (as NixOS's test-instrumentation)

        [Service]
        Type=simple
        ExecStart=${backdoor}
        KillSignal=SIGHUP
      '';
    }
    {
      name = "drydock-ready";
      wantedBy = [ "multi-user.target" ];
      text = ''
        [Unit]
        Description=Say DRYDOCK-READY on the console once multi-user.target is reached
        After=multi-user.target

        [Service]
        Type=oneshot
        ExecStart=${readyScript}
      '';
    }
  ] ++ (if services == "" then [ ] else [{
    name = "app";
    wantedBy = [ "multi-user.target" ];
    text = ''
      [Unit]
      Description=The node's services snippet
      After=network.target

      [Service]
      Type=simple
      Environment=PATH=${unitPath}
      ExecStart=${script "app" services}
    '';
  }]) ++ map (n: userUnit n units.${n}) (attrNames units);

  # Debian's units, as they are: the targets boot and shutdown go through, the journal's
  # sockets, the services behind poweroff, reboot and halt.
  upstreamUnits = [
    "basic.target" "sysinit.target" "local-fs.target" "local-fs-pre.target" "sockets.target"
    "timers.target" "paths.target" "slices.target" "swap.target" "multi-user.target"
    "network.target" "network-pre.target" "network-online.target" "emergency.target"
    "rescue.target" "shutdown.target" "umount.target" "final.target" "poweroff.target"
    "reboot.target" "halt.target" "systemd-poweroff.service" "systemd-reboot.service"
    "systemd-halt.service" "systemd-journald.socket" "systemd-journald-dev-log.socket"
  ];

  # A here-document per unit: its text in a file of that name.
  unitFiles = concatStringsSep "\n" (map (u: ''
    cat > $out/${u.name}.service <<'DRYDOCK_UNIT_END'
    ${u.text}
    DRYDOCK_UNIT_END
    ${concatStringsSep "\n" (map (t: "mkdir -p $out/${t}.wants && ln -s ../${u.name}.service $out/${t}.wants/") u.wantedBy)}
  '') ownUnits);

  unitsDrv = build "drydock-units" { inherit debian; } ''
    set -e
    mkdir -p $out/sysinit.target.wants $out/sockets.target.wants
    for u in ${concatStringsSep " " upstreamUnits}; do cp $debian/units/$u $out/$u; done
    # journald, as Debian's unit says, without the audit socket (nothing reads the kernel's
    # audit messages here) and from the store.
    sed -e 's/ systemd-journald-audit\.socket//g' -e '/^Before=sysinit.target$/d' \
        -e "s|=/lib/systemd/systemd-journald|=$debian/usr/lib/systemd/systemd-journald|" \
        $debian/units/systemd-journald.service > $out/systemd-journald.service
    ln -s ../systemd-journald.service $out/sysinit.target.wants/
    ln -s ../systemd-journald.socket ../systemd-journald-dev-log.socket $out/sockets.target.wants/
    ln -s multi-user.target $out/default.target
    ln -s reboot.target $out/ctrl-alt-del.target
    ${unitFiles}
  '';

  # /etc as NixOS keeps it: TOPLEVEL/etc links to a store path's etc; activate links each entry.
  etc = build "drydock-etc" {
    inherit fstab hostName hosts;
    units = unitsDrv;
    # test-instrumentation: journald forwards everything to the console. Nothing persists.
    journald = ''
      [Journal]
      Storage=volatile
      ForwardToConsole=yes
      MaxLevelConsole=info
    '';
    # A stop that hangs is cut short after 10 s (NixOS's default is 90 s: tests restart units).
    systemConf = ''
      [Manager]
      DefaultTimeoutStopSec=10s
      DefaultEnvironment=PATH=${unitPath}
    '';
    osRelease = ''
      NAME="drydock test node"
      ID=drydock
      PRETTY_NAME="drydock nixos-test node (Debian systemd ${version})"
    '';
    passwd = ''
      root:x:0:0:System administrator:/root:/bin/sh
      nobody:x:65534:65534:Unprivileged account:/var/empty:/bin/false
    '';
    group = ''
      root:x:0:
      nogroup:x:65534:
    '';
  } ''
    set -e
    mkdir -p $out/etc/systemd
    printf '%s' "$fstab" > $out/etc/fstab
    printf '%s' "$hosts" > $out/etc/hosts
    printf '%s\n' "$hostName" > $out/etc/hostname
    printf '%s' "$osRelease" > $out/etc/os-release
    printf '%s' "$passwd" > $out/etc/passwd
    printf '%s' "$group" > $out/etc/group
    ln -s $units $out/etc/systemd/system
    printf '%s' "$journald" > $out/etc/systemd/journald.conf
    printf '%s' "$systemConf" > $out/etc/systemd/system.conf
  '';

  stage2 = ''
    #!${busybox}/bin/sh
    # drydock nixos-test node (systemd), stage 2: PID 1 after stage 1's switch_root; activates
    # the system, then execs systemd.
    export PATH=${busybox}/bin
    systemConfig=@out@

    ${stage2Prelude}
    ${regInfoCheck}

    "$systemConfig/activate" || echo "DRYDOCK-ACTIVATION-FAILED"
    init="$systemConfig/systemd/usr/lib/systemd/systemd"
    if [ ! -e /lib64/ld-linux-x86-64.so.2 ] || [ ! -x "$init" ]; then
      echo "DRYDOCK-STAGE2-FAIL: no /lib64/ld-linux-x86-64.so.2 or no $init"
      poweroff -f
    fi
    echo "DRYDOCK-SYSTEMD: exec $init"
    exec "$init"
  '';

  # Activation (at boot before systemd, and by switch-to-configuration): the root's /usr and
  # its merged-/usr links, /etc's entries linked to the system's, the hostname, the activation
  # snippet, /run/current-system.
  activate = ''
    #!${busybox}/bin/sh
    export PATH=${busybox}/bin
    systemConfig=@out@
    mkdir -p /etc /root /var /srv /run/drydock

    # /usr is the system's sw; /bin, /sbin, /lib, /lib64 link into it. A directory of the same
    # name (not made here) is left alone, and said so.
    link() { # TARGET NAME
      [ "$(readlink "$2")" = "$1" ] && return 0
      if [ -e "$2" ] && [ ! -L "$2" ]; then
        echo "activate: $2 is not a link; left alone" >&2
        return 0
      fi
      ln -sfn "$1" "$2"
    }
    link "$(readlink "$systemConfig/sw")" /usr
    for d in bin sbin lib lib64; do link "usr/$d" "/$d"; done

    # /etc: each entry of the system's etc, linked; links into an older system's etc that this
    # one lacks, removed.
    for f in "$systemConfig"/etc/*; do link "$systemConfig/etc/''${f##*/}" "/etc/''${f##*/}"; done
    for l in /etc/*; do
      [ -L "$l" ] || continue
      case "$(readlink "$l")" in
        /nix/store/*-drydock-test-system/etc/*) [ -e "$systemConfig/etc/''${l##*/}" ] || rm -f "$l" ;;
      esac
    done
    link ../proc/self/mounts /etc/mtab
    link ../run /var/run
    # A machine id of its own, made once (else systemd would make a transient one at every
    # boot and bind-mount it over /etc/machine-id).
    if [ ! -s /etc/machine-id ]; then
      head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > /etc/machine-id.tmp
      echo >> /etc/machine-id.tmp
      mv /etc/machine-id.tmp /etc/machine-id
    fi
    hostname "$(cat "$systemConfig/etc/hostname")"
    machine="$(hostname)"
    cd /
    if ! ( :
      ${activation}
    ); then
      echo "activation of $systemConfig failed" >&2
      exit 1
    fi
    ln -sfn "$systemConfig" /run/current-system
  '';

  # switch-to-configuration test, as NixOS's in spirit: units whose file is gone are stopped
  # (before the activation, while their file is still there), `activate`, `systemctl
  # daemon-reload`, units whose file changed restarted if they run (backdoor.service too: a
  # switch running inside its cgroup dies with it, one in a unit of its own goes on), new units
  # that a target wants started. Exit status as NixOS's: 2 when the activation failed, 4 when
  # a unit failed.
  switchToConfiguration = ''
    #!${busybox}/bin/sh
    export PATH=${sw}/bin
    systemConfig=@out@
    case "$1" in
      test) ;;
      *) echo "usage: switch-to-configuration test" >&2; exit 2 ;;
    esac
    if [ ! -d /run/systemd/system ]; then
      echo "switch-to-configuration: systemd is not running" >&2
      exit 1
    fi
    old="$(readlink -f /etc/systemd/system)"
    new="$(readlink -f "$systemConfig/etc/systemd/system")"
    echo "activating $systemConfig"

    state() { systemctl show -p ActiveState --value "$1" 2>/dev/null; }
    runs() { case "$(state "$1")" in active|activating|reloading) return 0 ;; esac; return 1; }
    wanted() { for w in "$new"/*.wants/"$1"; do [ -e "$w" ] && return 0; done; return 1; }
    stop=""; restart=""; start=""
    for u in $( (ls "$old"; ls "$new") | grep '\.service$' | sort -u); do
      if [ ! -e "$new/$u" ]; then
        runs "$u" && stop="$stop $u"
      elif [ ! -e "$old/$u" ]; then
        wanted "$u" && start="$start $u"
      elif ! cmp -s "$old/$u" "$new/$u"; then
        runs "$u" && restart="$restart $u"
      fi
    done
    say() { echo "$1 the following units: $(echo $2 | sed 's/ /, /g')"; }

    rc=0
    if [ -n "$stop" ]; then say stopping "$stop"; systemctl stop $stop || rc=4; fi
    "$systemConfig/activate" || rc=2
    systemctl daemon-reload || rc=1
    if [ -n "$restart" ]; then say restarting "$restart"; systemctl restart $restart || rc=4; fi
    if [ -n "$start" ]; then say starting "$start"; systemctl start $start || rc=4; fi
    failed="$(systemctl list-units --state=failed --no-legend --plain | awk '{ print $1 }')"
    if [ -n "$failed" ]; then
      echo "warning: the following units failed: $(echo $failed | sed 's/ /, /g')"
      [ "$rc" = 0 ] && rc=4
    fi
    exit "$rc"
  '';

  toplevel = build "drydock-test-system" {
    inherit kernelParams stage2 activate switchToConfiguration nics backdoorRevision;
    kernel = kernelFile;
    initrd = initrdDrv;
    inherit sw etc backdoor debian;
    variant = variantDrv;
  } ''
    set -e
    mkdir -p $out/bin
    ln -s $kernel $out/kernel
    ln -s $initrd $out/initrd
    ln -s $sw $out/sw
    ln -s $etc/etc $out/etc
    ln -s $backdoor $out/backdoor
    ln -s $debian $out/systemd
    printf '%s' "$kernelParams" > $out/kernel-params
    printf '%s' "$system" > $out/system
    printf '%s\n' "$nics" > $out/nics
    printf '%s\n' systemd > $out/init-system
    printf '%s' "$stage2" | sed "s|@out@|$out|g" > $out/init
    printf '%s' "$activate" | sed "s|@out@|$out|g" > $out/activate
    printf '%s' "$switchToConfiguration" | sed "s|@out@|$out|g" > $out/bin/switch-to-configuration
    chmod 0555 $out/init $out/activate $out/bin/switch-to-configuration
    if [ -n "$variant" ]; then ln -s $variant $out/variant; fi
  '';
in
{
  inherit toplevel sw debian;
  units = unitsDrv;
}
