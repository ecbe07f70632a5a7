# A server and three agents on VLAN 1. Each agent registers its name with the server over
# the network, by name (`nc server 7000`); the server keeps the registry in /registry:
#
#   drydock up --detach
#   drydock exec server -- cat /registry      # server, agent1, agent2, agent3 (any order)
#   drydock logs --hide agent1,agent2
#   drydock down
#
# The machines boot drydock's busybox test system (scripts/guest): run
# scripts/guest/build-initrd once first. Its builders need a shell in the Nix sandbox:
#   export NIX_CONFIG='sandbox-paths = /bin/sh=/bin/busybox'
{ cache ? (let d = builtins.getEnv "DRYDOCK_CACHE_DIR"; in
    if d != "" then d else builtins.getEnv "HOME" + "/.cache/drydock") + "/guest"
}:
let
  kernelVersion =
    builtins.replaceStrings [ "\n" ] [ "" ] (builtins.readFile (cache + "/kernel/version"));
  system = services: (import ../../scripts/guest/system.nix {
    kernel = cache + "/kernel/vmlinux";
    kernelFormat = "vmlinux";
    initrd = cache + "/initrd";
    inherit kernelVersion services;
  }).toplevel;
  server = system ''
    echo server >> /registry
    while :; do nc -l -p 7000 >> /registry; done
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
