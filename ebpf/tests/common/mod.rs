//! What the real-kernel test files share.
#![allow(unsafe_code, dead_code)]

/// True as root; otherwise prints `skipping: needs root` and returns false,
/// unless `WARDEN_REQUIRE_EBPF` is set (`cargo xtask test` as root, as in
/// CI), where running without root fails the test.
pub fn have_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var_os("WARDEN_REQUIRE_EBPF").is_none(),
            "WARDEN_REQUIRE_EBPF is set but the tests do not run as root"
        );
        eprintln!("skipping: needs root");
    }
    root
}
