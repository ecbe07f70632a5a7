//! Our `.drv` parser against Nix's own `nix show-derivation` JSON, for every derivation of a
//! real chroot store with awkward strings, several outputs and a fixed-output derivation.

use crate::common;

use std::process::Command;

use drydock_gc::parse_derivation;

#[test]
fn every_drv_of_a_real_store_matches_nix_show_derivation() {
    let dir = common::scratch("store-drv");
    let root = dir.join("root");
    let expr = format!(
        r#"let {prelude}
  a = mk "nixos-test-driver-x" [] "echo hi > $out";
  weird = derivation {{
    name = "weird-strings";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo \"q\\\\ \\\" $x\" > $out" ];
    x = "tab\there\nnewline \\ backslash \"quoted\" unicode: é ∀ ☃";
    empty = "";
  }};
  multi = derivation {{
    name = "multi";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    outputs = [ "out" "dev" "doc" ];
    args = [ "-c" "echo ${{a}} > $out; echo 1 > $dev; echo 2 > $doc" ];
    src = builtins.toFile "src.txt" "source";
  }};
  fod = derivation {{
    name = "fixed";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "printf 'hi\n' > $out" ];
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "hi\n";
  }};
  top = mk "vm-test-run-x" [ a weird multi.dev multi fod ] "echo $deps > $out";
in [ top ]
"#,
        prelude = common::PRELUDE
    );
    common::nix_build(&root, "drv", &expr, None);

    let store = root.join("nix/store");
    let mut drvs: Vec<String> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".drv"))
        .map(|n| format!("/nix/store/{n}"))
        .collect();
    drvs.sort();
    assert!(drvs.len() >= 5, "{drvs:?}");

    let out = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "show-derivation",
            "--store",
        ])
        .arg(&root)
        .args(&drvs)
        .output()
        .expect("nix show-derivation");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    for path in &drvs {
        let base = path.strip_prefix("/nix/store/").unwrap();
        let bytes = std::fs::read(store.join(base)).unwrap();
        let d = parse_derivation(&bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
        let j = &json[path];
        assert!(j.is_object(), "nix did not show {path}");
        assert_eq!(j["system"], d.system, "{path}");
        assert_eq!(j["builder"], d.builder, "{path}");
        let args: Vec<String> = serde_json::from_value(j["args"].clone()).unwrap();
        assert_eq!(args, d.args, "{path}");
        let env: std::collections::BTreeMap<String, String> =
            serde_json::from_value(j["env"].clone()).unwrap();
        assert_eq!(env, d.env, "{path}");
        let srcs: Vec<String> = serde_json::from_value(j["inputSrcs"].clone()).unwrap();
        assert_eq!(srcs, d.input_srcs, "{path}");
        let inputs: std::collections::BTreeMap<String, Vec<String>> =
            serde_json::from_value(j["inputDrvs"].clone()).unwrap();
        assert_eq!(inputs, d.input_drvs, "{path}");
        let outs = j["outputs"].as_object().unwrap();
        assert_eq!(outs.len(), d.outputs.len(), "{path}");
        for (name, o) in &d.outputs {
            let jo = &outs[name];
            assert_eq!(jo["path"], o.path, "{path} {name}");
            if o.hash.is_empty() {
                assert!(jo.get("hash").is_none(), "{path} {name}");
            } else {
                assert_eq!(jo["hash"], o.hash, "{path} {name}");
                assert_eq!(jo["hashAlgo"], o.hash_algo, "{path} {name}");
            }
        }
    }
    // The awkward strings really were exercised.
    let weird = drvs
        .iter()
        .find(|p| p.ends_with("weird-strings.drv"))
        .unwrap();
    let d = parse_derivation(&std::fs::read(store.join(&weird[11..])).unwrap()).unwrap();
    assert!(d.env["x"].contains('\t') && d.env["x"].contains('\n') && d.env["x"].contains('☃'));
    let fod = drvs.iter().find(|p| p.ends_with("fixed.drv")).unwrap();
    let d = parse_derivation(&std::fs::read(store.join(&fod[11..])).unwrap()).unwrap();
    assert_eq!(d.outputs["out"].hash_algo, "sha256");
}
