//! `lock_manager = "leasehold"`: a libvirt lock driver that takes a leasehold lease for every
//! disk and `<lease>` of a domain, held by the domain's QEMU process.
//!
//! libvirt loads this library from `lock-driver/leasehold.so` and calls the eight callbacks of
//! [`virLockDriverImpl`]. What happens when (libvirt 9.0, observed):
//!
//! - **start**: in the child forked for QEMU, before `exec`: `Acquire(REGISTER_ONLY|RESTRICT)`.
//!   The plugin takes every lease *there*, for the child's pid (QEMU keeps it across `exec`),
//!   so a disk held elsewhere is refused before QEMU opens it. The leases are restricted: the
//!   QEMU user cannot release or hand them over. Their end is decided by QEMU's exit status
//!   (`on_exit = status`): exit 0 (a guest poweroff, `virsh shutdown`, `virsh destroy`'s
//!   SIGTERM) ends them clean; death by a signal (`kill -9`, `destroy` that had to SIGKILL)
//!   or a failure status leaves exclusive disks dirty.
//! - **pause** (`virsh suspend`, migration's last step on the source): `Release(&state)`; the
//!   state lists every lease with its token.
//! - **resume**, migration's destination: `Acquire(state)`: each exclusive lease only if its
//!   token is still the one in the state, so nobody held the disk in between.
//! - **inquire**: the state for the migration cookie.
//! - **lock failure** (`<on_lockfailure>`, the `action` of every Acquire): passed to the agent
//!   with the leases ([`agent::before_fence`]); the agent pauses (SIGSTOP) or terminates
//!   (SIGTERM) QEMU once its host's session renewals are late, and SIGKILLs it at the fencing
//!   deadline regardless.
//!
//! Nothing here panics across the C ABI, starts a thread, or takes a lock that a `fork` could
//! leave held: the child calls the agent with one blocking request on a Unix socket.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicPtr, Ordering};

pub mod agent;
pub mod config;
pub mod ffi;
pub mod names;
pub mod state;

use config::Config;
use ffi::{Driver, Manager, Param};
use leasehold_core::Mode;
use names::Resource;

/// The table libvirt looks up with `dlsym`.
#[unsafe(no_mangle)]
#[allow(non_upper_case_globals)]
pub static virLockDriverImpl: Driver = Driver {
    version: ffi::VERSION,
    flags: ffi::USES_STATE,
    init: drv_init,
    deinit: drv_deinit,
    new: drv_new,
    free: drv_free,
    add_resource: drv_add_resource,
    acquire: drv_acquire,
    release: drv_release,
    inquire: drv_inquire,
};

/// The settings read by `drvInit`. A pointer swapped whole (never a lock): the child forked
/// for QEMU reads it while another daemon thread may be anywhere.
static CONFIG: AtomicPtr<Config> = AtomicPtr::new(std::ptr::null_mut());

fn config() -> &'static Config {
    let p = CONFIG.load(Ordering::Acquire);
    if p.is_null() {
        static DEFAULT: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
        return DEFAULT.get_or_init(Config::default);
    }
    // SAFETY: set from `Box::into_raw` and never freed (an old table may still be read).
    unsafe { &*p }
}

/// What one `virLockManager` collects between `New` and `Free`.
struct Domain {
    name: String,
    uuid: String,
    /// The QEMU process (in the start child: this process, which `exec`s QEMU).
    pid: i32,
    resources: Vec<Resource>,
}

impl Domain {
    /// The owner label the leases carry: `leasehold list` and refusals show it.
    fn label(&self) -> String {
        format!("libvirt {} {}", self.name, self.uuid)
    }
}

/// Runs `f`, turning a panic into an error return: nothing unwinds into libvirt.
fn guarded(what: &str, f: impl FnOnce() -> Result<(), Failure>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            report(e.code, &e.message);
            -1
        }
        Err(_) => {
            report(
                ffi::VIR_ERR_INTERNAL_ERROR,
                &format!(
                    "leasehold lock driver: internal error in {what} (a bug: please report it)"
                ),
            );
            -1
        }
    }
}

/// An error for libvirt: its code and message.
#[derive(Debug)]
pub struct Failure {
    code: c_int,
    message: String,
}

impl Failure {
    fn internal(message: impl Into<String>) -> Failure {
        Failure {
            code: ffi::VIR_ERR_INTERNAL_ERROR,
            message: message.into(),
        }
    }
}

impl From<agent::AgentFailure> for Failure {
    fn from(e: agent::AgentFailure) -> Failure {
        Failure {
            code: if e.busy {
                ffi::VIR_ERR_RESOURCE_BUSY
            } else {
                ffi::VIR_ERR_OPERATION_FAILED
            },
            message: e.message,
        }
    }
}

/// Reports through libvirt's `virReportErrorHelper` when the process has it (libvirtd and
/// its forked children do), else on standard error.
fn report(code: c_int, message: &str) {
    let clean: String = message
        .chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect();
    // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches the whole process.
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"virReportErrorHelper".as_ptr()) };
    let (Ok(msg), false) = (CString::new(clean.clone()), sym.is_null()) else {
        eprintln!("leasehold lock driver: {clean}");
        return;
    };
    // SAFETY: the symbol is libvirt's `virReportErrorHelper`, whose signature is
    // `ffi::ReportErrorHelper`; every string is NUL-terminated and outlives the call, and the
    // format is "%s" with one string argument.
    unsafe {
        let helper: ffi::ReportErrorHelper = std::mem::transmute::<*mut c_void, _>(sym);
        helper(
            ffi::VIR_FROM_LOCKING,
            code,
            c"leasehold".as_ptr(),
            c"leasehold".as_ptr(),
            0,
            c"%s".as_ptr(),
            msg.as_ptr(),
        );
    }
}

/// # Safety
/// Called by libvirt with a NUL-terminated path or NULL.
unsafe extern "C" fn drv_init(
    version: c_uint,
    config_file: *const c_char,
    _flags: c_uint,
) -> c_int {
    guarded("init", || {
        if version != ffi::VERSION {
            return Err(Failure::internal(format!(
                "leasehold lock driver: libvirt speaks lock driver version {version}, this \
                 plugin {}",
                ffi::VERSION
            )));
        }
        let path = if config_file.is_null() {
            Path::new("/etc/libvirt/qemu-leasehold.conf").to_path_buf()
        } else {
            // SAFETY: libvirt passes a NUL-terminated string.
            let s = unsafe { CStr::from_ptr(config_file) };
            Path::new(&*s.to_string_lossy()).to_path_buf()
        };
        let c = Config::load(&path).map_err(|m| Failure {
            code: ffi::VIR_ERR_CONF_SYNTAX,
            message: format!("leasehold lock driver: {m}"),
        })?;
        CONFIG.store(Box::into_raw(Box::new(c)), Ordering::Release);
        Ok(())
    })
}

unsafe extern "C" fn drv_deinit() -> c_int {
    0
}

/// # Safety
/// `man` is libvirt's; `params` points to `nparams` params.
unsafe extern "C" fn drv_new(
    man: *mut Manager,
    kind: c_uint,
    nparams: usize,
    params: *mut Param,
    _flags: c_uint,
) -> c_int {
    guarded("new", || {
        if kind != ffi::OBJECT_TYPE_DOMAIN {
            return Err(Failure::internal(format!(
                "leasehold lock driver: unknown object type {kind}"
            )));
        }
        let mut d = Domain {
            name: String::new(),
            uuid: String::new(),
            pid: 0,
            resources: Vec::new(),
        };
        // SAFETY: libvirt gives `nparams` valid params.
        for p in unsafe { params_of(params, nparams) } {
            match (param_key(p).as_str(), param_value(p)) {
                ("name", Value::Text(s)) => d.name = s,
                ("uuid", Value::Uuid(u)) => d.uuid = uuid_text(&u),
                ("pid", Value::Int(n)) => d.pid = i32::try_from(n).unwrap_or(0),
                _ => {}
            }
        }
        if d.pid <= 0 {
            return Err(Failure::internal(
                "leasehold lock driver: libvirt gave no QEMU pid",
            ));
        }
        // SAFETY: `man` is valid; the box is freed in `drv_free`.
        unsafe { (*man).private_data = Box::into_raw(Box::new(d)).cast() };
        Ok(())
    })
}

/// # Safety
/// `man` is libvirt's, set up by [`drv_new`].
unsafe extern "C" fn drv_free(man: *mut Manager) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `man` is valid and its private data is ours or NULL.
        unsafe {
            let p = (*man).private_data.cast::<Domain>();
            if !p.is_null() {
                drop(Box::from_raw(p));
                (*man).private_data = std::ptr::null_mut();
            }
        }
    }));
}

/// # Safety
/// `man` is libvirt's; `name` NUL-terminated; `params` points to `nparams` params.
unsafe extern "C" fn drv_add_resource(
    man: *mut Manager,
    kind: c_uint,
    name: *const c_char,
    nparams: usize,
    params: *mut Param,
    flags: c_uint,
) -> c_int {
    guarded("add-resource", || {
        // SAFETY: set by `drv_new`.
        let d = unsafe { domain(man) }?;
        // SAFETY: NUL-terminated.
        let name = unsafe { text(name) };
        match kind {
            ffi::RESOURCE_TYPE_DISK => d.resources.push(Resource::Disk {
                path: name,
                readonly: flags & ffi::RESOURCE_READONLY != 0,
                shareable: flags & ffi::RESOURCE_SHARED != 0,
            }),
            ffi::RESOURCE_TYPE_LEASE => {
                let mut lockspace = None;
                // SAFETY: libvirt gives `nparams` valid params.
                for p in unsafe { params_of(params, nparams) } {
                    if let ("lockspace", Value::Text(s)) = (param_key(p).as_str(), param_value(p)) {
                        lockspace = Some(s);
                    }
                }
                d.resources.push(Resource::Lease {
                    lockspace,
                    key: name,
                });
            }
            // Other kinds (none today) take no lease, as libvirt's own drivers do.
            _ => {}
        }
        Ok(())
    })
}

/// # Safety
/// `man` is libvirt's; `state` NULL or NUL-terminated; `fd` NULL or valid.
unsafe extern "C" fn drv_acquire(
    man: *mut Manager,
    state: *const c_char,
    flags: c_uint,
    action: c_int,
    fd: *mut c_int,
) -> c_int {
    guarded("acquire", || {
        // SAFETY: set by `drv_new`.
        let d = unsafe { domain(man) }?;
        if !fd.is_null() {
            // No descriptor for QEMU to inherit: the agent watches the pid itself.
            // SAFETY: libvirt's pointer.
            unsafe { *fd = -1 };
        }
        let c = config();
        // SAFETY: libvirt passes NULL or a NUL-terminated string.
        let state = Some(unsafe { text(state) }).filter(|s| !s.is_empty());
        let register_only = flags & ffi::ACQUIRE_REGISTER_ONLY != 0;
        let on_failure = agent::before_fence(action);
        match state {
            Some(s) => {
                // Resume, or a migration's destination: each lease only if nobody held it
                // since the state was taken.
                let held = state::decode(&s).map_err(Failure::internal)?;
                let wanted = names::leases(c, &d.resources);
                let items = with_tokens(&wanted, &held);
                agent::acquire(
                    c,
                    d.pid,
                    &d.label(),
                    &items,
                    agent::Start::Daemon,
                    on_failure,
                )?;
            }
            None => {
                let items: Vec<agent::Item> = names::leases(c, &d.resources)
                    .into_iter()
                    .map(|(name, mode)| agent::Item {
                        name,
                        mode,
                        expect_token: None,
                    })
                    .collect();
                let start = if register_only {
                    agent::Start::Child { uuid: &d.uuid }
                } else {
                    agent::Start::Daemon
                };
                agent::acquire(c, d.pid, &d.label(), &items, start, on_failure)?;
            }
        }
        Ok(())
    })
}

/// The leases to take on resume: every lease the domain has, exclusive ones pinned to the
/// token the state recorded. A lease the state does not name was not held at the pause (a
/// disk hot-plugged since): it is taken fresh.
fn with_tokens(wanted: &[(String, Mode)], held: &[state::Held]) -> Vec<agent::Item> {
    wanted
        .iter()
        .map(|(name, mode)| agent::Item {
            name: name.clone(),
            mode: *mode,
            expect_token: held
                .iter()
                .find(|h| h.name == *name && h.mode == Mode::Exclusive && *mode == Mode::Exclusive)
                .map(|h| h.token),
        })
        .collect()
}

/// # Safety
/// `man` is libvirt's; `state` NULL or a valid pointer to a string pointer.
unsafe extern "C" fn drv_release(
    man: *mut Manager,
    state: *mut *mut c_char,
    _flags: c_uint,
) -> c_int {
    guarded("release", || {
        // SAFETY: set by `drv_new`.
        let d = unsafe { domain(man) }?;
        let c = config();
        let names: Vec<String> = names::leases(c, &d.resources)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let released = agent::release(c, d.pid, &names)?;
        // A second release of a pause finds nothing held: libvirt keeps the first one's
        // state, which it passed back in.
        if !state.is_null() && !released.is_empty() {
            // SAFETY: libvirt's pointer; the string is malloc'd, as libvirt frees it.
            unsafe { *state = strdup(&state::encode(&released))? };
        }
        Ok(())
    })
}

/// # Safety
/// `man` is libvirt's; `state` NULL or a valid pointer to a string pointer.
unsafe extern "C" fn drv_inquire(
    man: *mut Manager,
    state: *mut *mut c_char,
    _flags: c_uint,
) -> c_int {
    guarded("inquire", || {
        // SAFETY: set by `drv_new`.
        let d = unsafe { domain(man) }?;
        if state.is_null() {
            return Err(Failure::internal(
                "leasehold lock driver: inquire without a state",
            ));
        }
        let c = config();
        let names: Vec<String> = names::leases(c, &d.resources)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let held = agent::held(c, d.pid, &names)?;
        // SAFETY: libvirt's pointer; malloc'd, as libvirt frees it.
        unsafe {
            *state = if held.is_empty() {
                std::ptr::null_mut()
            } else {
                strdup(&state::encode(&held))?
            }
        };
        Ok(())
    })
}

/// # Safety
/// `man` valid, its private data set by [`drv_new`].
unsafe fn domain<'a>(man: *mut Manager) -> Result<&'a mut Domain, Failure> {
    // SAFETY: the caller's promise.
    let p = unsafe { (*man).private_data.cast::<Domain>() };
    if p.is_null() {
        return Err(Failure::internal(
            "leasehold lock driver: no domain (New failed?)",
        ));
    }
    // SAFETY: ours, from `drv_new`; libvirt uses one manager from one thread at a time.
    Ok(unsafe { &mut *p })
}

/// A param's value, read by its type.
enum Value {
    Text(String),
    Int(i64),
    Uuid([u8; 16]),
    Other,
}

/// A param's key.
fn param_key(p: &Param) -> String {
    if p.key.is_null() {
        return String::new();
    }
    // SAFETY: libvirt's keys are NUL-terminated static strings.
    unsafe { CStr::from_ptr(p.key) }
        .to_string_lossy()
        .into_owned()
}

/// A param's value: the union member its type names.
fn param_value(p: &Param) -> Value {
    // SAFETY: each arm reads the union member that libvirt's type tag says is set; strings
    // are NUL-terminated or NULL.
    unsafe {
        match p.kind {
            ffi::param::STRING | ffi::param::CSTRING => Value::Text(text(p.value.str)),
            ffi::param::INT => Value::Int(i64::from(p.value.iv)),
            ffi::param::UINT => Value::Int(i64::from(p.value.ui)),
            ffi::param::LONG => Value::Int(p.value.l),
            ffi::param::ULONG => Value::Int(i64::try_from(p.value.ul).unwrap_or(-1)),
            ffi::param::UUID => Value::Uuid(p.value.uuid),
            _ => Value::Other,
        }
    }
}

/// # Safety
/// `params` points to `n` params, or `n` is 0.
unsafe fn params_of<'a>(params: *mut Param, n: usize) -> &'a [Param] {
    if params.is_null() || n == 0 {
        return &[];
    }
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts(params, n) }
}

/// # Safety
/// `s` NULL or NUL-terminated.
unsafe fn text(s: *const c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    // SAFETY: the caller's promise.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

fn uuid_text(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// A malloc'd copy, which libvirt frees with `free`.
fn strdup(s: &str) -> Result<*mut c_char, Failure> {
    let c =
        CString::new(s).map_err(|_| Failure::internal("leasehold lock driver: NUL in state"))?;
    // SAFETY: `c` is NUL-terminated.
    let p = unsafe { libc::strdup(c.as_ptr()) };
    if p.is_null() {
        return Err(Failure::internal("leasehold lock driver: out of memory"));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_libvirts_layout() {
        assert_eq!(std::mem::size_of::<Driver>(), 72);
        assert_eq!(std::mem::size_of::<Param>(), 32);
        assert_eq!(std::mem::size_of::<Manager>(), 16);
    }

    #[test]
    fn uuids_print_as_libvirt_prints_them() {
        let u = [
            0x6f, 0x1c, 0x2d, 0x3e, 0x4f, 0x50, 0x61, 0x72, 0x83, 0x94, 0xa5, 0xb6, 0xc7, 0xd8,
            0xe9, 0xfa,
        ];
        assert_eq!(uuid_text(&u), "6f1c2d3e-4f50-6172-8394-a5b6c7d8e9fa");
    }

    #[test]
    fn a_resume_pins_exclusive_leases_to_their_tokens() {
        let wanted = vec![
            ("a".to_string(), Mode::Exclusive),
            ("b".to_string(), Mode::Shared),
            ("c".to_string(), Mode::Exclusive),
        ];
        let held = vec![
            state::Held {
                name: "a".into(),
                mode: Mode::Exclusive,
                token: 7,
            },
            state::Held {
                name: "b".into(),
                mode: Mode::Shared,
                token: 9,
            },
        ];
        let got: Vec<_> = with_tokens(&wanted, &held)
            .into_iter()
            .map(|i| (i.name, i.expect_token))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".to_string(), Some(7)),
                ("b".to_string(), None),
                ("c".to_string(), None)
            ]
        );
    }
}
