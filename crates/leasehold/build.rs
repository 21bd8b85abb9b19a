//! Links the unwinder (libgcc_eh) statically when the C compiler has it, so the binaries do
//! not load `libgcc_s.so.1` at start: its constructor runs `cpuid`, which traps to the
//! hypervisor on a VM, and the library is one more to map and relocate. 0.14 ms of CPU per
//! process start on the project's VM (docs/performance.md): a fifth of what `leasehold run --
//! true` spends beyond `flock FILE true`. Where it is not found (another C toolchain), the
//! binaries load `libgcc_s` as every Rust program does.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");
    let target = std::env::var("TARGET").unwrap_or_default();
    if !target.ends_with("-linux-gnu") {
        return;
    }
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let Ok(out) = Command::new(cc)
        .arg("-print-file-name=libgcc_eh.a")
        .output()
    else {
        return;
    };
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    // Without the file, cc prints the name alone.
    let (Some(dir), true) = (path.parent(), path.is_absolute() && path.is_file()) else {
        return;
    };
    println!("cargo:rustc-link-search=native={}", dir.display());
    println!("cargo:rustc-link-lib=static:-bundle=gcc_eh");
}
