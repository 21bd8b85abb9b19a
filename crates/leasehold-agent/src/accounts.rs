//! The system's account databases, `/etc/passwd` and `/etc/group`: one reader for both. Each
//! line is `name:password:id:...`; lines that do not parse (comments, NIS `+` entries) are
//! skipped.

use std::io;

/// The users database.
pub const PASSWD: &str = "/etc/passwd";
/// The groups database.
pub const GROUP: &str = "/etc/group";

/// The (name, id) of each well-formed line of a database's `text`.
fn entries(text: &str) -> impl Iterator<Item = (&str, u32)> {
    text.lines().filter_map(|l| {
        let mut f = l.split(':');
        let name = f.next().filter(|n| !n.is_empty() && !n.starts_with('#'))?;
        let id = f.nth(1)?.parse().ok()?;
        Some((name, id))
    })
}

/// The id of `name` in a database's `text`.
fn id_in(text: &str, name: &str) -> Option<u32> {
    entries(text).find(|(n, _)| *n == name).map(|(_, id)| id)
}

/// The first name with `id` in a database's `text`.
fn name_in(text: &str, id: u32) -> Option<String> {
    entries(text)
        .find(|(_, i)| *i == id)
        .map(|(n, _)| n.to_owned())
}

/// The id of group `name`, from [`GROUP`]; `None` when there is no such group.
///
/// # Errors
/// The `io::Error` when [`GROUP`] cannot be read.
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    Ok(id_in(&std::fs::read_to_string(GROUP)?, name))
}

/// The name of user `uid`, from [`PASSWD`]; `None` when it has none there or the file cannot
/// be read.
pub fn user_name(uid: u32) -> Option<String> {
    name_in(&std::fs::read_to_string(PASSWD).ok()?, uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# a comment:x:7:
root:x:0:0:root:/root:/bin/bash
+nis
broken:x:notanumber:
disk:x:6:
alias:x:6:
:x:9:
";

    #[test]
    fn names_and_ids_are_read_from_well_formed_lines_only() {
        assert_eq!(id_in(TEXT, "root"), Some(0));
        assert_eq!(id_in(TEXT, "disk"), Some(6));
        assert_eq!(id_in(TEXT, "broken"), None);
        assert_eq!(id_in(TEXT, "+nis"), None);
        assert_eq!(id_in(TEXT, "# a comment"), None);
        assert_eq!(id_in(TEXT, ""), None);
        assert_eq!(
            name_in(TEXT, 6).as_deref(),
            Some("disk"),
            "the first of two"
        );
        assert_eq!(name_in(TEXT, 7), None);
        assert_eq!(name_in(TEXT, 9), None);
    }

    #[test]
    fn this_systems_root_is_found_in_both_databases() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(group_id("no-such-group-leasehold").unwrap(), None);
    }
}
