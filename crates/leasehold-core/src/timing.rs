//! The timing parameters of SPEC §4 and their defaults: the one definition every store, the
//! agent and the tools derive theirs from.

use std::time::Duration;

/// The host session's lifetime without renewal when none is given (SPEC §4).
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// How long a SIGKILLed holder may take to die when none is given.
pub const DEFAULT_KILL_TIMEOUT: Duration = Duration::from_secs(1);

/// The timing parameters of SPEC §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Host session lifetime without renewal.
    pub ttl: Duration,
    /// Heartbeat interval.
    pub renew: Duration,
    /// The agent kills its holders at `last_renew_sent + ttl - fence_margin`.
    pub fence_margin: Duration,
    /// After a session expires, its resources stay unavailable this long.
    pub grace: Duration,
    /// The longest a SIGKILLed holder may take to die (or, with a watchdog, for the host to
    /// reset); safety needs `fence_margin + grace` to exceed it.
    pub kill_timeout: Duration,
}

impl Timing {
    /// The defaults of SPEC §4 for a given `ttl`: renew every ttl/3, fence ttl/5 before the
    /// session could expire, a grace of ttl/2.
    pub fn for_ttl(ttl: Duration) -> Timing {
        Timing {
            ttl,
            renew: ttl / 3,
            fence_margin: ttl / 5,
            grace: ttl / 2,
            kill_timeout: DEFAULT_KILL_TIMEOUT,
        }
    }
}

impl Default for Timing {
    /// [`Timing::for_ttl`] of [`DEFAULT_TTL`].
    fn default() -> Self {
        Timing::for_ttl(DEFAULT_TTL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_spec_section_4s() {
        let t = Timing::default();
        assert_eq!(t.ttl, Duration::from_secs(10));
        assert_eq!(t.renew, Duration::from_secs(10) / 3);
        assert_eq!(t.fence_margin, Duration::from_secs(2));
        assert_eq!(t.grace, Duration::from_secs(5));
        assert_eq!(t.kill_timeout, Duration::from_secs(1));
        assert_eq!(crate::EngineConfig::default().grace, t.grace);
    }

    #[test]
    fn every_default_follows_the_ttl() {
        let t = Timing::for_ttl(Duration::from_secs(30));
        assert_eq!(t.renew, Duration::from_secs(10));
        assert_eq!(t.fence_margin, Duration::from_secs(6));
        assert_eq!(t.grace, Duration::from_secs(15));
    }
}
