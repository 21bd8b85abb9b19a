//! The state string libvirt keeps between a pause and the resume, and carries in the
//! migration cookie: every lease the domain held, with its mode and fencing token.
//!
//! `leasehold1` then, per lease, ` NAME:MODE:TOKEN`, NAME percent-encoded (every byte outside
//! `[A-Za-z0-9/._-]`), MODE `x` or `s`. A resume asks for each lease only if its token is still
//! the one written here: nobody held it in between.

use leasehold_core::Mode;

const MAGIC: &str = "leasehold1";

/// One lease of a state string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The resource.
    pub name: String,
    /// Its mode.
    pub mode: Mode,
    /// Its fencing token when the state was taken.
    pub token: u64,
}

/// The state string for `held`.
pub fn encode(held: &[Held]) -> String {
    let mut s = String::from(MAGIC);
    for h in held {
        s.push(' ');
        for b in h.name.bytes() {
            if b.is_ascii_alphanumeric() || b"/._-".contains(&b) {
                s.push(b as char);
            } else {
                s.push_str(&format!("%{b:02X}"));
            }
        }
        s.push(':');
        s.push(match h.mode {
            Mode::Exclusive => 'x',
            Mode::Shared => 's',
        });
        s.push(':');
        s.push_str(&h.token.to_string());
    }
    s
}

/// Reads a state string.
///
/// # Errors
/// What is wrong with it (it comes from another host's cookie: nothing in it is trusted).
pub fn decode(s: &str) -> Result<Vec<Held>, String> {
    let mut words = s.split(' ');
    if words.next() != Some(MAGIC) {
        return Err(format!(
            "not a leasehold lock state (does the other host run another lock driver?): {:?}",
            s.chars().take(40).collect::<String>()
        ));
    }
    let mut out = Vec::new();
    for w in words {
        let bad = || format!("malformed lease in the lock state: {w:?}");
        let mut parts = w.rsplitn(3, ':');
        let (Some(token), Some(mode), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let mode = match mode {
            "x" => Mode::Exclusive,
            "s" => Mode::Shared,
            _ => return Err(bad()),
        };
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let token: u64 = token.parse().map_err(|_| bad())?;
        let name = unescape(name).ok_or_else(bad)?;
        if name.is_empty() {
            return Err(bad());
        }
        out.push(Held { name, mode, token });
    }
    Ok(out)
}

fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            c if c.is_ascii_alphanumeric() || b"/._-".contains(&c) => {
                out.push(c);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_any_name() {
        let held = vec![
            Held {
                name: "/var/lib/libvirt/images/a b=c:d%.qcow2".into(),
                mode: Mode::Exclusive,
                token: 17,
            },
            Held {
                name: "ls/ключ".into(),
                mode: Mode::Shared,
                token: u64::MAX,
            },
        ];
        let s = encode(&held);
        assert!(!s.contains('\n') && s.starts_with("leasehold1 "), "{s}");
        assert_eq!(decode(&s).unwrap(), held);
        assert_eq!(decode("leasehold1").unwrap(), vec![]);
    }

    #[test]
    fn refuses_anything_else() {
        for bad in [
            "",
            "sanlock-state",
            "leasehold1 a:x",
            "leasehold1 a:q:1",
            "leasehold1 a:x:-1",
            "leasehold1 a:x:99999999999999999999",
            "leasehold1 :x:1",
            "leasehold1 a%2:x:1",
            "leasehold1 a%zz:x:1",
            "leasehold1 a b:x:1",
            "leasehold1 a\n:x:1",
            "leasehold1 %FF:x:1",
        ] {
            assert!(decode(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
