//! The error under a [`crate::StoreError`]: what failed, for people, and the error it came from
//! (an [`crate::etcd::client::EtcdError`], a redb or I/O error), kept whole for
//! [`std::error::Error::source`] so that callers decide from types, not from text.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// What a store failure came from. Cloning shares the error under it.
#[derive(Debug, Clone)]
pub struct Cause {
    detail: String,
    source: Option<Arc<dyn Error + Send + Sync>>,
}

impl Cause {
    /// A cause with no error under it (the store found the condition itself).
    pub fn new(detail: impl Into<String>) -> Cause {
        Cause {
            detail: detail.into(),
            source: None,
        }
    }

    /// A cause that is `e`: said as `e` says it, with `e` under it.
    pub fn of(e: impl Error + Send + Sync + 'static) -> Cause {
        Cause {
            detail: e.to_string(),
            source: Some(Arc::new(e)),
        }
    }

    /// `e`, said after `context` (what was being done).
    pub fn at(context: impl fmt::Display, e: impl Error + Send + Sync + 'static) -> Cause {
        Cause {
            detail: format!("{context}: {e}"),
            source: Some(Arc::new(e)),
        }
    }

    /// The same cause, with `e` under it (its text is not repeated).
    pub fn with_source(mut self, e: impl Error + Send + Sync + 'static) -> Cause {
        self.source = Some(Arc::new(e));
        self
    }

    /// The error under this cause, if it is an `E`.
    pub fn downcast_ref<E: Error + 'static>(&self) -> Option<&E> {
        self.source.as_deref()?.downcast_ref::<E>()
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl Error for Cause {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

/// Two causes are the same failure when they say the same thing and have, or lack, an error
/// under them alike (errors under them are not comparable).
impl PartialEq for Cause {
    fn eq(&self, other: &Cause) -> bool {
        self.detail == other.detail && self.source.is_some() == other.source.is_some()
    }
}

impl Eq for Cause {}

/// Why a store stopped itself ([`crate::StoreError::Halted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Halt {
    /// State the store must trust was left half-changed: a thread panicked while changing
    /// it (a poisoned fatal lock, see `sync.rs`). `state` names it for people.
    #[error("{state} was left half-changed by a panic")]
    Poisoned {
        /// What was left half-changed.
        state: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_under_a_cause_is_kept_typed() {
        let io = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let c = Cause::at("opening /x", io);
        let under = c.downcast_ref::<std::io::Error>().expect("an io::Error");
        assert_eq!(under.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(c.source().is_some());
        assert!(c.to_string().starts_with("opening /x: "), "{c}");
        assert!(Cause::new("x").source().is_none());
    }
}
