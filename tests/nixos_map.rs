//! `nix/nixos-test.nix`, the function that maps a NixOS test's evaluated nodes to a drydock
//! composition, evaluated by real Nix (`nix-instantiate --eval --strict --json`, read-only, on a
//! throwaway chroot store) on fixtures shaped like what nixpkgs evaluates: a test as
//! `runTest`/`nixosTest` return it since NixOS 22.11, one as the older `makeTest` returned it,
//! and plain attribute sets of nodes. There is no nixpkgs here: each fixture node is an
//! attribute set with the attributes nixpkgs' `qemu-vm.nix` and
//! `guest-networking-options.nix` give a node, and whatever the function must not touch (the
//! test's derivation, the deprecated `nodes.NAME.config`) throws. Then drydock itself reads
//! the mapped composition: its evaluation (the library, for the values) and `up --dry-run`
//! (the command, on nodes whose toplevels are the real test system).

use std::path::{Path, PathBuf};

use drydock_cluster::{SystemRef, evaluate_composition};
use drydock_gc::{Cancel, StoreLayout};
use serde_json::{Value, json};

use crate::vmcommon::{Cluster, composition_with, guest_ready};

/// The function under test, in the repository.
fn mapper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("nix/nixos-test.nix")
}

/// The fixtures' Nix bindings (the body of a `let`): `node NAME { virtualisation... }` is a
/// node's NixOS configuration as nixpkgs evaluates it, its toplevel `top NAME` (a string shaped
/// like a store path, or whatever `toplevel` is given); `modern NODES` and `legacy NODES` wrap
/// nodes in a test of either era; `script` is the test's script.
const FIXTURES: &str = r#"
  inherit (builtins) genList elemAt length listToAttrs mapAttrs;
  top = name: "/nix/store/00000000000000000000000000000000-nixos-system-${name}-test";
  # qemu-vm.nix's options, with its defaults; `interfaces` and `allInterfaces` as
  # guest-networking-options.nix makes them (vlans as eth1.., then the named interfaces), or
  # neither with `old = true` (releases before named interfaces).
  node = name: { memorySize ? 1024, cores ? 1, diskSize ? 1024, diskImage ? "./${name}.qcow2",
                 vlans ? [ 1 ], interfaces ? { }, old ? false, toplevel ? top name }:
    let
      named = mapAttrs (n: i: { name = n; assignIP = false; } // i) interfaces;
      numbered = listToAttrs (genList (i: {
        name = "eth${toString (i + 1)}";
        value = { name = "eth${toString (i + 1)}"; vlan = elemAt vlans i; assignIP = true; };
      }) (length vlans));
    in {
      system.build.toplevel = toplevel;
      system.build.vm = throw "built nodes.${name}.system.build.vm";
      networking.hostName = name;
      virtualisation = { inherit memorySize cores diskSize diskImage vlans; }
        // (if old then { } else { interfaces = named; allInterfaces = numbered // named; });
    };
  script = "start_all()\nserver.wait_for_unit(\"k3s\")\n";
  # What runTest, pkgs.testers.runNixOSTest and pkgs.nixosTest return since 22.11: the test's
  # (lazy) derivation with passthru: nodes (each config with a deprecated `.config`), config
  # (the test's own configuration), driver.
  modern = nodes: {
    type = "derivation"; name = "vm-test-run-k3s";
    drvPath = throw "evaluated the test's drvPath"; outPath = throw "built the test";
    nodes = mapAttrs (n: c: c // { config = throw "read the deprecated nodes.${n}.config"; }) nodes;
    config = { inherit nodes; containers = { }; name = "k3s"; testScript = script; testScriptString = script; };
    driver = { type = "derivation"; name = "nixos-test-driver-k3s"; testScript = script; outPath = throw "built the driver"; };
    driverInteractive = throw "read driverInteractive";
  };
  # A NixOS system (nixosSystem, eval-config.nix, an older test's node).
  system = c: { config = c; options = { }; _type = "configuration"; pkgs = throw "read pkgs"; extendModules = throw "read extendModules"; };
  # What makeTest (and so pkgs.nixosTest) returned before 22.11: the test run's derivation //
  # { test, driver, driverInteractive, nodes }, each node a NixOS system; the script is the
  # driver's `testScript`.
  legacy = nodes: {
    type = "derivation"; name = "vm-test-run-k3s";
    drvPath = throw "evaluated the test's drvPath"; outPath = throw "built the test";
    nodes = mapAttrs (n: system) nodes;
    driver = { type = "derivation"; name = "nixos-test-driver-k3s"; testScript = script; outPath = throw "built the driver"; };
    test = throw "read test"; driverInteractive = throw "read driverInteractive";
  };
"#;

/// The three nodes of the fixture test: different sizes and VLANs, a null `diskSize`, a tmpfs
/// root (`diskImage = null`) and, unless `old`, a named interface.
fn three_nodes(old: bool) -> String {
    let server = if old {
        "vlans = [ 1 2 ]; old = true;"
    } else {
        "vlans = [ 1 ]; interfaces.enp9s0.vlan = 2;"
    };
    format!(
        r#"{{
    server = node "server" {{ memorySize = 1536; cores = 2; diskSize = 4096; {server} }};
    agent1 = node "agent1" {{ diskSize = null; old = {old}; }};
    agent2 = node "agent2" {{ memorySize = 768; diskSize = 2048; diskImage = null; vlans = [ 2 3 ]; old = {old}; }};
  }}"#
    )
}

/// `nix/nixos-test.nix` applied to `{ test = TEST; } // ARGS` in the fixtures' scope, evaluated
/// as drydock evaluates a composition (`--eval --strict --json`, on a throwaway chroot store):
/// the JSON, or Nix's message.
fn map_test(test: &str, args: &str) -> Result<Value, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("case.nix");
    std::fs::write(
        &file,
        format!(
            "let {FIXTURES} in import {} ({{ test = {test}; }} // {args})\n",
            mapper().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(&file)
        .arg("--store")
        .arg(dir.path().join("store"))
        .output()
        .expect("nix-instantiate is needed for this test");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The fixture's store path for `name`, as `top` makes it.
fn top(name: &str) -> String {
    format!("/nix/store/{}-nixos-system-{name}-test", "0".repeat(32))
}

/// The composition of the three nodes (`old`: as a release before named interfaces has them).
fn expected_machines(old: bool) -> Value {
    json!({
        "server": {
            "system": top("server"), "profile": "nixos-test",
            "memorySize": 1536, "cores": 2, "diskSize": 4096,
            // allInterfaces by name: enp9s0 (VLAN 2) before eth1 (VLAN 1), as qemu-vm adds them.
            "vlans": if old { [1, 2] } else { [2, 1] },
        },
        // diskSize null: left out (drydock's default).
        "agent1": { "system": top("agent1"), "profile": "nixos-test", "memorySize": 1024, "cores": 1, "vlans": [1] },
        // diskImage null (a tmpfs root): no disk, so no diskSize.
        "agent2": { "system": top("agent2"), "profile": "nixos-test", "memorySize": 768, "cores": 1, "vlans": [2, 3] },
    })
}

/// (a) A test as runTest/nixosTest return it since 22.11: every node becomes a machine with its
/// toplevel, sizes, VLANs and the nixos-test profile, and the script comes along; neither the
/// test's derivation nor the deprecated `nodes.NAME.config` is touched (they throw).
#[test]
fn an_evaluated_test_becomes_a_composition_of_its_nodes() {
    let nodes = three_nodes(false);
    let got = map_test(&format!("modern {nodes}"), "{ }").unwrap();
    assert_eq!(
        got,
        json!({ "machines": expected_machines(false), "testScript": "start_all()\nserver.wait_for_unit(\"k3s\")\n" })
    );
    // withTestScript = false: no script, and it is not even evaluated.
    let t = format!(
        "(let t = modern {nodes}; in t // {{ config = t.config // {{ testScriptString = throw \"read the script\"; }}; }})"
    );
    let got = map_test(&t, "{ withTestScript = false; }").unwrap();
    assert_eq!(got, json!({ "machines": expected_machines(false) }));
    // The test's own configuration (evalTest's `.config`, or passthru.config) maps the same.
    let got = map_test(&format!("(modern {nodes}).config"), "{ }").unwrap();
    assert_eq!(got["machines"], expected_machines(false));
    assert_eq!(
        got["testScript"],
        "start_all()\nserver.wait_for_unit(\"k3s\")\n"
    );
    // A script that is still a function (no testScriptString to apply it): left out.
    let t = format!(
        "{{ config = {{ nodes = {nodes}; testScript = {{ nodes }}: \"start_all()\"; }}; }}"
    );
    let got = map_test(&t, "{ }").unwrap();
    assert_eq!(got, json!({ "machines": expected_machines(false) }));
}

/// (a) and (b): a test as makeTest returned it before 22.11 (nodes are NixOS systems, the script
/// is the driver's), a plain attribute set of NixOS systems, and one of NixOS configs (a newer
/// test's `.nodes`) become the same machines; plain nodes have no script. A `diskSize` of
/// "auto" is left out, and a node without qemu-vm's options gets only its system and profile.
#[test]
fn older_tests_and_plain_nodes_become_the_same_machines() {
    let nodes = three_nodes(true);
    let script = "start_all()\nserver.wait_for_unit(\"k3s\")\n";
    let got = map_test(&format!("legacy {nodes}"), "{ }").unwrap();
    assert_eq!(
        got,
        json!({ "machines": expected_machines(true), "testScript": script })
    );
    let got = map_test(&format!("mapAttrs (n: system) {nodes}"), "{ }").unwrap();
    assert_eq!(got, json!({ "machines": expected_machines(true) }));
    let got = map_test(&nodes, "{ }").unwrap();
    assert_eq!(got, json!({ "machines": expected_machines(true) }));
    // A newer test's `.nodes` given as plain nodes: configs whose `.config` only warns (throws here).
    let got = map_test(&format!("(modern {}).nodes", three_nodes(false)), "{ }").unwrap();
    assert_eq!(got, json!({ "machines": expected_machines(false) }));

    let got = map_test(
        r#"{ auto = node "auto" { diskSize = "auto"; }; bare = system { system.build.toplevel = top "bare"; }; }"#,
        "{ }",
    )
    .unwrap();
    assert_eq!(
        got,
        json!({ "machines": {
            "auto": { "system": top("auto"), "profile": "nixos-test", "memorySize": 1024, "cores": 1, "vlans": [1] },
            "bare": { "system": top("bare"), "profile": "nixos-test" },
        } })
    );
}

/// (c) What is neither a test nor nodes, and nodes drydock cannot take, fail with a message that
/// names what was given.
#[test]
fn what_is_not_a_test_or_a_node_is_named() {
    let not_a_test = "nix/nixos-test.nix: `test` must be an evaluated NixOS test";
    let cases: &[(&str, &[&str])] = &[
        (
            r#"modern { server = node "server" { }; agent_1 = node "agent_1" { }; }"#,
            &["node `agent_1`: not a drydock machine name (1-40 letters, digits or '-'"],
        ),
        (
            r#"{ "-agent" = node "x" { }; }"#,
            &["node `-agent`: not a drydock machine name"],
        ),
        ("42", &[not_a_test, "got the integer 42"]),
        (r#""server""#, &[not_a_test, "got a string"]),
        (
            "{ pkgs }: { }",
            &[not_a_test, "got a function: call it first"],
        ),
        (
            r#"{ type = "derivation"; name = "hello-2.12"; outPath = throw "built hello"; }"#,
            &[
                not_a_test,
                "got the derivation hello-2.12, which has no `nodes`",
            ],
        ),
        (
            r#"{ server = node "server" { }; notes = "a string"; }"#,
            &[
                not_a_test,
                "whose `notes` is a string, not an evaluated NixOS node",
            ],
        ),
        (
            r#"system (node "server" { })"#,
            &[not_a_test, "got one NixOS system: name it as a node"],
        ),
        (
            r#"modern { server = { services.k3s.enable = true; }; }"#,
            &[
                "node `server` is an attribute set with attributes services, not an evaluated NixOS node",
            ],
        ),
        ("modern { }", &["nix/nixos-test.nix: the test has no nodes"]),
        (
            r#"(let t = modern { server = node "server" { }; }; in t // { config = t.config // { containers.db = { }; }; })"#,
            &["the test has containers (db): drydock runs a test's QEMU nodes only"],
        ),
    ];
    for (test, says) in cases {
        let err = map_test(test, "{ }").expect_err(test);
        for s in *says {
            assert!(err.contains(s), "{test}: {err:?} should say {s:?}");
        }
    }
    // At most 40 characters, as drydock's machine names.
    let forty = format!("a{}z", "0".repeat(38));
    let got = map_test(&format!(r#"{{ {forty} = node "x" {{ }}; }}"#), "{ }").unwrap();
    assert_eq!(got["machines"][&forty]["system"], top("x"));
    let long = format!("{forty}1");
    let err = map_test(&format!(r#"{{ {long} = node "x" {{ }}; }}"#), "{ }").unwrap_err();
    assert!(
        err.contains(&format!("node `{long}`: not a drydock machine name")),
        "{err}"
    );
}

/// The mapped composition, as a composition file's expression: `nix/nixos-test.nix` applied to
/// `test`.
fn mapped_composition(test: &str) -> String {
    format!("(import {} {{ test = {test}; }})", mapper().display())
}

/// drydock's own evaluation (the code `up` runs before it builds) reads the mapped composition
/// of the fixture test with its values, drydock's default disk where the mapping left
/// `diskSize` out, and ignores the top-level `testScript`. Read-only: `--eval` writes nothing.
#[test]
fn drydock_evaluates_the_mapped_composition() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("drydock.nix");
    std::fs::write(
        &file,
        format!(
            "let {FIXTURES} in {}\n",
            mapped_composition(&format!("modern {}", three_nodes(false)))
        ),
    )
    .unwrap();
    let layout = StoreLayout::chroot(dir.path().join("store"));
    let c = evaluate_composition(
        &layout,
        &file,
        std::time::Duration::from_secs(300),
        &Cancel::new(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let m = |name: &str| &c.machines[name];
    assert_eq!(
        c.machines.keys().collect::<Vec<_>>(),
        ["agent1", "agent2", "server"]
    );
    for (name, memory, cores, disk, vlans) in [
        ("server", 1536, 2, 4096, vec![2, 1]),
        ("agent1", 1024, 1, 1024, vec![1]),
        ("agent2", 768, 1, 1024, vec![2, 3]),
    ] {
        assert_eq!(
            (
                m(name).memory_mib,
                m(name).cores,
                m(name).disk_mib,
                &m(name).vlans
            ),
            (memory, cores, disk, &vlans),
            "{name}"
        );
        assert_eq!(m(name).system, SystemRef::Path { path: top(name) });
        assert_eq!(m(name).profile, drydock_vm::Profile::NixosTest, "{name}");
    }
}

/// `drydock up --dry-run` (evaluate, build, check that each system is NixOS-shaped, plan;
/// nothing boots) takes the mapped composition of a test whose nodes' toplevels are drydock's
/// real test system: one `create` per node.
#[test]
fn up_dry_run_plans_the_nodes_of_a_mapped_test() {
    guest_ready();
    let test = r#"modern {
      server = node "server" { memorySize = 256; vlans = [ 1 2 ]; toplevel = sys { }; };
      agent1 = node "agent1" { memorySize = 256; diskSize = null; toplevel = sys { }; };
    }"#;
    let c = Cluster::named("nixmap")
        .composition(&composition_with(&format!(
            "let {FIXTURES} in {}",
            mapped_composition(test)
        )))
        .write();
    let report = c
        .verb("up")
        .args(["--dry-run", "--json"])
        .run()
        .ok()
        .stdout_json();
    let planned: Vec<(&str, &str)> = report["machines"]
        .as_array()
        .unwrap_or_else(|| panic!("no machines: {report}"))
        .iter()
        .map(|m| {
            (
                m["machine"].as_str().unwrap(),
                m["action"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        planned,
        [("agent1", "create"), ("server", "create")],
        "{report}"
    );
    assert_eq!(report["dry_run"], true, "{report}");
}
