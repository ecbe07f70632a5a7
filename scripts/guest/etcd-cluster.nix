# A composition of an etcd cluster on drydock's busybox test guest: machines etcd1..etcdN on
# VLAN 1, each running Debian's etcd (fetch-etcd, etcd.nix) as its `services`, bootstrapped
# statically as one cluster of N members. A composition file is one line:
#
#   import /path/to/drydock/scripts/guest/etcd-cluster.nix { members = 3; }
#
# and then (etcdctl is on the guest's PATH):
#
#   drydock up --detach
#   drydock exec etcd1 -- etcdctl endpoint health --cluster
#   drydock exec etcd1 -- etcdctl put k v; drydock exec etcd3 -- etcdctl get --print-value-only k
#
# Every machine boots the same system (one build); it takes its name from its hostname
# (drydock.machine). At each activation, before the services, the machine's writable disk (the
# virtio disk that is not read-only: /dev/vda) is mounted at /var/lib, as ext2 through the ext4
# driver (its modules, from the guest cache's kernel, are insmod'ed once): a disk without an ext
# superblock (a fresh one) is made ext2 first (busybox mke2fs); one that is mounted already is
# left alone. etcd keeps its data in /var/lib/etcd, so it is on the disk, not in RAM, and it logs
# to the console. The activation fails if the disk cannot be mounted.
#
# etcd's flags: --name NAME, --data-dir /var/lib/etcd, --initial-cluster
# etcd1=http://etcd1:2380,..., --initial-cluster-state new, --initial-cluster-token
# drydock-etcd, --initial-advertise-peer-urls http://NAME:2380, --listen-peer-urls
# http://0.0.0.0:2380, --listen-client-urls http://0.0.0.0:2379, --advertise-client-urls
# http://NAME:2379, --heartbeat-interval and --election-timeout (ms) as below (etcd's defaults,
# 100 and 1000, are too short for TCG guests on a loaded host), --logger zap, --log-outputs
# stderr. A hot reload restarts etcd on the same data (its member rejoins; the bootstrap flags
# are ignored once the data directory holds a member).
{ members ? 3            # machines etcd1..etcdN, every one a member
, memorySize ? 256       # MiB per machine
, heartbeatInterval ? 500
, electionTimeout ? 5000
, variant ? ""           # non-empty: another system (system.nix's variant), for a hot reload
  # The guest cache (fetch-kernel, build-initrd, fetch-etcd): by default the scripts' own,
  # ${DRYDOCK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/drydock}/guest.
, cache ?
    let
      env = builtins.getEnv;
      orElse = a: b: if a != "" then a else b;
    in
    orElse (env "DRYDOCK_CACHE_DIR") (orElse (env "XDG_CACHE_HOME") (env "HOME" + "/.cache") + "/drydock")
    + "/guest"
, hostBusybox ? "/bin/busybox"
}:
let
  inherit (builtins) concatStringsSep genList listToAttrs pathExists readFile replaceStrings;
  need = what: file:
    if pathExists file then file
    else throw "${file} is missing: run ${what} (or scripts/setup) of a drydock checkout first, as the user who runs drydock";

  kernelVersion = replaceStrings [ "\n" ] [ "" ]
    (readFile (need "scripts/guest/fetch-kernel" (cache + "/kernel/version")));
  guestArgs = {
    kernel = need "scripts/guest/fetch-kernel" (cache + "/kernel/vmlinux");
    kernelFormat = "vmlinux";
    initrd = need "scripts/guest/build-initrd" (cache + "/initrd");
    inherit kernelVersion hostBusybox;
  };
  # The builders and busybox (no toplevel is built from this one).
  base = import ./system.nix guestArgs;
  etcd = import ./etcd.nix {
    inherit (base) build busybox;
    etcd = need "scripts/guest/fetch-etcd" (cache + "/etcd");
  };

  # The ext4 driver (which mounts ext2) and what it needs, from the kernel's module set of the
  # nixos-test node (the default initrd loads crc32c already).
  ext4Modules = [ "crc16" "mbcache" "jbd2" "ext4" ];
  modules = builtins.path {
    path = need "scripts/guest/fetch-kernel" (cache + "/kernel/nixos-modules");
    name = "drydock-ext4-modules-${kernelVersion}";
    filter = path: type: builtins.elem (baseNameOf path) (map (m: m + ".ko") ext4Modules);
  };

  names = genList (i: "etcd${toString (i + 1)}") members;
  initialCluster = concatStringsSep "," (map (n: "${n}=http://${n}:2380") names);

  activation = ''
    if ! grep -q ' /var/lib ' /proc/mounts; then
      grep -qw ext4 /proc/filesystems || for m in ${concatStringsSep " " ext4Modules}; do
        insmod ${modules}/$m.ko || grep -qw "^$m" /proc/modules
      done
      disk=""
      for d in /sys/block/vd*; do
        [ -e "$d/ro" ] && [ "$(cat "$d/ro")" = 0 ] && { disk="/dev/''${d##*/}"; break; }
      done
      [ -n "$disk" ] || { echo "etcd: no writable disk" >&2; exit 1; }
      # The ext2 superblock's magic, 0xEF53 at byte 1080: a disk without it is new.
      if [ "$(dd if="$disk" bs=8 skip=135 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n' | cut -c1-4)" != 53ef ]; then
        mke2fs -q -F -b 4096 -i 65536 -L etcd "$disk"
      fi
      mkdir -p /var/lib
      mount -t ext4 "$disk" /var/lib
    fi
  '';

  # An etcd of an earlier activation may still be stopping (on SIGTERM a leader first tries to
  # hand its leadership over, which takes seconds when its peers restart too; activate waits
  # 5 s at most): its ports and its data are free only once it has exited. So the services wait
  # for it, backing off 0.1 s, and kill it after 60 s. /run/etcd.pid holds the running etcd's
  # pid and start time (field 22 of /proc/PID/stat), so a reused pid is never waited for.
  services = ''
    if read -r old start < /run/etcd.pid 2>/dev/null; then
      i=0
      while [ "$(cut -d' ' -f22 "/proc/$old/stat" 2>/dev/null)" = "$start" ]; do
        [ "$i" = 600 ] && kill -KILL "$old"
        sleep 0.1; i=$((i + 1))
      done
    fi
    echo "$$ $(cut -d' ' -f22 /proc/$$/stat)" > /run/etcd.pid
    name="$(hostname)"
    exec etcd --name "$name" --data-dir /var/lib/etcd \
      --initial-cluster ${initialCluster} \
      --initial-cluster-state new --initial-cluster-token drydock-etcd \
      --initial-advertise-peer-urls "http://$name:2380" --listen-peer-urls http://0.0.0.0:2380 \
      --listen-client-urls http://0.0.0.0:2379 --advertise-client-urls "http://$name:2379" \
      --heartbeat-interval ${toString heartbeatInterval} --election-timeout ${toString electionTimeout} \
      --logger zap --log-outputs stderr
  '';

  system = (import ./system.nix (guestArgs // {
    inherit activation services variant;
    packages = [ etcd ];
  })).toplevel;
in
{
  machines = listToAttrs (map (name: {
    inherit name;
    value = { inherit system memorySize; };
  }) names);
}
