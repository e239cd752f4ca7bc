//! Generates the C header from this crate's sources into `$OUT_DIR/fmi.h`. The committed
//! `include/fmi.h` must equal it: `tests/header.rs` checks, and rewrites it with `FMI_BLESS=1`.

use std::error::Error;
use std::path::PathBuf;

/// The sources holding the C API, in the order their items appear in the header.
const SOURCES: [&str; 4] = ["status.rs", "types.rs", "comm.rs", "coll.rs"];

fn main() -> Result<(), Box<dyn Error>> {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("fmi.h");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml"))?;
    let mut builder = cbindgen::Builder::new().with_config(config);
    for src in SOURCES {
        println!("cargo:rerun-if-changed=src/{src}");
        // Parsing single files needs no `cargo metadata` call from inside the build.
        builder = builder.with_src(dir.join("src").join(src));
    }
    builder.generate()?.write_to_file(&out);
    Ok(())
}
