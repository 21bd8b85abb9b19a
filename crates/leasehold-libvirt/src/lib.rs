//! The parts of the libvirt lock driver (`lock_manager = "leasehold"`, issue 13) that do not
//! talk to the agent: libvirt's C ABI as laid out by libvirt 9.0 ([`ffi`]), the plugin's
//! settings from `/etc/libvirt/qemu-leasehold.conf` ([`config`]), which leases a domain's
//! disks and `<lease>` elements take ([`names`]), and the state string carried between a
//! pause and the resume and in the migration cookie ([`state`]).
//!
//! Not here yet: the exported `virLockDriverImpl` table and its callbacks. They need the
//! agent to take the leases this crate plans with three things it records but does not act
//! on yet: restricted owners (QEMU's user may not release its leases), an exit status that
//! decides clean or dirty (`OnExit::Status`: QEMU exiting 0 after a guest poweroff or
//! `virsh destroy`'s SIGTERM is clean, a `kill -9` is not; the agent reads the status from
//! its pidfd with `PIDFD_GET_INFO` once the process is reaped, Linux 6.15 and later), and
//! expected tokens on the HTTP API (a resume only if nobody held the disk since).
//!
//! How libvirt 9.0 calls a lock driver, observed with a probe plugin on this project's
//! machines: at start, in the child forked for QEMU (its pid is QEMU's),
//! `Acquire(REGISTER_ONLY|RESTRICT)`, then in the daemon `Acquire(flags 0)` for the QEMU pid;
//! on pause `Release(&state)` (twice, the second with the first's state passed back in); on
//! resume `Acquire(state)`; at migration `Inquire` on the source and `Acquire(state)` on the
//! destination after the source's `Release`; nothing at all when QEMU exits.

pub mod config;
pub mod ffi;
pub mod names;
pub mod state;

#[cfg(test)]
mod tests {
    use crate::ffi::{Driver, Manager, Param};

    #[test]
    fn the_abi_types_have_libvirts_layout() {
        // Measured against libvirtd 9.0: two u32 and eight function pointers; a param is an
        // int, a key pointer and a 16-byte union; a manager is two pointers.
        assert_eq!(std::mem::size_of::<Driver>(), 72);
        assert_eq!(std::mem::size_of::<Param>(), 32);
        assert_eq!(std::mem::size_of::<Manager>(), 16);
    }
}
