# From a NixOS test to a drydock composition.
#
# nixpkgs' testing framework evaluates each node of a test (`nodes.server = { ... }`) to a NixOS
# configuration. This function maps those evaluated nodes to the machines of a drydock
# composition, so that `drydock up` boots the test's own nodes, on the test's VLANs, with the
# test's sizes:
#
#   machines.NAME = {
#     system     = <the node's system.build.toplevel>;
#     memorySize = <virtualisation.memorySize>;
#     cores      = <virtualisation.cores>;
#     diskSize   = <virtualisation.diskSize>;    # left out: see below
#     vlans      = <the VLAN of each of its NICs>;
#     profile    = "nixos-test";
#   };
#   testScript = <the test's script, a string>;  # left out: see below
#
# A `drydock.nix` beside your test (nixpkgs from wherever you take it):
#
#   let
#     pkgs = import <nixpkgs> { };
#     fromTest = import /path/to/drydock/nix/nixos-test.nix;
#   in
#   fromTest { test = pkgs.testers.runNixOSTest ./my-test.nix; }
#
# `test` is whatever evaluates a NixOS test: `pkgs.testers.runNixOSTest ./my-test.nix`,
# `pkgs.nixosTest (import ./my-test.nix)`, the result of nixpkgs' `nixos/lib` `runTest` or
# `evalTest`, a flake's `checks.x86_64-linux.my-test`, or a make-test-python.nix style file
# called with its arguments (`import ./my-test.nix { inherit pkgs; }`). It may also be a plain
# attribute set of evaluated nodes: `{ server = nixpkgs.lib.nixosSystem { ... }; ... }` (each a
# NixOS system with `.config`, or a NixOS `config` itself). Nothing is built by this function:
# drydock builds the toplevels; the test's own derivation (the driver, the test run) is not
# touched.
#
# Arguments:
#   test            (required) the evaluated test or nodes, as above.
#   withTestScript  (default true) add the top-level attribute `testScript` when the test's
#                   script is a string (drydock up ignores top-level attributes other than
#                   `machines`; `drydock test` is to read it). false leaves it out, and the
#                   script is then never evaluated.
#
# What is read, and where (nixpkgs' nixos/lib/testing/*.nix, qemu-vm.nix,
# guest-networking-options.nix):
# - nodes: `test.config.nodes` (runTest, nixosTest and evalTest since NixOS 22.11: each node
#   is its NixOS config), else `test.nodes` (older makeTest: each node a NixOS system with
#   `.config`). `nodes.NAME.config` is deprecated in newer releases and is never read when
#   the node is a config itself.
# - system: `system.build.toplevel`.
# - memorySize, cores: as they are (qemu-vm's defaults are 1024 MiB and 1 core).
# - diskSize: left out when it is null, absent, or "auto" (the default of
#   disk-size-option.nix where the runner supports it), and when `virtualisation.diskImage` is
#   null (the root is a tmpfs: qemu-vm then gives the node no disk, whatever diskSize says);
#   drydock then uses its profile's default (1024 MiB).
# - vlans: one entry per NIC the node gets, in qemu-vm's order: `virtualisation.allInterfaces`
#   where it exists (`vlans` as eth1.., then the named `virtualisation.interfaces`), else
#   `virtualisation.vlans` followed by the VLANs of `virtualisation.interfaces`.
# - testScript: `test.config.testScriptString` (the script, a function already applied to
#   the nodes), else `test.driver.testScript`, else a string `testScript`.
#
# Fails (a Nix `throw` naming what it got) when `test` is neither shape, when a node is not an
# evaluated NixOS configuration, when a node's name is not a drydock machine name (1-40
# letters, digits or '-', not starting or ending with '-': nixpkgs allows `_`, drydock does
# not, since the name is the machine's hostname), when the test has no nodes, and when the test
# has systemd-nspawn `containers` (drydock runs VMs only, and nixpkgs numbers nodes and
# containers together, so the nodes' addresses would not match).
#
# Machines are numbered alphabetically by drydock as by nixpkgs, so the addresses built into the
# nodes (192.168.V.N) match drydock's as long as the composition has exactly the test's nodes:
# add no machine to it.
{ test, withTestScript ? true }:
let
  inherit (builtins)
    attrNames attrValues concatStringsSep filter head isAttrs isInt isString length
    listToAttrs map match tail typeOf;

  me = "nix/nixos-test.nix";

  # A NixOS configuration (what a node of a NixOS test is since 22.11).
  isConfig = c:
    isAttrs c && c ? system && isAttrs c.system && c.system ? build
    && isAttrs c.system.build && c.system.build ? toplevel;
  # A NixOS system (nixosSystem, eval-config, an older test's node): `.config` is one.
  isSystem = v: isAttrs v && v ? config && isConfig v.config;
  isNode = v: isConfig v || isSystem v;
  # The config first: a newer test's node is a config whose `.config` only warns.
  configOf = v: if isConfig v then v else v.config;

  isDerivation = v: isAttrs v && (v.type or null) == "derivation";

  # Up to 8 attribute names, for messages.
  names = set:
    let ns = attrNames set;
    in if ns == [ ] then "no attributes"
    else "attributes " + concatStringsSep ", " (take 8 ns)
      + (if length ns > 8 then ", ..." else "");
  take = n: xs: if n == 0 || xs == [ ] then [ ] else [ (head xs) ] ++ take (n - 1) (tail xs);

  # What `v` is, in words.
  describe = v:
    if isDerivation v then "the derivation ${v.name or "?"}, which has no `nodes`"
    else if isAttrs v then "an attribute set with ${names v}"
    else if typeOf v == "lambda" then
      "a function: call it first (a make-test-python.nix style test: import ./my-test.nix { inherit pkgs; })"
    else {
      int = "the integer ${toString v}";
      float = "a float";
      bool = "a boolean";
      string = "a string";
      path = "the path ${toString v}";
      null = "null";
      list = "a list";
    }.${typeOf v} or "a ${typeOf v}";

  expected = "`test` must be an evaluated NixOS test (what pkgs.testers.runNixOSTest, pkgs.nixosTest or nixos/lib's runTest return) or an attribute set of evaluated NixOS nodes";

  # The evaluated test's configuration (runTest, nixosTest and evalTest since 22.11), if any.
  testConfig =
    if isAttrs test && test ? config && isAttrs test.config && test.config ? nodes
    then test.config else null;

  fromTest =
    if testConfig != null then testConfig.nodes
    else if isAttrs test && test ? nodes && isAttrs test.nodes && !(isNode test.nodes)
    then test.nodes
    else null;

  nodes =
    if fromTest != null then fromTest
    else if !(isAttrs test) || isDerivation test then
      throw "${me}: ${expected}; got ${describe test}"
    else if isSystem test then
      throw "${me}: ${expected}; got one NixOS system: name it as a node, e.g. test = { server = <it>; }"
    else
      let bad = filter (n: !(isNode test.${n})) (attrNames test);
      in if bad == [ ] then test
      else throw "${me}: ${expected}; got ${describe test}, whose `${head bad}` is ${describe test.${head bad}}, not an evaluated NixOS node (no system.build.toplevel)";

  containers = if testConfig != null then testConfig.containers or { } else { };

  validName = n: match "[A-Za-z0-9]([A-Za-z0-9-]{0,38}[A-Za-z0-9])?" n != null;

  # The VLAN of each NIC, in qemu-vm's order; null when the node says nothing.
  vlansOf = v:
    if v ? allInterfaces then map (i: i.vlan) (attrValues v.allInterfaces)
    else if v ? vlans || v ? interfaces then
      (v.vlans or [ ]) ++ map (i: i.vlan) (attrValues (v.interfaces or { }))
    else null;

  machine = name: node:
    if !(validName name) then
      throw "${me}: node `${name}`: not a drydock machine name (1-40 letters, digits or '-', not starting or ending with '-'; it is the machine's hostname): rename the node in the test"
    else if !(isNode node) then
      throw "${me}: node `${name}` is ${describe node}, not an evaluated NixOS node (no system.build.toplevel)"
    else
      let
        c = configOf node;
        v = c.virtualisation or { };
        disk = v.diskSize or null;
        vlans = vlansOf v;
        opt = attr: value: if value == null then { } else { ${attr} = value; };
      in
      { system = c.system.build.toplevel; profile = "nixos-test"; }
      // opt "memorySize" (v.memorySize or null)
      // opt "cores" (v.cores or null)
      // opt "diskSize" (if isInt disk && (v.diskImage or "") != null then disk else null)
      // opt "vlans" vlans;

  # A test's script, if it is a string (plain nodes have none).
  testScript =
    let
      c = if testConfig != null then testConfig else { };
      found =
        if fromTest == null then null
        else if c ? testScriptString then c.testScriptString
        else if test ? driver && isAttrs test.driver && test.driver ? testScript
        then test.driver.testScript
        else if c ? testScript then c.testScript
        else test.testScript or null;
    in
    if isString found then found else null;

  checked =
    if attrNames nodes == [ ] then throw "${me}: the test has no nodes"
    else if containers != { } then
      throw "${me}: the test has containers (${concatStringsSep ", " (attrNames containers)}): drydock runs a test's QEMU nodes only, and nixpkgs numbers nodes and containers together"
    else nodes;
in
{
  machines = listToAttrs (map (n: { name = n; value = machine n checked.${n}; }) (attrNames checked));
}
// (if withTestScript && testScript != null then { inherit testScript; } else { })
