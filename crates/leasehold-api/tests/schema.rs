//! The checked-in JSON schema of the HTTP API is the one the types generate: nobody edits a
//! second copy by hand. `LEASEHOLD_WRITE_SCHEMA=1` rewrites it after a change of the types.

use leasehold_api::v1::{AcquireEvent, AcquireRequest, ApiError, ErrorCode, ExitCode, schema};

#[test]
fn the_checked_in_schema_is_the_generated_one() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api/v1.schema.json");
    let generated = schema();
    if std::env::var_os("LEASEHOLD_WRITE_SCHEMA").is_some() {
        std::fs::write(path, &generated).expect("write the schema");
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/api/v1.schema.json differs from the types in leasehold-api/src/v1; regenerate it: \
         LEASEHOLD_WRITE_SCHEMA=1 cargo test -p leasehold-api --test schema"
    );
}

#[test]
fn unknown_fields_and_wrong_types_are_refused_with_the_field_named() {
    let e = serde_json::from_str::<AcquireRequest>(
        r#"{"items":[{"resource":"d","mode":"exclusive"}],"acept_dirty":true}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown field `acept_dirty`"), "{e}");
    let e = serde_json::from_str::<AcquireRequest>(r#"{"items":[{"resource":"d","mode":"x"}]}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown variant `x`"), "{e}");
    let e = serde_json::from_str::<AcquireRequest>(r#"{"items":[],"wait":30}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid type"), "{e}");
}

#[test]
fn an_error_line_reads_back_and_its_code_has_one_exit_code() {
    let line = serde_json::to_string(&AcquireEvent::Error(ApiError::new(
        ErrorCode::NeedsCheck,
        "disk needs a check",
    )))
    .unwrap();
    assert_eq!(
        line,
        r#"{"event":"error","code":"needs-check","message":"disk needs a check"}"#
    );
    let back: AcquireEvent = serde_json::from_str(&line).unwrap();
    assert!(matches!(back, AcquireEvent::Error(e) if e.code == ErrorCode::NeedsCheck));
    // SPEC §6: 1 error, 2 usage, 3 held, 4 needs check, 5 agent unreachable.
    for code in ErrorCode::ALL {
        let word = serde_json::to_value(code).unwrap();
        assert_eq!(word.as_str(), Some(code.as_str()));
        assert!((1..=5).contains(&code.exit_code().code()), "{code}");
    }
    assert_eq!(ErrorCode::Held.exit_code(), ExitCode::Held);
    assert_eq!(ErrorCode::TimedOut.exit_code().code(), 3);
    assert_eq!(ErrorCode::NeedsCheck.exit_code().code(), 4);
    assert_eq!(ErrorCode::Usage.exit_code().code(), 2);
    assert_eq!(ErrorCode::Unavailable.exit_code().code(), 5);
    // Every exit code but 0 and 141 is some error's.
    for exit in ExitCode::ALL {
        let used = ErrorCode::ALL.iter().any(|c| c.exit_code() == exit);
        assert_eq!(
            used,
            !matches!(exit, ExitCode::Ok | ExitCode::BrokenPipe),
            "{exit:?}"
        );
    }
}
