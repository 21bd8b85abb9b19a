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
