//! The command line's two parsers agree (`run` by its own small parser, everything else by
//! clap's).

use super::*;

fn args(line: &str) -> Vec<std::ffi::OsString> {
    line.split(' ').map(Into::into).collect()
}

/// `run`'s own parser gives what the whole one gives, globals before or after `run`.
#[test]
fn run_parses_the_same_by_its_own_parser() {
    for line in [
        "leasehold run --exclusive R -- true",
        "leasehold --socket /s --timeout 2s run --shared A --exclusive B --owner vm -- a b",
        "leasehold --timeout=off run --path --wait=3s --exclusive R --socket /t -- x --y",
        "leasehold run --wait --check fsck --exclusive R -- x",
    ] {
        let a = args(line);
        assert!(is_run(&a), "{line}");
        let fast = RunCli::try_parse_from(&a).expect(line);
        let whole = Cli::try_parse_from(&a).expect(line);
        assert_eq!(
            format!("{:?} {:?}", fast.global, fast.command),
            format!("{:?} {:?}", whole.global, whole.command),
            "{line}"
        );
        assert_eq!(
            format!("{:?}", parse(&a).expect(line)),
            format!("{whole:?}")
        );
    }
}

/// Anything `run`'s parser refuses, help included, is the whole parser's to answer.
#[test]
fn other_lines_go_to_the_whole_parser() {
    for line in [
        "leasehold run --help",
        "leasehold run --exclusive R",
        "leasehold run --bogus -- true",
        "leasehold --help",
    ] {
        let a = args(line);
        let ours = parse(&a).expect_err(line);
        let whole = Cli::try_parse_from(&a).expect_err(line);
        assert_eq!(ours.kind(), whole.kind(), "{line}");
        assert_eq!(ours.to_string(), whole.to_string(), "{line}");
    }
    assert!(!is_run(&args("leasehold list run")));
    assert!(!is_run(&args("leasehold --socket run list")));
    assert!(matches!(
        parse(&args("leasehold --socket /s list")).map(|c| c.command),
        Ok(Command::List(_))
    ));
}

/// The usual `run` lines are read without clap, into what clap reads from them.
#[test]
fn usual_run_lines_are_read_without_clap_as_clap_reads_them() {
    for line in [
        "leasehold run --exclusive R -- true",
        "leasehold --socket /s run --exclusive R -- true",
        "leasehold --socket=/s run --shared A --exclusive=B --owner vm -- a b --c",
        "leasehold run --path --exclusive R --socket /t --shared S -- x -- y",
        "leasehold run --exclusive run -- run",
    ] {
        let a = args(line);
        let fast = parse_run_fast(&a).expect(line);
        let whole = Cli::try_parse_from(&a).expect(line);
        assert_eq!(format!("{fast:?}"), format!("{whole:?}"), "{line}");
    }
    for line in [
        "leasehold run --exclusive R",
        "leasehold run --exclusive R --",
        "leasehold run --wait --exclusive R -- x",
        "leasehold run --exclusive -R -- x",
        "leasehold run --exclusive= -- x",
        "leasehold --timeout 2s run --exclusive R -- x",
        "leasehold --socket /a --socket /b run --exclusive R -- x",
        "leasehold run --owner a --owner b --exclusive R -- x",
        "leasehold run --path --path --exclusive R -- x",
        "leasehold --path run --exclusive R -- x",
        "leasehold run --help",
        "leasehold list --exclusive R -- x",
    ] {
        assert!(parse_run_fast(&args(line)).is_none(), "{line}");
    }
}

/// Every line of up to three words after `run` from a vocabulary of flags and values around `run` (and
/// with or without `--` and a command, globals before it or not): each one read without
/// clap is read as clap reads it, and many are.
#[test]
fn a_line_read_without_clap_is_read_as_clap_reads_it() {
    const WORDS: &[&str] = &[
        "--exclusive",
        "--shared",
        "--owner",
        "--path",
        "--socket",
        "--wait",
        "--exclusive=R",
        "--owner=",
        "R",
        "-x",
        "run",
        "--",
        "a=b",
    ];
    let mut lines: Vec<Vec<&str>> = vec![Vec::new()];
    for _ in 0..3 {
        let longer: Vec<Vec<&str>> = lines
            .iter()
            .filter(|l| l.len() == lines.last().map_or(0, Vec::len))
            .flat_map(|l| {
                WORDS.iter().map(move |w| {
                    let mut l = l.clone();
                    l.push(w);
                    l
                })
            })
            .collect();
        lines.extend(longer);
    }
    let mut read = 0;
    for pre in [
        &[][..],
        &["--socket", "/s"],
        &["--socket=/s"],
        &["--timeout", "2s"],
    ] {
        for mid in &lines {
            for end in [&["--", "true"][..], &[]] {
                let mut a: Vec<std::ffi::OsString> = vec!["leasehold".into()];
                a.extend(pre.iter().chain(["run"].iter()).map(Into::into));
                a.extend(mid.iter().chain(end).map(Into::into));
                if let Some(fast) = parse_run_fast(&a) {
                    read += 1;
                    let whole = Cli::try_parse_from(&a)
                        .unwrap_or_else(|e| panic!("{a:?}: read without clap, refused by it: {e}"));
                    assert_eq!(format!("{fast:?}"), format!("{whole:?}"), "{a:?}");
                }
            }
        }
    }
    assert!(read > 500, "only {read} lines read without clap");
}
