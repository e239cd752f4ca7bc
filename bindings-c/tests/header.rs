//! The committed `include/fmi.h` must be what cbindgen generates from the sources today.
//!
//! `build.rs` writes the generated header to `$OUT_DIR/fmi.h`; this test compares. With
//! `FMI_BLESS=1` it rewrites the committed file instead of failing.

#![allow(clippy::expect_used, clippy::panic)]

use std::path::Path;

#[test]
fn committed_header_is_up_to_date() {
    let generated_path = Path::new(env!("OUT_DIR")).join("fmi.h");
    let committed_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/fmi.h");
    let generated = std::fs::read_to_string(&generated_path).expect("build.rs wrote the header");
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    if generated == committed {
        return;
    }
    if std::env::var_os("FMI_BLESS").is_some() {
        std::fs::write(&committed_path, &generated).expect("rewrite include/fmi.h");
        eprintln!("rewrote {}", committed_path.display());
        return;
    }
    let line = generated
        .lines()
        .zip(committed.lines())
        .position(|(g, c)| g != c)
        .unwrap_or_else(|| generated.lines().count().min(committed.lines().count()));
    panic!(
        "{} is stale: it differs from the generated header from line {} on\n  generated: {:?}\n  committed: {:?}\nrun `FMI_BLESS=1 cargo test -p fmi-c --test header` and commit the result",
        committed_path.display(),
        line + 1,
        generated.lines().nth(line).unwrap_or("<end of file>"),
        committed.lines().nth(line).unwrap_or("<end of file>"),
    );
}
