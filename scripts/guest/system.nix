# drydock test system: a NixOS-shaped "toplevel" built with plain
# `derivation` (no nixpkgs). build-test-system builds it with the arguments
# below; a composition (examples/cluster) imports it.
#
# Every builder is the host's static busybox, brought into the store as a
# source: nothing of the host is needed inside Nix's sandbox (no
# `sandbox-paths`), and no derivation asks a binary cache for its output
# (`allowSubstitutes = false`: nothing built here is in one).
#
# Attributes:
#   toplevel  /nix/store/...-drydock-test-system with
#               kernel         -> the kernel image (store path)
#               initrd         -> the stage-1 initrd (store path)
#               init           stage-2 script, run by the store's busybox
#               kernel-params  e.g. "console=ttyS0 panic=-1 quiet loglevel=4"
#               sw             -> busybox (bin/busybox + applet symlinks)
#               system         "x86_64-linux"
#               variant        -> variant marker (only if variant != "")
#               activate       (re)starts a cluster machine's services from this system
#               backdoor       a cluster machine's backdoor root shell on hvc0, in a session
#                              of its own (started by stage 2; restarted by `activate`)
#               backdoor-revision
#                              backdoorRevision (only if it is not "")
#               bin/switch-to-configuration
#                              `switch-to-configuration test` activates this system in a
#                              running guest (hot reload), as NixOS's does in spirit
#   outside   /nix/store/...-drydock-not-in-closure: built into the same
#             store but NOT referenced by toplevel, to check that paths
#             outside the closure stay invisible to the guest.
#   busybox   the guest's busybox (what `sw` points to)
#   binPath   the PATH of the services, the activation and the backdoor (busybox, then `packages`)
#   build, kernelFile, switchToConfiguration  the derivation helper, the kernel's store path
#             and switch-to-configuration's text, for variants (nixos-node.nix)
{ kernel                # absolute host path of the kernel image
, kernelVersion ? "unknown"
, kernelFormat ? "bzImage"  # or "vmlinux" (uncompressed ELF, PVH entry)
, initrd                # absolute host path of the stage-1 initrd
, variant ? ""          # non-empty: adds a harmless difference to the closure
, kernelParams ? "console=ttyS0 panic=-1 quiet loglevel=4"
, services ? ""         # shell run in the background once a cluster machine's network is up
, packages ? [ ]        # store paths (derivations) whose bin/ the services, the activation and
                        # the backdoor shell find on PATH, after busybox's (etcd.nix)
, www ? ""              # the web page the machine serves (default: "hello from MACHINE")
, activation ? ""       # shell run at each activation, before the services; failing fails it
, backdoorRevision ? ""  # the backdoor's revision: a switch to a system whose revision differs
                         # from the running backdoor's restarts the backdoor (as systemd restarts
                         # a changed unit), killing every process of its session
, firewall ? null      # NixOS's networking.firewall (nftables), e.g. { allowedTCPPorts = [ 7000 ]; }:
                        # applied by each activation (firewall.nix); null: no firewall, and the
                        # scripts are what they were before the argument existed
, nft ? null           # with a firewall: the directory fetch-nft prints (CACHE/nft): Debian's nft
                        # and the kernel's netfilter modules
, hostBusybox ? "/bin/busybox"  # absolute host path of a static busybox (Debian: busybox-static)
}:
let
  system = "x86_64-linux";

  # The builders' busybox. Nix starts a builder with argv[0] set to the builder's file name,
  # and busybox picks its applet by argv[0]: a store file would be named HASH-..., which is no
  # applet. So the import is a directory holding just one file named `busybox` (the directory
  # that really holds it, filtered), and every builder is `DIR/busybox sh -c SCRIPT`.
  # builtins.path stores a symbolic link as a link (which would dangle in the sandbox), and
  # Nix 2.8 cannot read one: a directory that is a link is refused, except a merged /usr's
  # /bin and /sbin, which are links into /usr.
  builder =
    let
      host = toString hostBusybox;  # a string: a path interpolated below would be copied whole
      file = baseNameOf host;
      given = dirOf host;
      typeIn = dir: name: (builtins.readDir dir).${name} or "missing";
      isDir = dir: dir == "/" || typeIn (dirOf dir) (baseNameOf dir) == "directory";
      dir =
        if isDir given then given
        else if builtins.elem given [ "/bin" "/sbin" ] && isDir "/usr${given}" then "/usr${given}"
        else throw "drydock's test system: ${given} (holding ${host}) is a symbolic link; pass hostBusybox = the real path of a static busybox";
      found = typeIn dir file;
    in
    if builtins.substring 0 1 host != "/" then
      throw "drydock's test system: hostBusybox must be an absolute path, not ${host}"
    else if found != "regular" then
      throw "drydock's test system needs a static busybox at ${host} (${dir}/${file} is ${found}): install busybox-static (scripts/setup does)"
    else
      builtins.path {
        path = dir;
        name = "drydock-builder-busybox";
        filter = path: type: dirOf path == dir && baseNameOf path == file;
      } + "/${file}";

  # A derivation of `script`, run by the builders' busybox `sh` in the sandbox (whose applets
  # need no PATH: Debian's static busybox runs its own applets first).
  build = name: attrs: script: derivation ({
    inherit name system;
    builder = "${builder}";
    args = [ "sh" "-c" script ];
    allowSubstitutes = false;
    preferLocalBuild = true;
  } // attrs);

  busybox = build "drydock-busybox" { } ''
    set -e
    mkdir -p $out/bin
    cp ${builder} $out/bin/busybox
    chmod 0555 $out/bin/busybox
    cd $out/bin
    for a in $(./busybox --list); do
      [ "$a" = busybox ] || ln -s busybox "$a"
    done
  '';

  # The firewall (firewall.nix): its nft joins the packages, its start script runs first in
  # each activation.
  fw =
    if firewall == null then null
    else if nft == null then
      throw "drydock's test system: a firewall needs nft = the directory scripts/guest/fetch-nft prints (CACHE/nft)"
    else import ./firewall.nix {
      inherit build busybox kernelVersion;
      nft = toString nft;
      config = firewall;
    };

  # The PATH of a cluster machine's services, activation and backdoor: busybox's applets first,
  # then each package's bin/ (the firewall's nft last). Without packages it is busybox's alone
  # (the scripts' text, so the system's hash, is what it was before `packages` existed).
  binPath = "${busybox}/bin" + builtins.concatStringsSep ""
    (map (p: ":${p}/bin") (packages ++ (if fw == null then [ ] else [ fw.package ])));

  kernelFile = builtins.path {
    path = kernel;
    name = (if kernelFormat == "vmlinux" then "drydock-vmlinux-" else "drydock-kernel-")
      + kernelVersion;
  };

  initrdFile = builtins.path {
    path = initrd;
    name = "drydock-initrd-${kernelVersion}";
  };

  variantDrv = build "drydock-variant-${variant}" { inherit variant; } ''
    mkdir -p $out && printf '%s\n' "$variant" > $out/name
  '';

  outside = build "drydock-not-in-closure" { } ''
    mkdir -p $out
    echo "DRYDOCK-OUTSIDE: this store path is not in the test system's closure" > $out/README
  '';

  stage2 = ''
    #!${busybox}/bin/sh
    # drydock test system, stage 2 (PID 1, exec'd by stage 1).
    export PATH=${busybox}/bin
    systemConfig=@out@
    set -f

    grep -q ' /proc ' /proc/mounts 2>/dev/null || mount -t proc proc /proc
    grep -q ' /sys ' /proc/mounts || mount -t sysfs sysfs /sys
    grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
    mkdir -p /tmp
    [ -c /dev/console ] && exec </dev/console >/dev/console 2>&1

    now() { read -r up rest < /proc/uptime; echo "$up"; }
    store_fs="$(awk '$2 == "/nix/store" { fs = $3 } END { print fs }' /proc/mounts)"

    tests=""
    stay=""
    machine=""
    outside=""
    for w in $(cat /proc/cmdline); do
      case "$w" in
        drydock.outside=*) outside="''${w#drydock.outside=}" ;;
        drydock.machine=*) machine="''${w#drydock.machine=}"; stay=1 ;;
        drydock.test=*) tests="$tests $(echo "''${w#drydock.test=}" | tr , ' ')" ;;
        drydock.stay) stay=1 ;;
      esac
    done

    echo "DRYDOCK-SYSTEM: $systemConfig"
    echo "DRYDOCK-STORE: $store_fs"
    [ -r "$systemConfig/variant/name" ] && echo "DRYDOCK-VARIANT: $(cat "$systemConfig/variant/name")"
    if [ -n "$machine" ]; then
      # A cluster machine (what a NixOS test VM has): hostname, NICs from the MAC convention
      # 52:54:00:12:VV:NN -> 192.168.V.N/24, /etc/hosts from fw_cfg, a tiny service, and the
      # backdoor root shell on hvc0.
      hostname "$machine"
      mkdir -p /etc /srv/www
      echo "$machine" > /etc/hostname
      ip link set lo up
      for i in $(ls /sys/class/net); do
        mac="$(cat "/sys/class/net/$i/address")"
        case "$mac" in
          52:54:00:12:*)
            v=$((0x$(echo "$mac" | cut -d: -f5))); n=$((0x$(echo "$mac" | cut -d: -f6)))
            ip addr add "192.168.$v.$n/24" dev "$i"
            ip link set "$i" up
            echo "DRYDOCK-NIC: $i $mac 192.168.$v.$n/24" ;;
        esac
      done
      echo "127.0.0.1 localhost" > /etc/hosts
      hosts=/sys/firmware/qemu_fw_cfg/by_name/opt/drydock/hosts/raw
      [ -r "$hosts" ] && cat "$hosts" >> /etc/hosts
      mkdir -p /run
      "$systemConfig/activate" || echo "DRYDOCK-ACTIVATION-FAILED"
      if [ -c /dev/hvc0 ]; then
        setsid sh "$systemConfig/backdoor" </dev/null >/dev/console 2>&1 &
      fi
    fi
    echo "DRYDOCK-READY"

    for t in $tests; do
      case "$t" in
        list)
          ls -A /nix/store | while read -r e; do echo "DRYDOCK-LS: $e"; done
          echo "DRYDOCK-LS-END" ;;
        write)
          f=/nix/store/.drydock-write-test
          mount -o remount,rw /nix/store 2>/dev/null || true
          if (echo drydock > "$f") 2>/dev/null && [ -f "$f" ]; then
            rm -f "$f"
            echo "DRYDOCK-WRITE: ok"
          else
            echo "DRYDOCK-WRITE: failed"
          fi
          mount -o remount,ro /nix/store 2>/dev/null || true ;;
        sum)
          start="$(now)"
          find /nix/store -type f | LC_ALL=C sort > /tmp/drydock-files
          sum="$(xargs -r cat < /tmp/drydock-files | md5sum | cut -d' ' -f1)"
          end="$(now)"
          echo "DRYDOCK-SUM-FILES: $(wc -l < /tmp/drydock-files)"
          echo "DRYDOCK-SUM: $sum $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')" ;;
        mounts)
          while read -r l; do echo "DRYDOCK-MOUNT: $l"; done < /proc/mounts ;;
        counter)
          i=0
          while :; do echo "DRYDOCK-COUNT: $i"; i=$((i + 1)); sleep 0.2; done ;;
        idle)
          stay=1 ;;
        hold)
          # Snapshots of a store over virtio-fs: a file held open (fd 3, its first block
          # read) and a lookup made now; ticks; at tick 30 (15 s on: by then the test has
          # snapshotted, stopped and restored the VM) a block 2 MiB into the held file, the
          # looked-up file, a closure path never looked up, the listing and a name outside.
          exec 3< "$(readlink "$systemConfig/kernel")"
          dd bs=4096 count=1 <&3 >/dev/null 2>&1
          [ -e "$systemConfig/activate" ]
          echo "DRYDOCK-HOLD: ready"
          i=0
          while [ "$i" -lt 30 ]; do echo "DRYDOCK-HOLD-TICK: $i"; i=$((i + 1)); sleep 0.5; done
          echo "DRYDOCK-HOLD-HELD: $(dd bs=4096 skip=511 count=1 <&3 2>/dev/null | md5sum | cut -d' ' -f1)"
          echo "DRYDOCK-HOLD-LOOKED-UP: $(md5sum < "$systemConfig/activate" | cut -d' ' -f1)"
          echo "DRYDOCK-HOLD-NEW: $(head -c 4096 "$(readlink "$systemConfig/initrd")" | md5sum | cut -d' ' -f1)"
          ls -A /nix/store | while read -r e; do echo "DRYDOCK-HOLD-LS: $e"; done
          if [ -n "$outside" ] && [ -e "/nix/store/$outside" ]; then
            echo "DRYDOCK-HOLD-OUTSIDE: visible"
          else
            echo "DRYDOCK-HOLD-OUTSIDE: hidden"
          fi
          echo "DRYDOCK-HOLD-END"
          stay=1 ;;
        shell)
          echo "DRYDOCK-SHELL: exit the shell to continue"
          setsid cttyhack sh ;;
        *)
          echo "DRYDOCK-UNKNOWN-TEST: $t" ;;
      esac
    done

    echo "DRYDOCK-DONE"
    if [ -n "$stay" ]; then
      while :; do sleep 3600; done
    fi
    sync
    poweroff -f
  '';

  # Activation of a cluster machine: the activation snippet first (a failure leaves the running
  # services alone), then the services of the previous activation are stopped (each runs in its
  # own session, recorded in /run/drydock), this system's started, /run/current-system set.
  # Services get the console, never the caller's output (a switch's caller waits for its EOF).
  activate = ''
    #!${busybox}/bin/sh
    export PATH=${binPath}
    systemConfig=@out@
    machine="$(hostname)"
    mkdir -p /run/drydock /srv/www
    cd /
    ${if fw == null then "" else ''
      if ! ${fw.start}; then
        echo "the firewall of $systemConfig failed" >&2
        exit 1
      fi
    ''}if ! ( :
      ${activation}
    ); then
      echo "activation of $systemConfig failed" >&2
      exit 1
    fi
    for f in /run/drydock/*.pid; do
      [ -e "$f" ] || continue
      [ "$f" = /run/drydock/backdoor.pid ] && continue
      p="$(cat "$f")"
      kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null
      i=0
      while kill -0 "$p" 2>/dev/null && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
      rm -f "$f"
    done
    if [ -r "$systemConfig/www/index.html" ]; then
      www="$systemConfig/www"
    else
      echo "hello from $machine" > /srv/www/index.html
      www=/srv/www
    fi
    setsid httpd -f -p 80 -h "$www" </dev/null >/dev/console 2>&1 &
    echo $! > /run/drydock/httpd.pid
    ${if services == "" then "" else ''
      setsid sh "$systemConfig/services" </dev/null >/dev/console 2>&1 &
      echo $! > /run/drydock/services.pid
    ''}
    ln -sfn "$systemConfig" /run/current-system
    # The backdoor, as systemd restarts a changed unit: when this system's backdoor revision
    # differs from the running backdoor's, a new backdoor replaces it from outside its session
    # (every process of the old one's session is killed, a switch running there too, as one
    # running inside NixOS's backdoor.service dies when the unit restarts), and the activation
    # waits until it has (at most 10 s).
    if [ -s /run/drydock/backdoor.pid ] && [ "$(cat "$systemConfig/backdoor-revision" 2>/dev/null)" != "$(cat /run/drydock/backdoor.revision 2>/dev/null)" ]; then
      old="$(cat /run/drydock/backdoor.pid)"
      echo "restarting the backdoor (its session $old)"
      setsid sh "$systemConfig/backdoor" "$old" </dev/null >/dev/console 2>&1 &
      i=0
      while [ "$(cat /run/drydock/backdoor.pid 2>/dev/null)" = "$old" ] && [ "$i" -lt 100 ]; do
        sleep 0.1; i=$((i + 1))
      done
    fi
  '';

  # A cluster machine's backdoor root shell on hvc0, run as `setsid sh TOP/backdoor [SID]`: the
  # leader of a session of its own (its pid in /run/drydock/backdoor.pid, its system's revision
  # in /run/drydock/backdoor.revision), which waits for the shell on hvc0, its child (a child
  # opening hvc0 does not make it the session's controlling terminal). With SID, it first kills
  # every process of the session SID (the backdoor it replaces).
  backdoor = ''
    #!${busybox}/bin/sh
    export PATH=${binPath}
    if [ -n "$1" ] && [ "$1" -gt 1 ]; then
      sid="$1"
      i=0
      while [ "$i" -lt 50 ]; do
        left=
        for f in /proc/[0-9]*/stat; do
          read -r st 2>/dev/null <"$f" || continue
          # The fields after the command's name: state, ppid, pgrp, session, ...
          set -- ''${st##*) }
          [ "$4" = "$sid" ] && [ "$1" != Z ] || continue
          p="''${f#/proc/}"
          kill -KILL "''${p%/stat}" 2>/dev/null
          left=1
        done
        [ -n "$left" ] || break
        sleep 0.1; i=$((i + 1))
      done
    fi
    mkdir -p /run/drydock
    cat @out@/backdoor-revision >/run/drydock/backdoor.revision 2>/dev/null || : >/run/drydock/backdoor.revision
    echo $$ >/run/drydock/backdoor.pid
    (
      # Open first, then set the mode: the hvc driver resets a console's termios when its
      # last user closes it (as NixOS's test-instrumentation does it, stty after exec).
      exec </dev/hvc0 >/dev/hvc0 2>/dev/console
      stty raw -echo
      cd /tmp
      echo "Spawning backdoor root shell..."
      exec sh /dev/hvc0
    ) &
    wait
  '';

  switchToConfiguration = ''
    #!${busybox}/bin/sh
    # switch-to-configuration ACTION: only `test` (activate now; nothing to make permanent).
    export PATH=${busybox}/bin
    case "$1" in
      test) ;;
      *) echo "usage: switch-to-configuration test" >&2; exit 2 ;;
    esac
    echo "activating @out@"
    exec @out@/activate
  '';

  toplevel = build "drydock-test-system" {
    inherit kernelParams stage2 activate backdoor backdoorRevision switchToConfiguration services www;
    kernel = kernelFile;
    initrd = initrdFile;
    sw = busybox;
    variant = if variant == "" then "" else variantDrv;
  } ''
    set -e
    mkdir -p $out
    ln -s $kernel $out/kernel
    ln -s $initrd $out/initrd
    ln -s $sw $out/sw
    printf '%s' "$kernelParams" > $out/kernel-params
    printf '%s' "$system" > $out/system
    printf '%s' "$stage2" | sed "s|@out@|$out|g" > $out/init
    chmod 0555 $out/init
    printf '%s' "$activate" | sed "s|@out@|$out|g" > $out/activate
    printf '%s' "$backdoor" | sed "s|@out@|$out|g" > $out/backdoor
    chmod 0555 $out/backdoor
    if [ -n "$backdoorRevision" ]; then printf '%s' "$backdoorRevision" > $out/backdoor-revision; fi
    mkdir -p $out/bin
    printf '%s' "$switchToConfiguration" | sed "s|@out@|$out|g" > $out/bin/switch-to-configuration
    chmod 0555 $out/activate $out/bin/switch-to-configuration
    if [ -n "$services" ]; then printf '%s\n' "$services" > $out/services; fi
    if [ -n "$www" ]; then mkdir -p $out/www && printf '%s\n' "$www" > $out/www/index.html; fi
    if [ -n "$variant" ]; then ln -s $variant $out/variant; fi
  '';
in
{
  inherit toplevel outside busybox binPath;
  # For variants built on the same builders (nixos-node.nix).
  inherit build kernelFile switchToConfiguration;
}
