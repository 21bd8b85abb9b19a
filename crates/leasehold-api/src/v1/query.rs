//! The query of `GET /v1/leases`: filters and a page, in the URL's query string.

/// How many resources one answer of `GET /v1/leases` holds when the request says no `limit`.
pub const DEFAULT_PAGE: usize = 1000;

/// The most resources one answer of `GET /v1/leases` may hold.
pub const MAX_PAGE: usize = 10_000;

/// `GET /v1/leases?prefix=P&held=true&dirty=true&host=H&after=NAME&limit=N`: which
/// resources, in name order, and which page of them. Every parameter is optional; values are
/// percent-encoded (UTF-8). An answer with `next` has more: ask again with `after=NEXT`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only resources whose names start with this.
    pub prefix: Option<String>,
    /// Only resources held now.
    pub held: bool,
    /// Only dirty resources.
    pub dirty: bool,
    /// Only resources with a holder on this host.
    pub host: Option<String>,
    /// Only resources whose names sort after this one (the `next` of the previous page).
    pub after: Option<String>,
    /// The most resources in the answer: 1 to [`MAX_PAGE`]; absent: [`DEFAULT_PAGE`].
    pub limit: Option<usize>,
}

impl ListQuery {
    /// The page size this query asks for.
    pub fn page(&self) -> usize {
        self.limit.unwrap_or(DEFAULT_PAGE)
    }

    /// The query string (without `?`), empty for the default query.
    pub fn to_query(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = &self.prefix {
            parts.push(format!("prefix={}", encode(p)));
        }
        if self.held {
            parts.push("held=true".to_owned());
        }
        if self.dirty {
            parts.push("dirty=true".to_owned());
        }
        if let Some(h) = &self.host {
            parts.push(format!("host={}", encode(h)));
        }
        if let Some(a) = &self.after {
            parts.push(format!("after={}", encode(a)));
        }
        if let Some(l) = self.limit {
            parts.push(format!("limit={l}"));
        }
        parts.join("&")
    }

    /// Reads a query string (without `?`).
    ///
    /// # Errors
    /// An unknown or repeated parameter, a value that is not percent-encoded UTF-8, a flag
    /// that is not `true` or `false`, or a limit outside 1 to [`MAX_PAGE`]: said in words.
    pub fn parse(query: &str) -> Result<ListQuery, String> {
        let mut q = ListQuery::default();
        let mut seen = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if seen.contains(&key) {
                return Err(format!("the parameter {key:?} is given twice"));
            }
            seen.push(key);
            let value = decode(value).map_err(|e| format!("the value of {key:?} {e}"))?;
            let flag = |v: &str| match v {
                "true" | "" => Ok(true),
                "false" => Ok(false),
                other => Err(format!("{key} is true or false, not {other:?}")),
            };
            match key {
                "prefix" => q.prefix = Some(value),
                "held" => q.held = flag(&value)?,
                "dirty" => q.dirty = flag(&value)?,
                "host" => q.host = Some(value),
                "after" => q.after = Some(value),
                "limit" => {
                    let n: usize = value
                        .parse()
                        .map_err(|_| format!("limit is a number, not {value:?}"))?;
                    if !(1..=MAX_PAGE).contains(&n) {
                        return Err(format!("limit is 1 to {MAX_PAGE}, not {n}"));
                    }
                    q.limit = Some(n);
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}; GET /v1/leases takes prefix, held, dirty, \
                         host, after and limit"
                    ));
                }
            }
        }
        Ok(q)
    }
}

/// Percent-encodes every byte but the unreserved ones (RFC 3986).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Undoes [`encode`] (and takes `+` as a space, as forms write it).
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or("has a % not followed by two hex digits")?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "is not UTF-8".to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_query_reads_back_and_bad_ones_are_refused() {
        let q = ListQuery {
            prefix: Some("vm/a b&c=%+é".into()),
            held: true,
            dirty: false,
            host: Some("node1".into()),
            after: Some("vm/x".into()),
            limit: Some(50),
        };
        assert_eq!(ListQuery::parse(&q.to_query()).unwrap(), q);
        assert_eq!(ListQuery::parse("").unwrap(), ListQuery::default());
        assert_eq!(ListQuery::default().page(), DEFAULT_PAGE);
        for (bad, want) in [
            ("limit=0", "limit is 1 to"),
            ("limit=10001", "limit is 1 to"),
            ("limit=x", "limit is a number"),
            ("held=maybe", "true or false"),
            ("colour=red", "unknown parameter"),
            ("after=a&after=b", "given twice"),
            ("prefix=%zz", "two hex digits"),
            ("prefix=%ff", "not UTF-8"),
        ] {
            let e = ListQuery::parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
