# drydock's nixos-test node: a variant of the test system (system.nix) that boots like a node
# of a NixOS test (nixpkgs' qemu-vm.nix + test-instrumentation.nix), built with plain
# `derivation` on system.nix's builders (no nixpkgs). It is what drydock's `nixos-test` machine
# profile is tested against: drydock reads TOPLEVEL/etc/fstab and provides what it names.
#
#   - TOPLEVEL/etc/fstab in NixOS's shape; stage 1 (in the initrd) mounts what it names: `/` by
#     label (ext4), the store at /nix/.ro-store (9p or virtio-fs, tag nix-store) with a tmpfs
#     upper layer and an overlay on /nix/store, /tmp/xchg and /tmp/shared; then switch_root
#   - stage 2: NICs renamed by MAC (the i-th VLAN is eth<i>), static 192.168.V.N/24, DHCP on
#     eth0 (QEMU's user-mode network), hostname and /etc/hosts built in, the regInfo= check,
#     httpd, and the backdoor root shell on hvc0
#   - bin/switch-to-configuration test: activates in place and, when the backdoor changed
#     (backdoorRevision), restarts it as systemd restarts a changed backdoor.service: every
#     process of the old backdoor's session dies, a switch started inside it too
#   - init = "systemd": the same node up to stage 2, then Debian's systemd as PID 1 with the
#     services as units and the backdoor as backdoor.service (nixos-systemd.nix)
#
# scripts/guest/README.md ("The nixos-test node") documents arguments, files, boot and markers.
{ kernel                  # absolute host path of the kernel image
, kernelVersion ? "unknown"
, kernelFormat ? "bzImage"  # or "vmlinux"
, initrd                  # absolute host path of the base initrd: `build-initrd --nixos`
, shares ? "9p"           # how the fstab mounts nix-store, xchg and shared: "9p" or "virtiofs"
, rootLabel ? "nixos"     # the root filesystem's label (/dev/disk/by-label/LABEL)
, extraFstab ? ""         # lines appended to the fstab (e.g. a share with an unknown tag)
, hostName ? "machine"
, nodeNumber ? 1          # 1..254 (nixos-network.nix computes it)
, vlans ? [ 1 ]           # this node's VLANs in order: the i-th is eth<i>
, hosts ? null            # /etc/hosts lines for the nodes; default: this node's primary address
, backdoorRevision ? "1"  # a different value is a different backdoor: a switch restarts it
, variant ? ""            # non-empty: adds a harmless difference to the closure
, kernelParams ? "console=ttyS0 panic=-1 quiet loglevel=4"
, services ? ""           # shell run in the background at each activation
, www ? ""                # the web page served on port 80 (default: "hello from HOSTNAME")
, activation ? ""         # shell run at each activation, before the services; failing fails it
, hostBusybox ? "/bin/busybox"
, init ? "busybox"        # PID 1 after stage 1: "busybox" (stage 2 stays PID 1) or "systemd"
                          # (Debian's systemd, nixos-systemd.nix)
, systemd ? null          # init = "systemd": absolute host path of fetch-systemd's output
, units ? { }             # init = "systemd": more units, name -> script or { script; type; ... }
}:
let
  base = import ./system.nix {
    inherit kernel kernelVersion kernelFormat initrd hostBusybox;
  };
  inherit (base) build busybox switchToConfiguration;

  hex2 = n:
    let
      digits = [ "0" "1" "2" "3" "4" "5" "6" "7" "8" "9" "a" "b" "c" "d" "e" "f" ];
    in
    builtins.elemAt digits (n / 16) + builtins.elemAt digits (n - n / 16 * 16);

  checked =
    if !(builtins.elem shares [ "9p" "virtiofs" ]) then
      throw "nixos-node.nix: shares must be \"9p\" or \"virtiofs\", not ${toString shares}"
    else if !(builtins.isInt nodeNumber) || nodeNumber < 1 || nodeNumber > 254 then
      throw "nixos-node.nix: nodeNumber must be 1..254"
    else if builtins.any (v: !(builtins.isInt v) || v < 1 || v > 255) vlans then
      throw "nixos-node.nix: vlans are numbers 1..255"
    else if builtins.match "[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?" hostName == null then
      throw "nixos-node.nix: hostName ${hostName} is not a host name"
    else if !(builtins.elem init [ "busybox" "systemd" ]) then
      throw "nixos-node.nix: init must be \"busybox\" or \"systemd\", not ${toString init}"
    else if init == "systemd" && systemd == null then
      throw "nixos-node.nix: init = \"systemd\" needs systemd = the path fetch-systemd prints"
    else if init != "systemd" && units != { } then
      throw "nixos-node.nix: units need init = \"systemd\""
    else true;

  # "V MAC" per VLAN, in the node's order (line i is eth<i>).
  nics = builtins.concatStringsSep "\n"
    (map (v: "${toString v} 52:54:00:12:${hex2 v}:${hex2 nodeNumber}") vlans);

  hostsText =
    if hosts != null then hosts
    else if vlans == [ ] then ""
    else "192.168.${toString (builtins.head vlans)}.${toString nodeNumber} ${hostName}\n";

  # /etc/fstab as nixos/modules/tasks/filesystems.nix writes it for qemu-vm.nix's file systems
  # (scripted stage 1: overlay paths without /sysroot): every one is needed for boot
  # (x-initrd.mount), sorted by mount point; `/` is checked (pass 1), the others are not.
  shareOpts = tag:
    if shares == "9p" then
      "trans=virtio,version=9p2000.L,msize=16384,x-systemd.requires=modprobe@9pnet_virtio.service"
      + (if tag == "nix-store" then ",cache=loose" else "") + ",x-initrd.mount"
    else "x-initrd.mount";
  fstab = ''
    # This is a generated file.  Do not edit!
    #
    # To make changes, edit the fileSystems and swapDevices NixOS options
    # in your /etc/nixos/configuration.nix file.
    #
    # <file system> <mount point>   <type>  <options>       <dump>  <pass>

    # Filesystems.
    /dev/disk/by-label/${rootLabel} / ext4 x-initrd.mount 0 1
    nix-store /nix/.ro-store ${shares} ${shareOpts "nix-store"} 0 0
    tmpfs /nix/.rw-store tmpfs mode=0755,x-initrd.mount 0 0
    overlay /nix/store overlay lowerdir=/nix/.ro-store,upperdir=/nix/.rw-store/upper,workdir=/nix/.rw-store/work,x-initrd.mount 0 0
    shared /tmp/shared ${shares} ${shareOpts "shared"} 0 0
    xchg /tmp/xchg ${shares} ${shareOpts "xchg"} 0 0
  '' + extraFstab + (if extraFstab == "" then "" else "\n");

  # Stage 1, /init of the initrd: NixOS's scripted stage 1 in miniature. It mounts `/` at
  # /mnt-root, then every other fstab entry needed for boot (x-initrd.mount) under it in file
  # order, moves /proc, /sys, /dev and /run there and switch_roots into init=.
  stage1 = ''
    #!/bin/sh
    # drydock nixos-test node, stage 1 (nixos-node.nix): mount what /etc/fstab names, switch_root.
    export PATH=/bin
    set -f
    target=/mnt-root
    rootwait=5   # seconds to wait for the root device (no udev here: findfs, polled)

    fail() {
        echo "DRYDOCK-STAGE1-FAIL: $*"
        poweroff -f
        while :; do sleep 1; done
    }

    mkdir -p /proc /sys /dev /run /tmp "$target"
    mount -t proc proc /proc || fail "cannot mount /proc"
    mount -t sysfs sysfs /sys || fail "cannot mount /sys"
    mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev (devtmpfs)"
    [ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
    echo
    echo "DRYDOCK-STAGE1: start (nixos-test node)"

    init=""
    for w in $(cat /proc/cmdline); do
        case "$w" in
            init=*) init="''${w#init=}" ;;
            drydock.debug) set -x ;;
        esac
    done
    [ -n "$init" ] || fail "no init= on the kernel command line"

    while read -r m; do
        opt=""
        case "$m" in '?'*) opt=1; m="''${m#?}" ;; esac
        [ -n "$m" ] || continue
        if ! err="$(insmod "/lib/modules/$m" 2>&1)"; then
            [ -n "$opt" ] || fail "insmod $m: $err"
        fi
    done < /lib/modules/load-order

    [ -r /etc/fstab ] || fail "no /etc/fstab in the initrd"

    # mount options without the ones only systemd or NixOS read
    clean_opts() {
        echo "$1" | tr , '\n' | grep -v -e '^x-' -e '^defaults$' -e '^$' | paste -sd, -
    }
    # a block device spec (/dev/disk/by-label/L, LABEL=L, UUID=U, /dev/X) -> its device node
    find_dev() {
        case "$1" in
            /dev/disk/by-label/*) spec="LABEL=''${1#/dev/disk/by-label/}" ;;
            /dev/disk/by-uuid/*) spec="UUID=''${1#/dev/disk/by-uuid/}" ;;
            LABEL=*|UUID=*) spec="$1" ;;
            *) spec="" ;;
        esac
        i=0
        while [ "$i" -le $((rootwait * 10)) ]; do
            if [ -n "$spec" ]; then
                d="$(findfs "$spec" 2>/dev/null)" && [ -b "$d" ] && { echo "$d"; return 0; }
            elif [ -b "$1" ]; then
                echo "$1"; return 0
            fi
            sleep 0.1
            i=$((i + 1))
        done
        return 1
    }
    # mount DEVICE MOUNTPOINT TYPE OPTIONS under $target
    mount_entry() {
        mp="$target$2"
        [ "$2" = / ] && mp="$target"
        o="$(clean_opts "$4")"
        case "$3" in
            9p|virtiofs|tmpfs)
                src="$1" ;;
            overlay)
                src=overlay
                no=""
                for kv in $(echo "$o" | tr , ' '); do
                    case "$kv" in
                        lowerdir=*|upperdir=*|workdir=*)
                            k="''${kv%%=*}"; v="''${kv#*=}"; nv=""
                            for d in $(echo "$v" | tr : ' '); do
                                d="$target''${d#/sysroot}"
                                [ "$k" = lowerdir ] || mkdir -p -m 0755 "$d"
                                nv="''${nv:+$nv:}$d"
                            done
                            kv="$k=$nv" ;;
                    esac
                    no="''${no:+$no,}$kv"
                done
                o="$no" ;;
            *)
                src="$(find_dev "$1")" \
                    || fail "device $1 for $2 did not appear within ''${rootwait}s" ;;
        esac
        mkdir -p "$mp"
        if [ -n "$o" ]; then
            err="$(mount -t "$3" -o "$o" "$src" "$mp" 2>&1)"
        else
            err="$(mount -t "$3" "$src" "$mp" 2>&1)"
        fi || fail "cannot mount $1 on $2 ($3): $err"
        echo "DRYDOCK-STAGE1: mounted $2 ($3 $src)"
    }

    # `/` first, then the rest needed for boot in the fstab's order (NixOS sorts it so).
    entries="$(sed -e 's/#.*//' /etc/fstab | awk 'NF >= 3')"
    rootline="$(echo "$entries" | awk '$2 == "/"' | head -n 1)"
    [ -n "$rootline" ] || fail "no / in /etc/fstab"
    set -- $rootline
    mount_entry "$1" / "$3" "''${4:-defaults}"
    # What udev would have made: the root's by-label link, virtio disks' by-id links.
    mkdir -p /dev/disk/by-label /dev/disk/by-id
    case "$1:$src" in
        /dev/disk/by-label/*:/dev/*) ln -sfn "../../''${src#/dev/}" "$1" ;;
    esac
    set +f
    for s in /sys/block/vd*/serial; do
        [ -r "$s" ] || continue
        v="$(cat "$s")"; b="''${s%/serial}"; b="''${b##*/}"
        [ -n "$v" ] && ln -sfn "../../$b" "/dev/disk/by-id/virtio-$v"
    done
    set -f
    echo "$entries" | while read -r dev mp type opts rest; do
        [ "$mp" = / ] && continue
        dev="$(printf '%b' "$dev")"; mp="$(printf '%b' "$mp")"
        case ",$opts," in
            *,x-initrd.mount,*) ;;
            *) case "$mp" in
                   /nix|/nix/store|/var|/var/log|/var/lib|/var/lib/nixos|/etc|/usr) ;;
                   *) continue ;;
               esac ;;
        esac
        mount_entry "$dev" "$mp" "$type" "$opts"
    done || exit 1

    [ -e "$target$init" ] || fail "init $init not found under /"
    interp="$(head -c 256 "$target$init" | head -n 1)"
    case "$interp" in
        '#!'*)
            interp="''${interp#\#!}"; interp="''${interp# }"; interp="''${interp%% *}"
            [ -x "$target$interp" ] || fail "interpreter $interp of $init not found" ;;
    esac
    mkdir -p "$target/proc" "$target/sys" "$target/dev" "$target/run"
    mount -t tmpfs -o mode=0755 tmpfs /run || fail "cannot mount /run"
    for m in /proc /sys /dev /run; do
        mount -o move "$m" "$target$m" || fail "cannot move $m to the new root"
    done
    echo "DRYDOCK-STAGE1: switch_root $init"
    exec switch_root "$target" "$init"
  '';

  # The initrd: the base (busybox and the modules, cached by build-initrd --nixos) with a cpio
  # holding this system's /init and /etc/fstab appended. The kernel unpacks concatenated
  # archives in order, later files replacing earlier ones; an uncompressed archive must start
  # on a 4-byte boundary, the zero padding before it is skipped.
  baseInitrd = builtins.path {
    path = initrd;
    name = "drydock-initrd-nixos-base-${kernelVersion}";
  };
  initrdDrv = build "drydock-initrd-nixos-${kernelVersion}" {
    inherit stage1 fstab;
    base = baseInitrd;
  } ''
    set -e
    mkdir -p root/etc
    printf '%s' "$stage1" > root/init
    chmod 0755 root/init
    printf '%s' "$fstab" > root/etc/fstab
    cat "$base" > $out
    size=$(wc -c < $out)
    head -c $(( (4 - size % 4) % 4 )) /dev/zero >> $out
    (cd root && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 2>/dev/null) >> $out
  '';

  etcHosts = ''
    127.0.0.1 localhost
    ::1 localhost
    127.0.0.2 ${hostName}
  '' + hostsText;

  # /etc as NixOS keeps it: TOPLEVEL/etc is a link to the etc directory of a store path of its own.
  etc = build "drydock-etc" {
    inherit fstab hostName;
    hosts = etcHosts;
  } ''
    set -e
    mkdir -p $out/etc
    printf '%s' "$fstab" > $out/etc/fstab
    printf '%s' "$hosts" > $out/etc/hosts
    printf '%s\n' "$hostName" > $out/etc/hostname
  '';

  variantDrv = build "drydock-variant-${variant}" { inherit variant; } ''
    mkdir -p $out && printf '%s\n' "$variant" > $out/name
  '';

  # The backdoor (test-instrumentation's backdoor.service): a root shell reading commands from
  # hvc0, in a session of its own, its pid in /run/drydock/backdoor.pid and its own path in
  # /run/drydock/backdoor.unit (what a switch compares to decide on a restart).
  backdoor = build "drydock-backdoor" {
    inherit backdoorRevision;
    script = ''
      #!${busybox}/bin/sh
      # drydock nixos-test node: the backdoor, revision @revision@
      export PATH=/run/current-system/sw/bin:${busybox}/bin
      export HOME=/root USER=root
      mkdir -p /run/drydock /root
      echo "$$" > /run/drydock/backdoor.pid
      echo "@out@" > /run/drydock/backdoor.unit
      cd /tmp
      # Open first, then set the mode: the hvc driver resets a console's termios when its last
      # user closes it (as test-instrumentation does it, stty after exec).
      exec </dev/hvc0 >/dev/hvc0 2>/dev/console
      stty raw -echo
      echo "Spawning backdoor root shell..."
      exec sh /dev/hvc0
    '';
  } ''
    set -e
    printf '%s' "$script" | sed -e "s|@out@|$out|g" -e "s|@revision@|$backdoorRevision|g" > $out
    chmod 0555 $out
  '';

  # udhcpc's script: configures eth0 from QEMU's user-mode DHCP (10.0.2.15).
  dhcpScript = ''
    #!${busybox}/bin/sh
    export PATH=${busybox}/bin
    case "$1" in
      deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up ;;
      bound|renew)
        bits="$mask"
        if [ -z "$bits" ]; then
          bits=0
          for o in $(echo "$subnet" | tr . ' '); do
            while [ "$o" -gt 0 ]; do bits=$((bits + (o & 1))); o=$((o >> 1)); done
          done
        fi
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/$bits" dev "$interface"
        for r in $router; do ip route add default via "$r" dev "$interface" 2>/dev/null; break; done
        : > /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
        echo "DRYDOCK-DHCP: $interface $ip/$bits" > /dev/console ;;
    esac
    exit 0
  '';

  # The start of stage 2 (both inits): the API file systems, the console, the markers.
  stage2Prelude = ''
    grep -q ' /proc ' /proc/mounts 2>/dev/null || mount -t proc proc /proc
    grep -q ' /sys ' /proc/mounts || mount -t sysfs sysfs /sys
    grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
    grep -q ' /run ' /proc/mounts || mount -t tmpfs -o mode=0755 tmpfs /run
    [ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
    mkdir -p /tmp /etc /root /var /srv
    chmod 1777 /tmp

    fs_of() { awk -v m="$1" '$2 == m { fs = $3 } END { print fs }' /proc/mounts; }
    echo "DRYDOCK-SYSTEM: $systemConfig"
    echo "DRYDOCK-STORE: $(fs_of /nix/store) over $(fs_of /nix/.ro-store)"
    [ -r "$systemConfig/variant/name" ] && echo "DRYDOCK-VARIANT: $(cat "$systemConfig/variant/name")"
  '';

  # The regInfo= check (stage 2 of both inits): writes ok or the reason to /run/drydock-reginfo.
  regInfoCheck = ''
  # regInfo= names the closure's registration (nix-store --dump-db); NixOS loads it into its
  # Nix database. Here: it must exist and hold a record of this system.
  set -f
  reg=""
  for w in $(cat /proc/cmdline); do
    case "$w" in regInfo=*) reg="''${w#regInfo=}" ;; esac
  done
  set +f
  if [ -z "$reg" ]; then
    r="no regInfo= on the kernel command line"
  elif [ ! -f "$reg" ]; then
    r="$reg is not a file"
  elif ! awk -v p="$systemConfig" '
      # records: path, hash, NAR size, deriver, number of references, the references
      { path = $0
        if ((getline hash) <= 0 || (getline size) <= 0 || (getline drv) <= 0 || (getline n) <= 0) exit
        if (n !~ /^[0-9]+$/ || size !~ /^[0-9]+$/) exit
        for (i = 0; i < n; i++) if ((getline ref) <= 0) exit
        if (path == p) found = 1 }
      END { exit !found }' "$reg"; then
    r="$reg does not register $systemConfig"
  else
    r=ok
  fi
  echo "$r" > /run/drydock-reginfo
  echo "DRYDOCK-REGINFO: $r"
  '';

  # The VLAN NICs renamed by MAC and addressed (stage 2, or the systemd flavour's
  # network-setup.service): reads "V MAC" lines from the file $nics.
  nicSetup = ''
  # The network, as NixOS's test network module sets it up: udev rules keyed on the MAC name
  # the i-th VLAN's NIC eth<i>; each gets 192.168.V.N/24; eth0, QEMU's user-mode NIC (first
  # on the PCI bus), is configured by DHCP.
  ip link set lo up
  nic_of() { for d in /sys/class/net/*; do [ "$(cat "$d/address")" = "$1" ] && echo "''${d##*/}"; done; }
  i=1
  while read -r v mac; do
    [ -n "$v" ] || continue
    d="$(nic_of "$mac" | head -n 1)"
    if [ -n "$d" ]; then
      ip link set dev "$d" down
      ip link set dev "$d" name "ddrename$i" || echo "DRYDOCK-NIC-FAIL: cannot rename $d"
    else
      echo "DRYDOCK-NIC-MISSING: eth$i (VLAN $v, $mac)"
    fi
    i=$((i + 1))
  done < "$nics"
  i=1
  while read -r v mac; do
    [ -n "$v" ] || continue
    if [ -e "/sys/class/net/ddrename$i" ]; then
      if ip link set dev "ddrename$i" name "eth$i"; then
        ip addr add "192.168.$v.${toString nodeNumber}/24" dev "eth$i"
        ip link set "eth$i" up
        echo "DRYDOCK-NIC: eth$i $mac 192.168.$v.${toString nodeNumber}/24"
      else
        echo "DRYDOCK-NIC-FAIL: eth$i is taken ($mac left as ddrename$i)"
      fi
    fi
    i=$((i + 1))
  done < "$nics"
  '';

  stage2 = ''
    #!${busybox}/bin/sh
    # drydock nixos-test node, stage 2 (PID 1 after stage 1's switch_root into the root disk).
    export PATH=${busybox}/bin
    systemConfig=@out@

    ${stage2Prelude}

    ${regInfoCheck}
    nics="$systemConfig/nics"
    ${nicSetup}
    if [ -e /sys/class/net/eth0 ]; then
      ip link set eth0 up
      udhcpc -i eth0 -s "$systemConfig/dhcp-script" -t 10 -T 1 -A 1 -b -p /run/udhcpc-eth0.pid >/dev/null 2>&1 \
        || echo "DRYDOCK-DHCP-FAIL: udhcpc on eth0 failed"
    else
      echo "DRYDOCK-NIC-MISSING: eth0 (QEMU's user-mode network)"
    fi

    "$systemConfig/activate" || echo "DRYDOCK-ACTIVATION-FAILED"
    echo "DRYDOCK-READY"
    while :; do sleep 3600; done
  '';

  # Activation: /etc links and the hostname, the activation snippet (a failure leaves the
  # running services alone), the services restarted (each in its own session), then
  # /run/current-system, then the backdoor: started if none runs, restarted if this system's
  # differs from the running one. The restart is done by a process in a session of its own
  # (`activate --restart-backdoor`, what systemd is to a unit) and waited for: a switch started
  # in the backdoor's session dies with it there, one started elsewhere finishes.
  activate = ''
    #!${busybox}/bin/sh
    export PATH=${busybox}/bin
    systemConfig=@out@
    state=/run/drydock

    # The session of a process (field 6 of /proc/PID/stat; the name in field 2 may hold blanks).
    sid_of() {
      s="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
      s="''${s##*) }"
      set -- $s
      echo "$4"
    }
    members() {
      for d in /proc/[0-9]*; do
        p="''${d#/proc/}"
        [ "$(sid_of "$p")" = "$1" ] && echo "$p"
      done
    }
    # The running backdoor's pid, if its pid file names a live session leader.
    running_backdoor() {
      p="$(cat "$state/backdoor.pid" 2>/dev/null)" || return 1
      [ -n "$p" ] && [ "$(sid_of "$p")" = "$p" ] && echo "$p"
    }
    start_backdoor() {
      if [ ! -c /dev/hvc0 ]; then echo "DRYDOCK-BACKDOOR: no /dev/hvc0" > /dev/console; return 0; fi
      rm -f "$state/backdoor.pid"
      setsid "$systemConfig/backdoor" </dev/null >/dev/console 2>&1 &
      i=0
      until running_backdoor >/dev/null; do
        i=$((i + 1))
        [ "$i" -lt 100 ] || { echo "backdoor did not start" >&2; return 1; }
        sleep 0.05
      done
    }

    if [ "''${1:-}" = --restart-backdoor ]; then
      # Stop every process of the old backdoor's session (SIGTERM, SIGKILL after 3 s), then start
      # this system's backdoor.
      if old="$(running_backdoor)"; then
        kill -TERM $(members "$old") 2>/dev/null
        i=0
        while [ -n "$(members "$old")" ] && [ "$i" -lt 30 ]; do sleep 0.1; i=$((i + 1)); done
        kill -KILL $(members "$old") 2>/dev/null
        i=0
        while [ -n "$(members "$old")" ] && [ "$i" -lt 30 ]; do sleep 0.1; i=$((i + 1)); done
      fi
      start_backdoor
      exit
    fi

    mkdir -p "$state" /srv/www /etc
    for f in fstab hosts hostname; do ln -sfn "$systemConfig/etc/$f" "/etc/$f"; done
    hostname "$(cat "$systemConfig/etc/hostname")"
    machine="$(hostname)"
    cd /
    if ! ( :
      ${activation}
    ); then
      echo "activation of $systemConfig failed" >&2
      exit 1
    fi
    for s in httpd services; do
      f="$state/$s.pid"
      [ -e "$f" ] || continue
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
    echo $! > "$state/httpd.pid"
    if [ -r "$systemConfig/services" ]; then
      setsid sh "$systemConfig/services" </dev/null >/dev/console 2>&1 &
      echo $! > "$state/services.pid"
    fi
    ln -sfn "$systemConfig" /run/current-system

    want="$(readlink "$systemConfig/backdoor")"
    if ! running_backdoor >/dev/null; then
      start_backdoor
    elif [ "$(cat "$state/backdoor.unit" 2>/dev/null)" != "$want" ]; then
      echo "restarting the following units: backdoor.service"
      setsid "$systemConfig/activate" --restart-backdoor </dev/null >/dev/console 2>&1 &
      wait $!
      # (setsid forks when its caller leads a process group: then wait returned at once.)
      i=0
      until running_backdoor >/dev/null && [ "$(cat "$state/backdoor.unit" 2>/dev/null)" = "$want" ]; do
        i=$((i + 1))
        [ "$i" -lt 200 ] || { echo "the backdoor did not restart" >&2; exit 1; }
        sleep 0.05
      done
    fi
  '';

  toplevel = build "drydock-test-system" {
    inherit kernelParams stage2 activate switchToConfiguration services www nics dhcpScript;
    kernel = base.kernelFile;
    initrd = initrdDrv;
    sw = busybox;
    etc = etc;
    backdoor = backdoor;
    variant = if variant == "" then "" else variantDrv;
  } ''
    set -e
    mkdir -p $out/bin
    ln -s $kernel $out/kernel
    ln -s $initrd $out/initrd
    ln -s $sw $out/sw
    ln -s $etc/etc $out/etc
    ln -s $backdoor $out/backdoor
    printf '%s' "$kernelParams" > $out/kernel-params
    printf '%s' "$system" > $out/system
    printf '%s\n' "$nics" > $out/nics
    printf '%s' "$stage2" | sed "s|@out@|$out|g" > $out/init
    printf '%s' "$activate" | sed "s|@out@|$out|g" > $out/activate
    printf '%s' "$switchToConfiguration" | sed "s|@out@|$out|g" > $out/bin/switch-to-configuration
    printf '%s' "$dhcpScript" > $out/dhcp-script
    chmod 0555 $out/init $out/activate $out/bin/switch-to-configuration $out/dhcp-script
    if [ -n "$services" ]; then printf '%s\n' "$services" > $out/services; fi
    if [ -n "$www" ]; then mkdir -p $out/www && printf '%s\n' "$www" > $out/www/index.html; fi
    if [ -n "$variant" ]; then ln -s $variant $out/variant; fi
  '';

  # The systemd flavour: the same node up to stage 2, then Debian's systemd as PID 1.
  systemdNode = import ./nixos-systemd.nix {
    inherit build busybox systemd hostName nodeNumber fstab nics stage2Prelude regInfoCheck nicSetup services
      www units activation backdoorRevision kernelParams initrdDrv;
    inherit (base) kernelFile;
    system = "x86_64-linux";
    hosts = etcHosts;
    dhcpScript = dhcpScript;
    variantDrv = if variant == "" then "" else variantDrv;
  };
in
assert checked;
{
  toplevel = if init == "systemd" then systemdNode.toplevel else toplevel;
  inherit busybox fstab;
  inherit (base) outside;
  initrd = initrdDrv;
}
