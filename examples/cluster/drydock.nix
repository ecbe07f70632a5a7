# A server and three agents on VLAN 1. Each agent registers its name with the server over
# the network, by name (`nc server 7000`); the server keeps the registry in /registry:
#
#   drydock up --detach
#   drydock exec server -- cat /registry      # server, agent1, agent2, agent3 (any order)
#   drydock logs --hide agent1,agent2
#   drydock down
#
# The machines boot drydock's busybox test guest: its builder is scripts/guest/system.nix in
# drydock's repository, and its kernel and initrd come from the guest cache that
# scripts/setup (or scripts/guest/build-initrd) fills. The builds need nothing else: no
# NIX_CONFIG, no binary cache (system.nix says how).
#
# Copied elsewhere, this file finds the guest's builder through $DRYDOCK_GUEST_DIR, the
# scripts/guest directory of a drydock checkout:
#   export DRYDOCK_GUEST_DIR=/path/to/drydock/scripts/guest
# Left in drydock's repository (examples/cluster), it finds it there without it.
let
  env = name: builtins.getEnv name;
  orElse = a: b: if a != "" then a else b;

  guestDir =
    let
      set = env "DRYDOCK_GUEST_DIR";
      here = ../../scripts/guest;
    in
    if set != "" then
      if builtins.substring 0 1 set != "/" then
        throw "DRYDOCK_GUEST_DIR=${set}: not an absolute path (it names drydock's scripts/guest directory)"
      else if !builtins.pathExists (set + "/system.nix") then
        throw "DRYDOCK_GUEST_DIR=${set}: no system.nix there (it names drydock's scripts/guest directory)"
      else set
    else if builtins.pathExists (here + "/system.nix") then toString here
    else throw "drydock's test guest builder (scripts/guest/system.nix) is not beside this file: set DRYDOCK_GUEST_DIR to the scripts/guest directory of a drydock checkout";

  # The guest cache, where scripts/guest/build-initrd puts it.
  cache = orElse (env "DRYDOCK_CACHE_DIR")
    (orElse (env "XDG_CACHE_HOME") (env "HOME" + "/.cache") + "/drydock") + "/guest";
  need = file:
    if builtins.pathExists file then file
    else throw "${file} is missing: run scripts/guest/build-initrd (or scripts/setup) of a drydock checkout first, as the user who runs drydock";

  kernelVersion =
    builtins.replaceStrings [ "\n" ] [ "" ] (builtins.readFile (need (cache + "/kernel/version")));
  system = services: (import (guestDir + "/system.nix") {
    kernel = need (cache + "/kernel/vmlinux");
    kernelFormat = "vmlinux";
    initrd = need (cache + "/initrd");
    inherit kernelVersion services;
  }).toplevel;

  # One listener that serves every connection (`-ll`), each in its own process: a listener
  # restarted per connection would drop an agent that connects between two of them.
  server = system ''
    echo server >> /registry
    nc -ll -p 7000 -e sh -c 'cat >> /registry'
  '';
  agent = system ''
    until echo "$(hostname)" | nc -w 2 server 7000; do sleep 1; done
    echo "DRYDOCK-REGISTERED: $(hostname)"
  '';
in
{
  machines = {
    server = { system = server; memorySize = 256; };
    agent1 = { system = agent; memorySize = 256; };
    agent2 = { system = agent; memorySize = 256; };
    agent3 = { system = agent; memorySize = 256; };
  };
}
