# The test guest's firewall (system.nix's `firewall`): NixOS's `networking.firewall` with the
# nftables backend (nixos/modules/services/networking/firewall-nftables.nix), rebuilt on the
# test guest's plain derivations, with Debian's nft and the guest kernel's netfilter modules
# (fetch-nft) put into the store with builtins.path like the kernel.
#
# `config` takes NixOS's option names (the ones below; any other name is refused):
#
#   enable ? true                 false: the activation removes the table (no modules loaded)
#   allowedTCPPorts ? [ ]         allowedTCPPortRanges ? [ ]   ([ { from = 8000; to = 8010; } ])
#   allowedUDPPorts ? [ ]         allowedUDPPortRanges ? [ ]
#   interfaces ? { }              per interface (NAME = { allowedTCPPorts = ...; ... }), the four
#                                 options above, accepted only on packets coming in on NAME
#   trustedInterfaces ? [ ]       everything coming in on these is accepted ("lo" always is)
#   allowPing ? true              ICMPv4 echo requests accepted (ICMPv6 always is, as NixOS does)
#   pingLimit ? null              e.g. "2/second": nft's `limit rate` for them
#   logRefusedConnections ? true  TCP SYNs refused are logged: "refused connection: " (level
#                                 info). NixOS's default was true for years; newer NixOS
#                                 defaults to false. drydock's is true: the log is the point.
#   logRefusedPackets ? false     every refused packet ("refused packet: ", and with
#   logRefusedUnicastsOnly ? true   false "refused broadcast: "/"refused multicast: " too)
#   rejectPackets ? false         refuse with a TCP reset / ICMP unreachable instead of dropping
#   checkReversePath ? true       true or "strict", "loose", false: the rpfilter chain
#   logReversePathDrops ? false   "rpfilter drop: "
#   extraInputRules ? ""          nft rules appended to the input-allow chain
#   extraReversePathFilterRules ? ""  nft rules of the rpfilter-allow chain
#
# Returns { config; ruleset; package; modules; start; logs; }: `config` with the defaults, the
# ruleset's text, `package` (bin/nft: Debian's nft run through its own loader), `modules` (the
# kernel's netfilter modules and their load-order), `start` (the store path of the script the
# activation runs, holding `ruleset.nft` beside it) and whether it logs anything (`logs`).
{ build    # system.nix's derivation helper
, busybox  # system.nix's busybox (the scripts' shell and tools)
, nft      # absolute host path of the directory fetch-nft prints (CACHE/nft)
, kernelVersion  # the system's kernel release: the modules must be its
, config   # the firewall's settings (above)
}:
let
  inherit (builtins) all attrNames concatStringsSep elem filter foldl' isAttrs isBool isInt
    isList isString length pathExists readFile replaceStrings sort toJSON;

  fail = msg: throw "drydock's test system: firewall: ${msg}";
  need = file:
    if pathExists file then file
    else fail "${file} is missing: run scripts/guest/fetch-nft (or scripts/setup) of a drydock checkout first, as the user who runs drydock";
  line = file: replaceStrings [ "\n" ] [ "" ] (readFile (need file));

  # --- the settings ------------------------------------------------------------------------
  portOptions = {
    allowedTCPPorts = [ ];
    allowedTCPPortRanges = [ ];
    allowedUDPPorts = [ ];
    allowedUDPPortRanges = [ ];
  };
  defaults = portOptions // {
    enable = true;
    interfaces = { };
    trustedInterfaces = [ ];
    allowPing = true;
    pingLimit = null;
    logRefusedConnections = true;
    logRefusedPackets = false;
    logRefusedUnicastsOnly = true;
    rejectPackets = false;
    checkReversePath = true;
    logReversePathDrops = false;
    extraInputRules = "";
    extraReversePathFilterRules = "";
  };
  unknownIn = where: allowed: set:
    let bad = filter (n: !(allowed ? ${n})) (attrNames set);
    in if bad == [ ] then set
    else fail "unknown option${if length bad > 1 then "s" else ""} ${concatStringsSep ", " bad}${where} (known: ${concatStringsSep ", " (attrNames allowed)})";

  isPort = p: isInt p && p >= 0 && p <= 65535;
  ports = what: ps:
    if isList ps && all isPort ps then ps
    else fail "${what} must be a list of ports (integers 0 to 65535), not ${toJSON ps}";
  ranges = what: rs:
    if isList rs && all (r: isAttrs r && attrNames r == [ "from" "to" ] && isPort r.from && isPort r.to && r.from <= r.to) rs
    then rs
    else fail "${what} must be a list of { from = PORT; to = PORT; } (from <= to), not ${toJSON rs}";
  bool = what: b: if isBool b then b else fail "${what} must be true or false, not ${toJSON b}";
  str = what: s: if isString s then s else fail "${what} must be a string, not ${toJSON s}";
  # NixOS canonicalizes the port lists: sorted, each port once.
  canonical = ps: foldl' (acc: p: if acc != [ ] && elem p acc then acc else acc ++ [ p ]) [ ] (sort (a: b: a < b) ps);

  checkPorts = where: set: {
    allowedTCPPorts = canonical (ports "allowedTCPPorts${where}" set.allowedTCPPorts);
    allowedUDPPorts = canonical (ports "allowedUDPPorts${where}" set.allowedUDPPorts);
    allowedTCPPortRanges = ranges "allowedTCPPortRanges${where}" set.allowedTCPPortRanges;
    allowedUDPPortRanges = ranges "allowedUDPPortRanges${where}" set.allowedUDPPortRanges;
  };

  given = if isAttrs config then unknownIn "" defaults config
    else fail "must be an attribute set (e.g. { allowedTCPPorts = [ 7000 ]; }), not ${toJSON config}";
  raw = defaults // given;
  cfg = raw // checkPorts "" raw // {
    enable = bool "enable" raw.enable;
    interfaces =
      if isAttrs raw.interfaces then
        builtins.mapAttrs (name: set:
          let where = " (interfaces.${name})"; in
          checkPorts where (portOptions // unknownIn where portOptions
            (if isAttrs set then set else fail "interfaces.${name} must be an attribute set")))
          raw.interfaces
      else fail "interfaces must be an attribute set of interfaces";
    trustedInterfaces =
      if isList raw.trustedInterfaces && all isString raw.trustedInterfaces then raw.trustedInterfaces
      else fail "trustedInterfaces must be a list of interface names";
    allowPing = bool "allowPing" raw.allowPing;
    pingLimit = if raw.pingLimit == null then null else str "pingLimit" raw.pingLimit;
    logRefusedConnections = bool "logRefusedConnections" raw.logRefusedConnections;
    logRefusedPackets = bool "logRefusedPackets" raw.logRefusedPackets;
    logRefusedUnicastsOnly = bool "logRefusedUnicastsOnly" raw.logRefusedUnicastsOnly;
    rejectPackets = bool "rejectPackets" raw.rejectPackets;
    checkReversePath =
      if elem raw.checkReversePath [ true false "strict" "loose" ] then raw.checkReversePath
      else fail "checkReversePath must be true, false, \"strict\" or \"loose\", not ${toJSON raw.checkReversePath}";
    logReversePathDrops = bool "logReversePathDrops" raw.logReversePathDrops;
    extraInputRules = str "extraInputRules" raw.extraInputRules;
    extraReversePathFilterRules = str "extraReversePathFilterRules" raw.extraReversePathFilterRules;
  };

  # --- the ruleset ---------------------------------------------------------------------------
  # Lines, each indented by its depth (`false` entries are left out).
  lines = ls: concatStringsSep "\n" (filter (l: l != false) ls) + "\n";
  when = cond: l: if cond then l else false;
  quoted = names: concatStringsSep ", " (map (n: "\"${n}\"") names);
  portSet = ps: rs: concatStringsSep ", " (map toString ps ++ map (r: "${toString r.from}-${toString r.to}") rs);
  allowRules = iface: set:
    let
      on = if iface == null then "" else "iifname \"${iface}\" ";
      tcp = portSet set.allowedTCPPorts set.allowedTCPPortRanges;
      udp = portSet set.allowedUDPPorts set.allowedUDPPortRanges;
    in
    [ (when (tcp != "") "    ${on}tcp dport { ${tcp} } accept")
      (when (udp != "") "    ${on}udp dport { ${udp} } accept") ];
  trusted = [ "lo" ] ++ filter (i: i != "lo") cfg.trustedInterfaces;
  rpfilter = cfg.checkReversePath != false;

  # As NixOS's networking.nftables applies a table: create it (so that the delete cannot fail),
  # delete it, create it anew, in one transaction (`nft -f` is atomic: a syntax or kernel error
  # leaves the table in force as it was). Connections keep their conntrack state.
  ruleset = lines ([
    "table inet nixos-fw"
    "delete table inet nixos-fw"
    "table inet nixos-fw {"
    "  set temp-ports {"
    "    comment \"Temporarily opened ports\""
    "    type inet_proto . inet_service"
    "    flags interval"
    "    auto-merge"
    "  }"
    (when rpfilter "")
    (when rpfilter "  chain rpfilter {")
    (when rpfilter "    type filter hook prerouting priority mangle + 10; policy drop;")
    (when rpfilter "    meta nfproto ipv4 udp sport . udp dport { 67 . 68, 68 . 67 } accept comment \"DHCPv4 client/server\"")
    (when rpfilter "    fib saddr . mark ${if cfg.checkReversePath == "loose" then "" else ". iif "}oif exists accept")
    (when rpfilter "    jump rpfilter-allow")
    (when (rpfilter && cfg.logReversePathDrops) "    log level info prefix \"rpfilter drop: \"")
    (when rpfilter "  }")
    ""
    "  chain rpfilter-allow {"
    (when (cfg.extraReversePathFilterRules != "") cfg.extraReversePathFilterRules)
    "  }"
    ""
    "  chain input {"
    "    type filter hook input priority filter; policy drop;"
    "    iifname { ${quoted trusted} } accept comment \"trusted interfaces\""
    "    ct state vmap { invalid : drop, established : accept, related : accept, new : jump input-allow, untracked : jump input-allow }"
    (when cfg.logRefusedConnections "    tcp flags syn / fin,syn,rst,ack log level info prefix \"refused connection: \"")
    (when (cfg.logRefusedPackets && !cfg.logRefusedUnicastsOnly) "    pkttype broadcast log level info prefix \"refused broadcast: \"")
    (when (cfg.logRefusedPackets && !cfg.logRefusedUnicastsOnly) "    pkttype multicast log level info prefix \"refused multicast: \"")
    (when cfg.logRefusedPackets "    pkttype host log level info prefix \"refused packet: \"")
    (when cfg.rejectPackets "    meta l4proto tcp reject with tcp reset")
    (when cfg.rejectPackets "    reject")
    "  }"
    ""
    "  chain input-allow {"
  ] ++ allowRules null cfg
    ++ builtins.concatLists (map (i: allowRules i cfg.interfaces.${i}) (attrNames cfg.interfaces))
    ++ [
    "    meta l4proto . th dport @temp-ports accept"
    (when cfg.allowPing "    icmp type echo-request ${if cfg.pingLimit == null then "" else "limit rate ${cfg.pingLimit} "}accept comment \"allow ping\"")
    "    icmpv6 type != { nd-redirect, 139 } accept comment \"Accept all ICMPv6 messages except redirects and node information queries (type 139).  See RFC 4890, section 4.4.\""
    "    ip6 daddr fe80::/64 udp dport 546 accept comment \"DHCPv6 client\""
    (when (cfg.extraInputRules != "") cfg.extraInputRules)
    "  }"
    "}"
  ]);
  # What a system whose firewall is disabled applies: the table gone (created first, so that the
  # delete cannot fail when there is none).
  removal = ''
    table inet nixos-fw
    delete table inet nixos-fw
  '';

  logs = cfg.enable && (cfg.logRefusedConnections || cfg.logRefusedPackets
    || (cfg.checkReversePath != false && cfg.logReversePathDrops));

  # --- what goes into the store --------------------------------------------------------------
  version = line (nft + "/version");
  # Store path names allow [A-Za-z0-9+._?=-]: Debian versions may hold ~ and :.
  storeVersion = replaceStrings [ "~" ":" ] [ "_" "_" ] version;
  modulesKernel = line (nft + "/kernel-version");
  debian = builtins.path {
    path = need (nft + "/root");
    name = "drydock-debian-nftables-${storeVersion}";
  };
  modules =
    if modulesKernel != kernelVersion then
      fail "the netfilter modules in ${nft} are kernel ${modulesKernel}'s, the system's kernel is ${kernelVersion}: run scripts/guest/fetch-nft again"
    else builtins.path {
      path = need (nft + "/modules");
      name = "drydock-firewall-modules-${kernelVersion}";
    };

  # bin/nft: Debian's nft through its own loader and libraries (the guest has no /lib64), as
  # etcd.nix runs etcd.
  package = build "drydock-nft-${storeVersion}" { inherit busybox debian version; } ''
    set -e
    mkdir -p $out/bin
    lib=$debian/usr/lib/x86_64-linux-gnu
    printf '#!%s/bin/sh\nexec %s --argv0 nft --library-path %s %s "$@"\n' \
      "$busybox" "$lib/ld-linux-x86-64.so.2" "$lib" "$debian/usr/sbin/nft" > $out/bin/nft
    chmod 0555 $out/bin/nft
    printf '%s\n' "$version" > $out/version
  '';

  # The activation's part (run by `activate` before the system's own activation snippet, so
  # before the services; a failure fails the activation and leaves the running firewall as it
  # was): nft's /etc/protocols and /etc/services, the modules (the guest has no modprobe, so the
  # kernel's own requests for them would fail), the ruleset, and the console's log level.
  startScript = ''
    #!${busybox}/bin/sh
    # drydock test system: apply the firewall (system.nix's `firewall`).
    export PATH=${busybox}/bin
    set -e
    here=@out@
    # nft resolves protocol and service names through these (netbase's); a real file is kept.
    mkdir -p /etc
    for f in protocols services; do
      [ -e "/etc/$f" ] && [ ! -L "/etc/$f" ] || ln -sfn "${debian}/etc/$f" "/etc/$f"
    done
    loaded() { grep -q "^$1 " /proc/modules; }
  '' + (if cfg.enable then ''
    while read -r l; do
      m="''${l#\?}"; n="''${m%.ko}"
      loaded "$n" && continue
      if ! err="$(insmod "${modules}/$m" 2>&1)" && ! loaded "$n"; then
        case "$l" in
          \?*) ;;
          *) echo "firewall: insmod $m: $err" >&2; exit 1 ;;
        esac
      fi
    done < "${modules}/load-order"
    ${package}/bin/nft -f "$here/ruleset.nft"
  '' + (if logs then ''
    # The log lines are kernel messages of level info: shown on the console at console log
    # level 7, a NixOS test node's (boot.consoleLogLevel = 7). The level it had is kept, for a
    # system whose firewall is disabled. (Not `read`: a sysctl file read byte by byte ends after
    # its first byte.)
    level="$(cut -f1 /proc/sys/kernel/printk)"
    [ -e /run/drydock/console-loglevel ] || { mkdir -p /run/drydock; echo "$level" > /run/drydock/console-loglevel; }
    [ "$level" -ge 7 ] || echo 7 > /proc/sys/kernel/printk
  '' else "") else ''
    # Disabled: no table (nothing to remove if nf_tables was never loaded), the console's log
    # level as it was before a firewall raised it.
    if loaded nf_tables; then
      ${package}/bin/nft -f "$here/ruleset.nft"
    fi
    if [ -e /run/drydock/console-loglevel ]; then
      cat /run/drydock/console-loglevel > /proc/sys/kernel/printk
      rm -f /run/drydock/console-loglevel
    fi
  '');

  start = build "drydock-firewall" {
    inherit startScript;
    ruleset = if cfg.enable then ruleset else removal;
  } ''
    set -e
    mkdir -p $out
    printf '%s' "$ruleset" > $out/ruleset.nft
    printf '%s' "$startScript" | sed "s|@out@|$out|g" > $out/start
    chmod 0555 $out/start
  '';
in
{
  config = cfg;
  inherit ruleset package modules logs;
  start = "${start}/start";
}
