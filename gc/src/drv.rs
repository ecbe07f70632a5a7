//! Our own parser for Nix derivations in their ATerm form (`Derive(...)`, the content of a
//! `.drv` file). It never panics: any input either parses or yields a [`DrvParseError`] with
//! the byte offset of the problem.

use std::collections::BTreeMap;

use crate::exitclass::{Classify, ExitClass};

/// Why a `.drv` file could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DrvParseError {
    /// A specific token was expected.
    #[error("at byte {offset}: expected {expected}")]
    Expected {
        offset: usize,
        expected: &'static str,
    },
    /// The input ended in the middle of a term.
    #[error("unexpected end of input")]
    UnexpectedEof,
    /// A string is not valid UTF-8.
    #[error("at byte {offset}: string is not valid UTF-8")]
    NotUtf8 { offset: usize },
    /// Something follows the closing parenthesis.
    #[error("at byte {offset}: trailing data after the derivation")]
    Trailing { offset: usize },
}

impl Classify for DrvParseError {
    /// Bad input: the bytes given are not a derivation.
    fn exit_class(&self) -> ExitClass {
        ExitClass::BadInput
    }
}

/// One output of a derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrvOutput {
    /// The output path (empty for floating content-addressed outputs).
    pub path: String,
    /// Hash algorithm of a fixed-output derivation (`r:sha256`), else empty.
    pub hash_algo: String,
    /// Expected hash of a fixed-output derivation, else empty.
    pub hash: String,
}

/// A parsed derivation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    /// Outputs by name.
    pub outputs: BTreeMap<String, DrvOutput>,
    /// Input derivations (full logical paths) and the outputs used of each.
    pub input_drvs: BTreeMap<String, Vec<String>>,
    /// Input sources (full logical paths).
    pub input_srcs: Vec<String>,
    /// Platform, e.g. `x86_64-linux`.
    pub system: String,
    /// Builder program.
    pub builder: String,
    /// Builder arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn expect(&mut self, token: &'static str) -> Result<(), DrvParseError> {
        let t = token.as_bytes();
        if self.s.len() < self.pos + t.len() {
            if self.s[self.pos..] == t[..self.s.len() - self.pos] {
                return Err(DrvParseError::UnexpectedEof);
            }
            return Err(DrvParseError::Expected {
                offset: self.pos,
                expected: token,
            });
        }
        if &self.s[self.pos..self.pos + t.len()] != t {
            return Err(DrvParseError::Expected {
                offset: self.pos,
                expected: token,
            });
        }
        self.pos += t.len();
        Ok(())
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn string(&mut self) -> Result<String, DrvParseError> {
        let start = self.pos;
        self.expect("\"")?;
        let mut out = Vec::new();
        loop {
            let c = self.peek().ok_or(DrvParseError::UnexpectedEof)?;
            self.pos += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = self.peek().ok_or(DrvParseError::UnexpectedEof)?;
                    self.pos += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                }
                other => out.push(other),
            }
        }
        String::from_utf8(out).map_err(|_| DrvParseError::NotUtf8 { offset: start })
    }

    /// `[item, item, ...]`
    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, DrvParseError>,
    ) -> Result<Vec<T>, DrvParseError> {
        self.expect("[")?;
        let mut v = Vec::new();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(v);
        }
        loop {
            v.push(item(self)?);
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(v);
                }
                Some(_) => {
                    return Err(DrvParseError::Expected {
                        offset: self.pos,
                        expected: "',' or ']'",
                    });
                }
                None => return Err(DrvParseError::UnexpectedEof),
            }
        }
    }
}

/// Parse the ATerm text of a `.drv` file.
pub fn parse_derivation(input: &[u8]) -> Result<Derivation, DrvParseError> {
    let mut p = Parser { s: input, pos: 0 };
    p.expect("Derive(")?;
    let outputs = p.list(|p| {
        p.expect("(")?;
        let name = p.string()?;
        p.expect(",")?;
        let path = p.string()?;
        p.expect(",")?;
        let hash_algo = p.string()?;
        p.expect(",")?;
        let hash = p.string()?;
        p.expect(")")?;
        Ok((
            name,
            DrvOutput {
                path,
                hash_algo,
                hash,
            },
        ))
    })?;
    p.expect(",")?;
    let input_drvs = p.list(|p| {
        p.expect("(")?;
        let path = p.string()?;
        p.expect(",")?;
        let outs = p.list(Parser::string)?;
        p.expect(")")?;
        Ok((path, outs))
    })?;
    p.expect(",")?;
    let input_srcs = p.list(Parser::string)?;
    p.expect(",")?;
    let system = p.string()?;
    p.expect(",")?;
    let builder = p.string()?;
    p.expect(",")?;
    let args = p.list(Parser::string)?;
    p.expect(",")?;
    let env = p.list(|p| {
        p.expect("(")?;
        let k = p.string()?;
        p.expect(",")?;
        let v = p.string()?;
        p.expect(")")?;
        Ok((k, v))
    })?;
    p.expect(")")?;
    if p.pos != input.len() {
        return Err(DrvParseError::Trailing { offset: p.pos });
    }
    Ok(Derivation {
        outputs: outputs.into_iter().collect(),
        input_drvs: input_drvs.into_iter().collect(),
        input_srcs,
        system,
        builder,
        args,
        env: env.into_iter().collect(),
    })
}

/// Serialise a derivation back to ATerm, as Nix writes it (used by tests and fixtures).
pub fn unparse_derivation(d: &Derivation) -> String {
    fn s(out: &mut String, v: &str) {
        out.push('"');
        for c in v.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    fn list<T>(
        out: &mut String,
        items: impl IntoIterator<Item = T>,
        mut f: impl FnMut(&mut String, T),
    ) {
        out.push('[');
        for (i, it) in items.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            f(out, it);
        }
        out.push(']');
    }
    let mut o = String::from("Derive(");
    list(&mut o, &d.outputs, |o, (n, out)| {
        o.push('(');
        s(o, n);
        o.push(',');
        s(o, &out.path);
        o.push(',');
        s(o, &out.hash_algo);
        o.push(',');
        s(o, &out.hash);
        o.push(')');
    });
    o.push(',');
    list(&mut o, &d.input_drvs, |o, (p, outs)| {
        o.push('(');
        s(o, p);
        o.push(',');
        list(o, outs, |o, x| s(o, x));
        o.push(')');
    });
    o.push(',');
    list(&mut o, &d.input_srcs, |o, x| s(o, x));
    o.push(',');
    s(&mut o, &d.system);
    o.push(',');
    s(&mut o, &d.builder);
    o.push(',');
    list(&mut o, &d.args, |o, x| s(o, x));
    o.push(',');
    list(&mut o, &d.env, |o, (k, v)| {
        o.push('(');
        s(o, k);
        o.push(',');
        s(o, v);
        o.push(')');
    });
    o.push(')');
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAMPLE: &str = r#"Derive([("out","/nix/store/2xcaqbzg07qabbc5kj1w1ic78jwsqh3b-vm-test-run-x","","")],[("/nix/store/64kpr1l89ns3hbjbzh915cr8j1n6l3pw-nixos-test-driver-x.drv",["out"])],["/nix/store/3qm60y43ra8yxzqdhwxxchrn2jb45v81-t.nix"],"x86_64-linux","/bin/sh",["-c","echo \"q\" \\ x\n\ty"],[("builder","/bin/sh"),("name","vm-test-run-x"),("out","/nix/store/2xcaqbzg07qabbc5kj1w1ic78jwsqh3b-vm-test-run-x")])"#;

    #[test]
    fn parses_sample() {
        let d = parse_derivation(SAMPLE.as_bytes()).unwrap();
        assert_eq!(d.outputs.len(), 1);
        assert_eq!(
            d.outputs["out"].path,
            "/nix/store/2xcaqbzg07qabbc5kj1w1ic78jwsqh3b-vm-test-run-x"
        );
        assert_eq!(
            d.input_drvs["/nix/store/64kpr1l89ns3hbjbzh915cr8j1n6l3pw-nixos-test-driver-x.drv"],
            vec!["out".to_owned()]
        );
        assert_eq!(d.input_srcs.len(), 1);
        assert_eq!(d.system, "x86_64-linux");
        assert_eq!(d.builder, "/bin/sh");
        assert_eq!(d.args[1], "echo \"q\" \\ x\n\ty");
        assert_eq!(d.env["name"], "vm-test-run-x");
        assert_eq!(unparse_derivation(&d), SAMPLE);
    }

    #[test]
    fn fixed_output_and_empty_lists() {
        let t = r#"Derive([("out","/nix/store/a","r:sha256","abc")],[],[],"s","b",[],[])"#;
        let d = parse_derivation(t.as_bytes()).unwrap();
        assert_eq!(d.outputs["out"].hash_algo, "r:sha256");
        assert_eq!(d.outputs["out"].hash, "abc");
        assert!(d.input_drvs.is_empty() && d.args.is_empty() && d.env.is_empty());
    }

    #[test]
    fn errors_have_offsets() {
        assert_eq!(
            parse_derivation(b"Derivx"),
            Err(DrvParseError::Expected {
                offset: 0,
                expected: "Derive("
            })
        );
        assert_eq!(parse_derivation(b"Der"), Err(DrvParseError::UnexpectedEof));
        assert_eq!(parse_derivation(b""), Err(DrvParseError::UnexpectedEof));
        let cut = &SAMPLE.as_bytes()[..SAMPLE.len() - 5];
        assert_eq!(parse_derivation(cut), Err(DrvParseError::UnexpectedEof));
        let trailing = format!("{SAMPLE} ");
        assert_eq!(
            parse_derivation(trailing.as_bytes()),
            Err(DrvParseError::Trailing {
                offset: SAMPLE.len()
            })
        );
        assert!(matches!(
            parse_derivation(b"Derive([(\"out\",\"\xff\",\"\",\"\")],[],[],\"\",\"\",[],[])"),
            Err(DrvParseError::NotUtf8 { .. })
        ));
        assert!(matches!(
            parse_derivation(b"Derive([;"),
            Err(DrvParseError::Expected { offset: 8, .. })
        ));
    }

    fn arb_string() -> impl Strategy<Value = String> {
        prop_oneof![".{0,12}", "[\"\\\\\n\r\ta-z]{0,8}"]
    }

    fn arb_drv() -> impl Strategy<Value = Derivation> {
        (
            proptest::collection::btree_map(
                arb_string(),
                (arb_string(), arb_string(), arb_string()),
                0..4,
            ),
            proptest::collection::btree_map(
                arb_string(),
                proptest::collection::vec(arb_string(), 0..3),
                0..4,
            ),
            proptest::collection::vec(arb_string(), 0..4),
            arb_string(),
            arb_string(),
            proptest::collection::vec(arb_string(), 0..4),
            proptest::collection::btree_map(arb_string(), arb_string(), 0..5),
        )
            .prop_map(
                |(outs, input_drvs, input_srcs, system, builder, args, env)| Derivation {
                    outputs: outs
                        .into_iter()
                        .map(|(k, (path, hash_algo, hash))| {
                            (
                                k,
                                DrvOutput {
                                    path,
                                    hash_algo,
                                    hash,
                                },
                            )
                        })
                        .collect(),
                    input_drvs,
                    input_srcs,
                    system,
                    builder,
                    args,
                    env,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn roundtrips(d in arb_drv()) {
            let text = unparse_derivation(&d);
            prop_assert_eq!(parse_derivation(text.as_bytes()).unwrap(), d);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_derivation(&bytes);
        }

        #[test]
        fn mutated_derivations_never_panic(
            d in arb_drv(),
            cuts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let mut bytes = unparse_derivation(&d).into_bytes();
            for (idx, b) in cuts {
                let i = idx.index(bytes.len().max(1));
                if i < bytes.len() {
                    if b % 3 == 0 {
                        bytes.truncate(i);
                    } else if b % 3 == 1 {
                        bytes.remove(i);
                    } else {
                        bytes[i] = b;
                    }
                }
            }
            let _ = parse_derivation(&bytes);
        }
    }
}
