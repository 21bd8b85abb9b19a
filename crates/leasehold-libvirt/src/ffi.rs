//! The C ABI of libvirt's lock drivers (`src/locking/lock_driver.h`, version 1000000), as
//! libvirt 9.0 lays it out. Checked against a live libvirtd: `virLockDriver` is 72 bytes,
//! `virLockManagerParam` 32.

use std::ffi::{c_char, c_int, c_uint, c_void};

/// `VIR_LOCK_MANAGER_VERSION`.
pub const VERSION: c_uint = 1_000_000;
/// `VIR_LOCK_MANAGER_USES_STATE`: the driver gives and takes state strings.
pub const USES_STATE: c_uint = 1;

/// `VIR_LOCK_MANAGER_OBJECT_TYPE_DOMAIN`.
pub const OBJECT_TYPE_DOMAIN: c_uint = 0;
/// `VIR_LOCK_MANAGER_NEW_STARTED`: the object is being started.
pub const NEW_STARTED: c_uint = 1;

/// `VIR_LOCK_MANAGER_RESOURCE_TYPE_DISK`: the name is the disk's path.
pub const RESOURCE_TYPE_DISK: c_uint = 0;
/// `VIR_LOCK_MANAGER_RESOURCE_TYPE_LEASE`: the name is a `<lease>`'s key.
pub const RESOURCE_TYPE_LEASE: c_uint = 1;
/// `VIR_LOCK_MANAGER_RESOURCE_READONLY`.
pub const RESOURCE_READONLY: c_uint = 1;
/// `VIR_LOCK_MANAGER_RESOURCE_SHARED` (`<shareable/>`: shared *writable*).
pub const RESOURCE_SHARED: c_uint = 2;

/// `VIR_LOCK_MANAGER_ACQUIRE_REGISTER_ONLY`.
pub const ACQUIRE_REGISTER_ONLY: c_uint = 1;
/// `VIR_LOCK_MANAGER_ACQUIRE_RESTRICT`: the process must not release its own leases.
pub const ACQUIRE_RESTRICT: c_uint = 2;

/// `VIR_LOCK_MANAGER_PARAM_TYPE_*`.
pub mod param {
    /// A string libvirt owns.
    pub const STRING: i32 = 0;
    /// A const string.
    pub const CSTRING: i32 = 1;
    /// `int`.
    pub const INT: i32 = 2;
    /// `long long`.
    pub const LONG: i32 = 3;
    /// `unsigned int`.
    pub const UINT: i32 = 4;
    /// `unsigned long long`.
    pub const ULONG: i32 = 5;
    /// `double`.
    pub const DOUBLE: i32 = 6;
    /// 16 bytes.
    pub const UUID: i32 = 7;
}

/// `virLockManagerParam`'s value union.
#[repr(C)]
#[derive(Clone, Copy)]
pub union ParamValue {
    /// INT.
    pub iv: c_int,
    /// LONG.
    pub l: i64,
    /// UINT.
    pub ui: c_uint,
    /// ULONG.
    pub ul: u64,
    /// DOUBLE.
    pub d: f64,
    /// STRING, CSTRING.
    pub str: *const c_char,
    /// UUID.
    pub uuid: [u8; 16],
}

/// `virLockManagerParam`.
#[repr(C)]
pub struct Param {
    /// One of [`param`].
    pub kind: c_int,
    /// Its name.
    pub key: *const c_char,
    /// Its value.
    pub value: ParamValue,
}

/// `virLockManager`: `privateData` is the driver's.
#[repr(C)]
pub struct Manager {
    /// The driver table.
    pub driver: *mut c_void,
    /// Ours.
    pub private_data: *mut c_void,
}

/// `virLockDriver`.
#[repr(C)]
pub struct Driver {
    /// [`VERSION`].
    pub version: c_uint,
    /// [`USES_STATE`] or 0.
    pub flags: c_uint,
    /// `drvInit(version, configFile, flags)`.
    pub init: unsafe extern "C" fn(c_uint, *const c_char, c_uint) -> c_int,
    /// `drvDeinit()`.
    pub deinit: unsafe extern "C" fn() -> c_int,
    /// `drvNew(man, type, nparams, params, flags)`.
    pub new: unsafe extern "C" fn(*mut Manager, c_uint, usize, *mut Param, c_uint) -> c_int,
    /// `drvFree(man)`.
    pub free: unsafe extern "C" fn(*mut Manager),
    /// `drvAddResource(man, type, name, nparams, params, flags)`.
    pub add_resource: unsafe extern "C" fn(
        *mut Manager,
        c_uint,
        *const c_char,
        usize,
        *mut Param,
        c_uint,
    ) -> c_int,
    /// `drvAcquire(man, state, flags, action, fd)`.
    pub acquire:
        unsafe extern "C" fn(*mut Manager, *const c_char, c_uint, c_int, *mut c_int) -> c_int,
    /// `drvRelease(man, state, flags)`.
    pub release: unsafe extern "C" fn(*mut Manager, *mut *mut c_char, c_uint) -> c_int,
    /// `drvInquire(man, state, flags)`.
    pub inquire: unsafe extern "C" fn(*mut Manager, *mut *mut c_char, c_uint) -> c_int,
}

/// `VIR_FROM_LOCKING`.
pub const VIR_FROM_LOCKING: c_int = 42;
/// `VIR_ERR_RESOURCE_BUSY`.
pub const VIR_ERR_RESOURCE_BUSY: c_int = 87;
/// `VIR_ERR_INTERNAL_ERROR`.
pub const VIR_ERR_INTERNAL_ERROR: c_int = 1;
/// `VIR_ERR_CONFIG_UNSUPPORTED`.
pub const VIR_ERR_CONFIG_UNSUPPORTED: c_int = 67;
/// `VIR_ERR_OPERATION_DENIED`.
pub const VIR_ERR_OPERATION_DENIED: c_int = 29;
/// `VIR_ERR_CONF_SYNTAX`.
pub const VIR_ERR_CONF_SYNTAX: c_int = 33;
/// `VIR_ERR_OPERATION_FAILED`.
pub const VIR_ERR_OPERATION_FAILED: c_int = 9;

/// `virReportErrorHelper(domain, code, file, func, line, fmt, ...)`.
pub type ReportErrorHelper =
    unsafe extern "C" fn(c_int, c_int, *const c_char, *const c_char, usize, *const c_char, ...);
