//! The pure layer of a cluster: a composition's settings (the JSON that `nix-instantiate
//! --eval --strict --json` printed for `drydock.nix`, see `eval`) become a [`Composition`],
//! checked value by value with errors that name the file and the attribute; a composition and a
//! cluster name become a [`ClusterPlan`]: machines numbered in alphabetical order, MACs,
//! addresses, the hosts table, VM names and each machine's NICs. No I/O happens here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use drydock_vm::Profile;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The kernel command line word that names the machine.
pub const MACHINE_PARAM: &str = "drydock.machine";
/// The firmware config file holding the hosts table.
pub const HOSTS_FW_CFG: &str = "opt/drydock/hosts";

/// What a machine boots, as Nix evaluated it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum SystemRef {
    /// A derivation: built by the cluster's one `nix-build`.
    Derivation { drv_path: String, out_path: String },
    /// A store path (or a path to a link to one) given as a string.
    Path { path: String },
}

impl SystemRef {
    /// The path to boot once built (the derivation's output).
    pub fn target(&self) -> &str {
        match self {
            Self::Derivation { out_path, .. } => out_path,
            Self::Path { path } => path,
        }
    }
}

/// One machine's settings, defaults applied (names follow NixOS's `virtualisation.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSettings {
    pub system: SystemRef,
    /// `memorySize`, MiB.
    pub memory_mib: u32,
    pub cores: u32,
    /// `diskSize`, MiB.
    pub disk_mib: u32,
    /// The VLANs, in the order given.
    pub vlans: Vec<u8>,
    /// `profile`: which devices the machine gets (`drydock` or `nixos-test`).
    #[serde(default)]
    pub profile: Profile,
}

/// A checked composition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Composition {
    pub file: PathBuf,
    /// By name: alphabetical, which is also their numbering.
    pub machines: BTreeMap<String, MachineSettings>,
    /// The top-level `testScript` (what `drydock test` runs when no script is given).
    #[serde(default)]
    pub test_script: TestScript,
}

/// A composition's top-level `testScript`, as NixOS tests have it: Python, as a string.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TestScript {
    #[default]
    Absent,
    Text(String),
    /// Not a string: its Nix type (`up` ignores it; `test` says so).
    Other(String),
}

/// Why a composition is bad input. Every message starts with the file and names the attribute.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ComposeError {
    #[error("{}: the composition must be an attribute set (or a function returning one), not {found}", file.display())]
    NotAttrs { file: PathBuf, found: String },
    #[error("{}: the composition has no attribute `machines`", file.display())]
    NoMachines { file: PathBuf },
    #[error("{}: `machines` has no machine", file.display())]
    Empty { file: PathBuf },
    #[error("{}: machines.{name}: a machine name is a hostname: 1-40 letters, digits or '-', not starting or ending with '-'", file.display())]
    BadName { file: PathBuf, name: String },
    /// `attr` is the attribute's full path, e.g. `machines.server.memorySize`.
    #[error("{}: {attr}: {message}", file.display())]
    BadValue {
        file: PathBuf,
        attr: String,
        message: String,
    },
    #[error("{}: machines.{machine}: unknown attribute `{attr}` (known: system, profile, memorySize, cores, diskSize, vlans)", file.display())]
    Unknown {
        file: PathBuf,
        machine: String,
        attr: String,
    },
    #[error("{}: a composition has at most 254 machines (got {count})", file.display())]
    TooMany { file: PathBuf, count: usize },
    #[error(
        "cluster name {name:?}: with machine {machine:?} the VM name {name}.{machine} is longer than 40 characters or not a valid name; choose a shorter one with -p"
    )]
    VmName { name: String, machine: String },
    #[error("cluster name {0:?}: use letters, digits and '-' (at most 30), not starting with '-'")]
    ClusterName(String),
    #[error("{}: the machine {name:?} is not in the composition (it has {})", file.display(), has.join(", "))]
    NoSuchMachine {
        file: PathBuf,
        name: String,
        has: Vec<String>,
    },
}

impl ComposeError {
    /// Every composition error is the composition's fault.
    pub fn is_bad_input(&self) -> bool {
        true
    }
}

/// Check a machine name: a hostname label, at most 40 characters.
pub fn valid_machine_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The default cluster name: the name of the directory holding the composition, lower-cased,
/// characters other than letters, digits and `-` replaced by `-`.
pub fn default_cluster_name(file: &Path) -> String {
    let dir = std::path::absolute(file)
        .ok()
        .and_then(|f| f.parent().map(Path::to_path_buf))
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "cluster".into());
    let name: String = dir
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_start_matches('-').to_string();
    if name.is_empty() {
        "cluster".into()
    } else {
        name.chars().take(30).collect()
    }
}

fn type_of(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(n) if n.is_i64() || n.is_u64() => format!("the integer {n}"),
        Value::Number(n) => format!("the float {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(o) => match o.get("__drydockType").and_then(Value::as_str) {
            Some(t) => format!("a {t}"),
            None => "an attribute set".into(),
        },
    }
}

/// Parse what the evaluation printed (see `eval::SETTINGS_EXPR`): `{"error": ...}` or
/// `{"machines": {NAME: {ATTR: VALUE}}}` with `system` as `{"kind": ...}`.
pub fn parse_settings(file: &Path, v: &Value) -> Result<Composition, ComposeError> {
    let file_buf = file.to_path_buf();
    match v.get("error").and_then(Value::as_str) {
        Some("no-machines") => return Err(ComposeError::NoMachines { file: file_buf }),
        Some("not-attrs") => {
            return Err(ComposeError::NotAttrs {
                file: file_buf,
                found: v
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
            });
        }
        Some("machines-not-attrs") => {
            return Err(ComposeError::BadValue {
                file: file_buf,
                attr: "machines".into(),
                message: format!(
                    "must be an attribute set of machines, not a {}",
                    v.get("type").and_then(Value::as_str).unwrap_or("?")
                ),
            });
        }
        _ => {}
    }
    let Some(machines) = v.get("machines").and_then(Value::as_object) else {
        return Err(ComposeError::NoMachines { file: file_buf });
    };
    if machines.is_empty() {
        return Err(ComposeError::Empty { file: file_buf });
    }
    if machines.len() > 254 {
        return Err(ComposeError::TooMany {
            file: file_buf,
            count: machines.len(),
        });
    }
    let mut out = BTreeMap::new();
    for (name, m) in machines {
        if !valid_machine_name(name) {
            return Err(ComposeError::BadName {
                file: file_buf,
                name: name.clone(),
            });
        }
        out.insert(name.clone(), parse_machine(file, name, m)?);
    }
    let test_script = match v.get("testScript") {
        None | Some(Value::Null) => TestScript::Absent,
        Some(Value::String(text)) => TestScript::Text(text.clone()),
        Some(other) => TestScript::Other(type_of(other)),
    };
    Ok(Composition {
        file: file_buf,
        machines: out,
        test_script,
    })
}

fn parse_machine(file: &Path, name: &str, m: &Value) -> Result<MachineSettings, ComposeError> {
    let bad = |attr: &str, message: String| ComposeError::BadValue {
        file: file.to_path_buf(),
        attr: format!("machines.{name}.{attr}"),
        message,
    };
    let Some(attrs) = m.get("attrs").and_then(Value::as_object) else {
        let found = m.get("type").and_then(Value::as_str).unwrap_or("?");
        return Err(ComposeError::BadValue {
            file: file.to_path_buf(),
            attr: format!("machines.{name}"),
            message: format!("a machine must be an attribute set, not a {found}"),
        });
    };
    for k in attrs.keys() {
        if !matches!(
            k.as_str(),
            "system" | "profile" | "memorySize" | "cores" | "diskSize" | "vlans"
        ) {
            return Err(ComposeError::Unknown {
                file: file.to_path_buf(),
                machine: name.to_string(),
                attr: k.clone(),
            });
        }
    }
    let int =
        |attr: &str, default: u32, min: u32, max: u32, unit: &str| -> Result<u32, ComposeError> {
            match attrs.get(attr) {
                None => Ok(default),
                Some(v) => match v.as_u64() {
                    Some(n) if (min as u64..=max as u64).contains(&n) => Ok(n as u32),
                    _ => Err(bad(
                        attr,
                        format!(
                            "expected an integer{unit} from {min} to {max}, got {}",
                            type_of(v)
                        ),
                    )),
                },
            }
        };
    let profile = match attrs.get("profile") {
        None => Profile::default(),
        Some(v) => v.as_str().and_then(Profile::parse).ok_or_else(|| {
            bad(
                "profile",
                format!(
                    "expected one of {}, got {}",
                    Profile::ALL.map(|p| format!("{:?}", p.as_str())).join(", "),
                    type_of(v)
                ),
            )
        })?,
    };
    let defaults = profile.defaults();
    let memory_mib = int("memorySize", defaults.memory_mib, 64, 1 << 20, " (MiB)")?;
    let cores = int("cores", defaults.cpus, 1, 64, "")?;
    let disk_mib = int("diskSize", defaults.disk_mib, 16, 1 << 24, " (MiB)")?;
    let vlans = match attrs.get("vlans") {
        None => vec![1],
        Some(Value::Array(xs)) => {
            let mut vlans = Vec::new();
            for x in xs {
                match x.as_u64() {
                    Some(n @ 1..=254) if !vlans.contains(&(n as u8)) => vlans.push(n as u8),
                    Some(n @ 1..=254) => {
                        return Err(bad("vlans", format!("VLAN {n} is listed twice")));
                    }
                    _ => {
                        return Err(bad(
                            "vlans",
                            format!("a VLAN is an integer from 1 to 254, got {}", type_of(x)),
                        ));
                    }
                }
            }
            vlans
        }
        Some(v) => {
            return Err(bad(
                "vlans",
                format!(
                    "expected a list of integers from 1 to 254, got {}",
                    type_of(v)
                ),
            ));
        }
    };
    let system = match attrs.get("system") {
        None => {
            return Err(bad(
                "system",
                "missing: every machine needs a system (a NixOS toplevel)".into(),
            ));
        }
        Some(v) => parse_system(v).map_err(|m| bad("system", m))?,
    };
    Ok(MachineSettings {
        system,
        memory_mib,
        cores,
        disk_mib,
        vlans,
        profile,
    })
}

fn parse_system(v: &Value) -> Result<SystemRef, String> {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let what = "expected a derivation or store path of a NixOS-shaped toplevel";
    match v.get("kind").and_then(Value::as_str) {
        Some("derivation") => match (s("drv"), s("out")) {
            (Some(drv_path), Some(out_path)) => Ok(SystemRef::Derivation { drv_path, out_path }),
            _ => Err(format!("{what}, got an attribute set without drvPath")),
        },
        Some("path") => match s("value") {
            Some(path) if path.starts_with('/') => Ok(SystemRef::Path { path }),
            Some(path) => Err(format!("{what}, got the relative path {path:?}")),
            None => Err(what.to_string()),
        },
        _ => Err(format!(
            "{what}, got {}",
            v.get("type").and_then(Value::as_str).map_or_else(
                || "something else".to_string(),
                |t| format!("a value of type {t}")
            )
        )),
    }
}

/// A machine's NIC on one VLAN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicPlan {
    pub vlan: u8,
    /// `52:54:00:12:VV:NN`.
    pub mac: String,
    /// `192.168.V.N`.
    pub address: String,
}

/// One machine of a cluster plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachinePlan {
    pub machine: String,
    /// `CLUSTER.MACHINE`.
    pub vm_name: String,
    /// 1..N in alphabetical order.
    pub number: u8,
    pub nics: Vec<NicPlan>,
    /// Words added to the system's kernel command line.
    pub append: String,
    pub settings: MachineSettings,
}

/// A cluster, planned: what every launch and hub needs, as data. (The default, empty, stands
/// for no plan in a control request that needs none.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPlan {
    pub name: String,
    /// The composition it was planned from (absolute); `None` in records older than this field.
    #[serde(default)]
    pub file: Option<PathBuf>,
    pub machines: Vec<MachinePlan>,
    /// Every VLAN some machine is on, ascending: one hub each.
    pub vlans: Vec<u8>,
    /// The `/etc/hosts` table (fw_cfg `opt/drydock/hosts`).
    pub hosts: String,
}

impl ClusterPlan {
    pub fn machine(&self, name: &str) -> Option<&MachinePlan> {
        self.machines.iter().find(|m| m.machine == name)
    }

    /// The machines' names, in the plan's order (for messages that list them).
    pub fn machine_names(&self) -> Vec<String> {
        self.machines.iter().map(|m| m.machine.clone()).collect()
    }
    /// The machines on `vlan`.
    pub fn on_vlan(&self, vlan: u8) -> impl Iterator<Item = &MachinePlan> {
        self.machines
            .iter()
            .filter(move |m| m.nics.iter().any(|n| n.vlan == vlan))
    }
}

/// Check a cluster name (`-p`): it prefixes every VM name.
pub fn validate_cluster_name(name: &str) -> Result<(), ComposeError> {
    if name.is_empty()
        || name.len() > 30
        || name.starts_with('-')
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(ComposeError::ClusterName(name.to_string()));
    }
    Ok(())
}

/// Plan the cluster `name` of the composition `c`.
pub fn plan_cluster(name: &str, c: &Composition) -> Result<ClusterPlan, ComposeError> {
    validate_cluster_name(name)?;
    let mut machines = Vec::new();
    let mut vlans: Vec<u8> = Vec::new();
    for (i, (machine, settings)) in c.machines.iter().enumerate() {
        let number = u8::try_from(i + 1).map_err(|_| ComposeError::TooMany {
            file: c.file.clone(),
            count: c.machines.len(),
        })?;
        let vm_name = format!("{name}.{machine}");
        if drydock_vm::validate_name(&vm_name).is_err() {
            return Err(ComposeError::VmName {
                name: name.into(),
                machine: machine.clone(),
            });
        }
        let nics = settings
            .vlans
            .iter()
            .map(|&v| NicPlan {
                vlan: v,
                mac: format!("52:54:00:12:{v:02x}:{number:02x}"),
                address: format!("192.168.{v}.{number}"),
            })
            .collect();
        vlans.extend(&settings.vlans);
        machines.push(MachinePlan {
            machine: machine.clone(),
            vm_name,
            number,
            nics,
            append: format!("{MACHINE_PARAM}={machine}"),
            settings: settings.clone(),
        });
    }
    vlans.sort_unstable();
    vlans.dedup();
    let hosts = machines
        .iter()
        .flat_map(|m| {
            m.nics
                .iter()
                .map(move |n| format!("{} {}\n", n.address, m.machine))
        })
        .collect();
    Ok(ClusterPlan {
        name: name.into(),
        file: Some(c.file.clone()),
        machines,
        vlans,
        hosts,
    })
}

/// A composition of test-only machines `(name, VLANs)` on one made-up system path each (for the
/// crate's unit tests).
#[cfg(test)]
pub(crate) fn test_composition(machines: &[(&str, &[u8])]) -> Composition {
    Composition {
        file: PathBuf::from("/c/drydock.nix"),
        machines: machines
            .iter()
            .map(|(n, vlans)| {
                (
                    n.to_string(),
                    MachineSettings {
                        system: SystemRef::Path {
                            path: format!("/nix/store/{:0>32}-{n}", 0),
                        },
                        memory_mib: 256,
                        cores: 1,
                        disk_mib: 1024,
                        vlans: vlans.to_vec(),
                        profile: Default::default(),
                    },
                )
            })
            .collect(),
        test_script: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn drv(n: &str) -> Value {
        json!({"kind": "derivation", "drv": format!("/nix/store/{n}.drv"), "out": format!("/nix/store/{n}")})
    }

    fn file() -> PathBuf {
        PathBuf::from("/p/demo/drydock.nix")
    }

    #[test]
    fn a_test_script_is_a_string_or_said_not_to_be() {
        let m = json!({"m": {"attrs": {"system": drv("m")}}});
        let cases = [
            (json!({"machines": m}), TestScript::Absent),
            (
                json!({"machines": m, "testScript": null}),
                TestScript::Absent,
            ),
            (
                json!({"machines": m, "testScript": "start_all()\n"}),
                TestScript::Text("start_all()\n".into()),
            ),
            (
                json!({"machines": m, "testScript": {"__drydockType": "function"}}),
                TestScript::Other("a function".into()),
            ),
        ];
        for (v, want) in cases {
            assert_eq!(
                parse_settings(&file(), &v).unwrap().test_script,
                want,
                "{v}"
            );
        }
    }

    #[test]
    fn settings_get_defaults_and_plans_number_alphabetically() {
        let v = json!({"machines": {
            "server": {"attrs": {"system": drv("s"), "memorySize": 1536, "vlans": [1, 2]}},
            "agent2": {"attrs": {"system": drv("a")}},
            "agent1": {"attrs": {"system": {"kind": "path", "value": "/nix/store/a"}, "vlans": []}},
        }});
        let c = parse_settings(&file(), &v).unwrap();
        let a2 = &c.machines["agent2"];
        assert_eq!(
            (a2.memory_mib, a2.cores, a2.disk_mib, a2.vlans.clone()),
            (512, 1, 1024, vec![1])
        );
        assert_eq!(a2.profile, Profile::Drydock);
        // A nixos-test node gets qemu-vm's defaults; what is set stays set.
        let v = json!({"machines": {
            "n": {"attrs": {"system": drv("n"), "profile": "nixos-test"}},
            "k": {"attrs": {"system": drv("k"), "profile": "nixos-test", "memorySize": 1536, "diskSize": 4096}},
        }});
        let nodes = parse_settings(&file(), &v).unwrap();
        assert_eq!(c.test_script, TestScript::Absent);
        let (n, k) = (&nodes.machines["n"], &nodes.machines["k"]);
        assert_eq!(
            (n.profile, n.memory_mib, n.cores, n.disk_mib),
            (Profile::NixosTest, 1024, 1, 1024)
        );
        assert_eq!((k.memory_mib, k.disk_mib), (1536, 4096));
        let p = plan_cluster("demo", &c).unwrap();
        type Row<'a> = (&'a str, &'a str, u8, Vec<(&'a str, &'a str)>);
        let rows: Vec<Row> = p
            .machines
            .iter()
            .map(|m| {
                (
                    m.machine.as_str(),
                    m.vm_name.as_str(),
                    m.number,
                    m.nics
                        .iter()
                        .map(|n| (n.mac.as_str(), n.address.as_str()))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                ("agent1", "demo.agent1", 1, vec![]),
                (
                    "agent2",
                    "demo.agent2",
                    2,
                    vec![("52:54:00:12:01:02", "192.168.1.2")]
                ),
                (
                    "server",
                    "demo.server",
                    3,
                    vec![
                        ("52:54:00:12:01:03", "192.168.1.3"),
                        ("52:54:00:12:02:03", "192.168.2.3")
                    ]
                ),
            ]
        );
        assert_eq!(p.vlans, vec![1, 2]);
        assert_eq!(
            p.hosts,
            "192.168.1.2 agent2\n192.168.1.3 server\n192.168.2.3 server\n"
        );
        assert_eq!(p.machines[2].append, "drydock.machine=server");
        assert_eq!(
            p.on_vlan(1).map(|m| m.number).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(c.machines["agent1"].system.target(), "/nix/store/a");
    }

    #[test]
    fn vlan_numbers_are_hex_in_the_mac() {
        let v = json!({"machines": {"m": {"attrs": {"system": drv("s"), "vlans": [200, 10]}}}});
        let p = plan_cluster("c", &parse_settings(&file(), &v).unwrap()).unwrap();
        let macs: Vec<_> = p.machines[0].nics.iter().map(|n| n.mac.as_str()).collect();
        assert_eq!(macs, ["52:54:00:12:c8:01", "52:54:00:12:0a:01"]);
        assert_eq!(p.hosts, "192.168.200.1 m\n192.168.10.1 m\n");
        assert_eq!(p.vlans, vec![10, 200]);
    }

    #[test]
    fn bad_compositions_name_file_and_attribute() {
        let m = |attrs: Value| json!({"machines": {"server": {"attrs": attrs}}});
        let cases: Vec<(Value, &str)> = vec![
            (
                json!({"error": "no-machines"}),
                "/p/demo/drydock.nix: the composition has no attribute `machines`",
            ),
            (
                json!({"error": "not-attrs", "type": "int"}),
                "must be an attribute set",
            ),
            (json!({"machines": {}}), "`machines` has no machine"),
            (
                json!({"machines": {"my_server": {"attrs": {"system": drv("s")}}}}),
                "/p/demo/drydock.nix: machines.my_server: a machine name is a hostname",
            ),
            (
                m(json!({"system": drv("s"), "memorySize": "big"})),
                "/p/demo/drydock.nix: machines.server.memorySize: expected an integer (MiB) from 64 to 1048576, got the string \"big\"",
            ),
            (
                m(json!({"system": drv("s"), "cores": 0})),
                "machines.server.cores:",
            ),
            (
                m(json!({"system": drv("s"), "vlans": [0]})),
                "machines.server.vlans: a VLAN is an integer from 1 to 254",
            ),
            (
                m(json!({"system": drv("s"), "vlans": [1, 1]})),
                "machines.server.vlans: VLAN 1 is listed twice",
            ),
            (
                m(json!({"system": drv("s"), "vlans": 1})),
                "machines.server.vlans: expected a list",
            ),
            (
                m(json!({"memorySize": 512})),
                "machines.server.system: missing",
            ),
            (
                m(json!({"system": {"kind": "other", "type": "int"}})),
                "machines.server.system: expected a derivation or store path of a NixOS-shaped toplevel, got a value of type int",
            ),
            (
                m(json!({"system": {"kind": "path", "value": "x"}})),
                "machines.server.system:",
            ),
            (
                m(json!({"system": drv("s"), "memory": 1})),
                "machines.server: unknown attribute `memory`",
            ),
            (
                m(json!({"system": drv("s"), "profile": "nixos"})),
                "machines.server.profile: expected one of \"drydock\", \"nixos-test\", got the string \"nixos\"",
            ),
            (
                json!({"machines": {"server": {"type": "int"}}}),
                "a machine must be an attribute set, not a int",
            ),
        ];
        for (v, says) in cases {
            let e = parse_settings(&file(), &v).unwrap_err();
            assert!(e.is_bad_input());
            let text = e.to_string();
            assert!(text.contains(says), "{text:?} should say {says:?}");
            assert!(text.starts_with("/p/demo/drydock.nix: "), "{text}");
        }
    }

    #[test]
    fn names() {
        for ok in ["server", "agent-1", "a", &"n".repeat(40)] {
            assert!(valid_machine_name(ok), "{ok}");
        }
        for bad in ["", "a_b", "-a", "a-", "a.b", &"n".repeat(41)] {
            assert!(!valid_machine_name(bad), "{bad}");
        }
        assert_eq!(
            default_cluster_name(Path::new("/x/My Project_2/drydock.nix")),
            "my-project-2"
        );
        assert!(validate_cluster_name("my-project-2").is_ok());
        assert!(validate_cluster_name("a.b").is_err());
        let v = json!({"machines": {&"n".repeat(40): {"attrs": {"system": drv("s")}}}});
        let e = plan_cluster("demo", &parse_settings(&file(), &v).unwrap()).unwrap_err();
        assert!(matches!(e, ComposeError::VmName { .. }), "{e}");
    }
}
