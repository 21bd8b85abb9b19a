//! The one place a store reads the time.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use leasehold_core::{Now, Time, WallTime};

/// Reads the monotonic and the wall clock as the engine's [`Now`].
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    /// A clock whose monotonic readings count from now.
    pub fn new() -> Clock {
        Clock {
            origin: Instant::now(),
        }
    }

    /// The time now.
    pub fn now(&self) -> Now {
        let mono = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Now {
            mono: Time(mono),
            wall: WallTime(wall),
        }
    }

    /// The monotonic instant of an engine time.
    pub fn instant(&self, t: Time) -> Instant {
        self.origin + std::time::Duration::from_millis(t.0)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}
