//! The agent's log: human lines or JSON on stderr, at the level asked for.
//!
//! The level comes from `--log-level` (or the config file's `log-level`), else
//! `$LEASEHOLD_LOG`, else `$RUST_LOG`, else `info`; each takes a level (`warn`) or a full
//! filter (`info,leasehold_store=debug`). Human lines leave out the monotonic-clock fields
//! (`mono_ns`, `*_mono_ns`), which only programs read; JSON lines keep them.

use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// The filter: `level` if given, else the environment, else `info`.
///
/// # Errors
/// A message naming the bad filter.
pub fn filter(level: Option<&str>) -> Result<EnvFilter, String> {
    if let Some(l) = level {
        return EnvFilter::try_new(l).map_err(|e| {
            format!(
                "log-level {l:?}: {e}; use error, warn, info, debug or trace (or a filter such as info,leasehold_store=debug)"
            )
        });
    }
    for var in ["LEASEHOLD_LOG", "RUST_LOG"] {
        if let Some(v) = std::env::var(var).ok().filter(|v| !v.trim().is_empty()) {
            return EnvFilter::try_new(&v).map_err(|e| format!("${var} {v:?}: {e}"));
        }
    }
    Ok(EnvFilter::new("info"))
}

/// Installs the log on stderr.
pub fn init(filter: EnvFilter, json: bool) {
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(move || LogWriter { ansi });
    if json {
        builder.json().init();
    } else {
        builder.fmt_fields(HumanFields).init();
    }
}

/// The agent's log on standard error, one line per event, with every control character that
/// came in a field (a resource name, label or reason) escaped: nothing in a name can forge a
/// log line or drive the terminal. With colours on, the escape character stays for them
/// (the log formatter escapes it inside fields itself).
struct LogWriter {
    ansi: bool,
}

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // One call per event: the formatter writes each line whole.
        let s = String::from_utf8_lossy(buf);
        let (body, end) = match s.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (&*s, ""),
        };
        let line = if self.ansi {
            body.split('\x1b')
                .map(crate::output::escaped)
                .collect::<Vec<_>>()
                .join("\x1b")
        } else {
            crate::output::escaped(body)
        };
        std::io::stderr().write_all(format!("{line}{end}").as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Fields as `key=value` after the message, as tracing's default, without the
/// monotonic-clock fields.
struct HumanFields;

impl<'w> FormatFields<'w> for HumanFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = HumanVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct HumanVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for HumanVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if self.result.is_err() || name.ends_with("mono_ns") || name.starts_with("log.") {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = if name == "message" {
            write!(self.writer, "{sep}{value:?}")
        } else {
            write!(self.writer, "{sep}{name}={value:?}")
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_level_is_named() {
        let e = filter(Some("leasehold=loud")).unwrap_err();
        assert!(e.contains("log-level \"leasehold=loud\""), "{e}");
        assert!(filter(Some("warn")).is_ok());
    }
}
