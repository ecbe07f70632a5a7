//! Evaluating compositions with real Nix (`nix-instantiate --eval`, read-only) through
//! drydock-cluster's `evaluate_composition`: a good composition's settings, and each bad
//! composition of issue #10 named by its file and attribute. (`cluster::bad_compositions_...`
//! checks the same through `drydock up`.)

use drydock_cluster::{SystemRef, evaluate_composition as evaluate};
use drydock_gc::{Cancel, StoreLayout};

/// The evaluation's deadline (the longest `up` allows).
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

/// Real evaluations (no build, no store written: `--eval` is read-only) of each bad
/// composition of issue #10, and of a good one.
#[test]
fn compositions_evaluate_or_name_what_is_wrong() {
    if std::process::Command::new("nix-instantiate")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("nix-instantiate is needed for this test");
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let layout = StoreLayout::chroot(store);
    let sys = r#"derivation { name = "s"; system = "x86_64-linux"; builder = "/bin/sh"; }"#;
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        (
            "good",
            format!(
                "{{ n ? 2 }}: {{ machines = {{ server = {{ system = {sys}; memorySize = 256; }}; agent = {{ system = \"/nix/store/x\"; vlans = [ n ]; }}; }}; }}"
            ),
            None,
        ),
        ("nomachines", "{ }".into(), Some("no attribute `machines`")),
        (
            "big",
            format!("{{ machines.server = {{ system = {sys}; memorySize = \"big\"; }}; }}"),
            Some("machines.server.memorySize: expected an integer (MiB)"),
        ),
        (
            "underscore",
            format!("{{ machines.my_server = {{ system = {sys}; }}; }}"),
            Some("machines.my_server: a machine name is a hostname"),
        ),
        (
            "notnixos",
            "{ machines.server = { system = 42; }; }".into(),
            Some("machines.server.system: expected a derivation or store path"),
        ),
        (
            "syntax",
            "{ machines = { ; }".into(),
            Some("Nix could not evaluate the composition:\nerror: syntax error"),
        ),
        (
            "lambda",
            format!("{{ machines.server = {{ system = {sys}; cores = x: x; }}; }}"),
            Some("machines.server.cores: expected an integer from 1 to 64, got a function"),
        ),
    ];
    for (name, text, says) in cases {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let file = d.join("drydock.nix");
        std::fs::write(&file, text).unwrap();
        match (evaluate(&layout, &file, DEADLINE, &Cancel::new()), says) {
            (Ok(c), None) => {
                assert_eq!(c.machines.keys().collect::<Vec<_>>(), ["agent", "server"]);
                assert_eq!(c.machines["agent"].vlans, vec![2]);
                assert_eq!(c.machines["server"].memory_mib, 256);
                assert!(matches!(
                    c.machines["server"].system,
                    SystemRef::Derivation { .. }
                ));
            }
            (Err(e), Some(says)) => {
                let text = e.to_string();
                assert!(e.is_bad_input(), "{name}: {text}");
                assert!(text.contains(says), "{name}: {text:?} should say {says:?}");
                assert!(
                    text.starts_with(&file.display().to_string()),
                    "{name}: {text} names the file"
                );
            }
            (r, _) => panic!("{name}: unexpected {r:?}"),
        }
    }
}
