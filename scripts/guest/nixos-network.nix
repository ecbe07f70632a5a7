# The network facts of a set of nixos-test nodes, computed the way NixOS's test framework
# (nixos/lib/testing/network.nix) computes them, so a composition can give each node
# (nixos-node.nix) what a nixosTest gives it:
#
#   net = import ./nixos-network.nix { machines = { server = { vlans = [ 1 2 ]; }; client = { }; }; };
#   node = name: (import ./nixos-node.nix ({ kernel = ...; initrd = ...; } // net.${name})).toplevel;
#
# Arguments:
#   machines        { NAME = { vlans ? [ 1 ]; ... }; ... }: the nodes (other attributes ignored)
#   hostsEveryVlan  false (NixOS): one /etc/hosts line per node, its primary address (its first
#                   VLAN's); true: a line for every node on every one of its VLANs
#
# Returns { NAME = { hostName; nodeNumber; vlans; hosts; }; ... }, exactly nixos-node.nix's
# arguments of those names:
#   nodeNumber  1.. in sorted name order (builtins.attrNames), at most 254 nodes
#   vlans       the node's VLANs, in its order: the i-th is eth<i>, MAC 52:54:00:12:VV:NN
#               (VV the VLAN, NN the node number, two hex digits each), address 192.168.V.N/24
#   hosts       the same text for every node: "192.168.V.N NAME\n" lines, in sorted name order
{ machines, hostsEveryVlan ? false }:
let
  names = builtins.attrNames machines;
  count = builtins.length names;
  numbers = builtins.listToAttrs
    (builtins.genList (i: { name = builtins.elemAt names i; value = i + 1; }) count);
  vlansOf = name:
    let
      v = machines.${name}.vlans or [ 1 ];
      bad = builtins.filter (x: !(builtins.isInt x) || x < 1 || x > 255) v;
    in
    if bad != [ ] then throw "nixos-network.nix: machine ${name}: VLANs are numbers 1..255"
    else v;
  address = name: vlan: "192.168.${toString vlan}.${toString numbers.${name}}";
  linesOf = name:
    let v = vlansOf name; in
    if v == [ ] then [ ]
    else map (vlan: "${address name vlan} ${name}\n")
      (if hostsEveryVlan then v else [ (builtins.head v) ]);
  hosts = builtins.concatStringsSep "" (builtins.concatMap linesOf names);
in
if count > 254 then throw "nixos-network.nix: at most 254 machines (NixOS's test framework numbers them 1..254)"
else builtins.listToAttrs (map
  (name: {
    inherit name;
    value = {
      hostName = name;
      nodeNumber = numbers.${name};
      vlans = vlansOf name;
      inherit hosts;
    };
  })
  names)
