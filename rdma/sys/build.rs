//! Generates the libfabric bindings from the headers installed on this machine.
//!
//! libfabric's data-path functions (`fi_tsend`, `fi_trecv`, `fi_read`, `fi_cq_read`, `fi_close`,
//! ...) are `static inline` wrappers around function-pointer tables, so they have no symbol in
//! `libfabric.so`. bindgen's `wrap_static_fns` writes a C file with one exported wrapper per such
//! function (`<name>__extern`), which `cc` compiles into a static library linked here.

// A build script reports failure by panicking with a message cargo shows.
#![allow(clippy::expect_used, clippy::panic)]

#[cfg(feature = "bind")]
use std::env;
#[cfg(feature = "bind")]
use std::path::PathBuf;

#[cfg(not(feature = "bind"))]
fn main() {}

#[cfg(feature = "bind")]
fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=build.rs");
    let lib = match pkg_config::Config::new()
        .atleast_version("1.10")
        .probe("libfabric")
    {
        Ok(lib) => lib,
        Err(e) => {
            panic!(
                "fmi-fabric-sys: libfabric was not found by pkg-config ({e}); install it \
                 (Debian/Ubuntu: apt-get install -y libfabric-dev libclang-dev) or build without \
                 the `rdma` feature"
            );
        }
    };
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let wrappers = out.join("fabric_static_fns");
    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("fi_.*")
        .allowlist_type("fi_.*|fid_.*|fid")
        .allowlist_var("FI_.*")
        .derive_default(true)
        .layout_tests(false)
        .wrap_static_fns(true)
        .wrap_static_fns_path(&wrappers)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for dir in &lib.include_paths {
        builder = builder.clang_arg(format!("-I{}", dir.display()));
    }
    let bindings = builder.generate().expect(
        "fmi-fabric-sys: bindgen failed on the libfabric headers (is libclang-dev installed?)",
    );
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("fmi-fabric-sys: cannot write bindings.rs");

    let mut cc = cc::Build::new();
    cc.file(wrappers.with_extension("c"))
        .include(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .warnings(false);
    for dir in &lib.include_paths {
        cc.include(dir);
    }
    cc.compile("fabric_static_fns");
}
