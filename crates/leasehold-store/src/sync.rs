//! Locks whose holder may have panicked.
//!
//! A std lock is poisoned when a thread panics while holding it. The store's locks are of two
//! kinds, and each lock's declaration says which:
//!
//! - **recovered** ([`lock`], [`read`], [`write`]): data whose every change under the lock is
//!   one whole step (an insert, a remove, a take, a replacement of the whole), so a panic in a
//!   critical section leaves it consistent. The poison is cleared and the store goes on: to
//!   skip the data instead (what `lock().ok()` did) would silently drop work, such as the
//!   hook that kills this host's holders when its session ends.
//! - **fatal**: data changed in several steps that must all happen, such as the etcd store's
//!   index of local holders (what a fence kills). A poisoned one halts the store, loudly, with
//!   [`crate::StoreError::Halted`], rather than act on a half-made change.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Says once per recovery that a lock was poisoned and is used on.
fn recovered(what: &str) {
    tracing::warn!(
        lock = what,
        "a thread panicked while holding a store lock; its data is whole (each change is one step), so the store goes on"
    );
}

/// Locks `m` (a recovered lock, see the module documentation), named `what` for the log.
pub(crate) fn lock<'a, T>(m: &'a Mutex<T>, what: &str) -> MutexGuard<'a, T> {
    m.lock().unwrap_or_else(|poisoned| {
        recovered(what);
        m.clear_poison();
        poisoned.into_inner()
    })
}

/// Reads `l` (a recovered lock).
pub(crate) fn read<'a, T>(l: &'a RwLock<T>, what: &str) -> RwLockReadGuard<'a, T> {
    l.read().unwrap_or_else(|poisoned| {
        recovered(what);
        l.clear_poison();
        poisoned.into_inner()
    })
}

/// Writes `l` (a recovered lock).
pub(crate) fn write<'a, T>(l: &'a RwLock<T>, what: &str) -> RwLockWriteGuard<'a, T> {
    l.write().unwrap_or_else(|poisoned| {
        recovered(what);
        l.clear_poison();
        poisoned.into_inner()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Poisons `m` by panicking while holding it, after a whole change.
    fn poison(m: &Mutex<Vec<u32>>) {
        std::thread::scope(|s| {
            let _ = s
                .spawn(|| {
                    let mut g = m.lock().unwrap();
                    g.push(2);
                    panic!("a panic while holding the lock (expected by this test)");
                })
                .join();
        });
        assert!(m.is_poisoned());
    }

    #[test]
    fn a_poisoned_recovered_lock_gives_its_data_and_is_healed() {
        let m = Mutex::new(vec![1]);
        poison(&m);
        assert_eq!(*lock(&m, "test"), vec![1, 2]);
        assert!(!m.is_poisoned(), "the poison is cleared once recovered");
        lock(&m, "test").push(3);
        assert_eq!(*m.lock().unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn a_poisoned_recovered_rwlock_gives_its_data_and_is_healed() {
        let l = RwLock::new(1);
        std::thread::scope(|s| {
            let _ = s
                .spawn(|| {
                    let _g = l.write().unwrap();
                    panic!("a panic while holding the lock (expected by this test)");
                })
                .join();
        });
        assert!(l.is_poisoned());
        assert_eq!(*read(&l, "test"), 1);
        *write(&l, "test") = 2;
        assert!(!l.is_poisoned());
        assert_eq!(*l.read().unwrap(), 2);
    }
}
