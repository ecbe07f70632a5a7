# Debian's etcd as a package of the test guest: the binaries fetch-etcd keeps (etcd, etcdctl and
# libc with its loader, Debian's own files) put into the store with builtins.path like the
# kernel (`drydock-debian-etcd-VERSION`), and `drydock-etcd-VERSION`, whose bin/etcd and
# bin/etcdctl run them through that loader:
#
#   exec DEBIAN/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --argv0 NAME \
#     --library-path DEBIAN/usr/lib/x86_64-linux-gnu DEBIAN/usr/bin/NAME "$@"
#
# so the busybox guest needs no /lib64 and no binary is patched. Give it to system.nix's
# `packages` to have both on the guest's PATH (etcd-cluster.nix does).
{ build    # system.nix's derivation helper
, busybox  # system.nix's busybox (the wrappers' shell)
, etcd     # absolute host path of the directory fetch-etcd prints (CACHE/etcd)
}:
let
  inherit (builtins) readFile replaceStrings;
  version = replaceStrings [ "\n" ] [ "" ] (readFile (etcd + "/version"));
  # Store path names allow [A-Za-z0-9+._?=-]: Debian versions may hold ~ and :.
  storeVersion = replaceStrings [ "~" ":" ] [ "_" "_" ] version;
  debian = builtins.path {
    path = etcd + "/root";
    name = "drydock-debian-etcd-${storeVersion}";
  };
in
build "drydock-etcd-${storeVersion}" { inherit busybox debian version; } ''
  set -e
  mkdir -p $out/bin
  lib=$debian/usr/lib/x86_64-linux-gnu
  for b in etcd etcdctl; do
    printf '#!%s/bin/sh\nexec %s --argv0 %s --library-path %s %s "$@"\n' \
      "$busybox" "$lib/ld-linux-x86-64.so.2" "$b" "$lib" "$debian/usr/bin/$b" > $out/bin/$b
    chmod 0555 $out/bin/$b
  done
  printf '%s\n' "$version" > $out/version
''
