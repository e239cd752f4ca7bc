//! The C API from C: the examples in `examples/c/` and the C tests in `tests/c/` are compiled
//! with the system C compiler (`cc`) against the `libfmi.so`/`libfmi.a` of the same build
//! (`cargo build --workspace` with the test's profile and features; `cargo test` alone does not
//! build them), and run, multi-process ones under `fmi run`.
//!
//! The `fmi` launcher is `target/<profile>/fmi` (built by `cargo test --workspace`, or
//! `cargo build -p fmi-cli`), or `$FMI_BIN`.

// Test helpers: a failure is a panic with a message.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `target/<profile>/deps`, where cargo put this test and the libraries it built for it.
fn deps_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test binary");
    exe.parent()
        .expect("the test binary is in a directory")
        .to_path_buf()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bindings-c is inside the repository")
        .to_path_buf()
}

fn include_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("include")
}

/// The directory holding `libfmi.so` and `libfmi.a` for this build.
fn lib_dir() -> PathBuf {
    let deps = deps_dir();
    for dir in [
        deps.clone(),
        deps.parent().map(Path::to_path_buf).unwrap_or_default(),
    ] {
        if dir.join("libfmi.so").is_file() && dir.join("libfmi.a").is_file() {
            return dir;
        }
    }
    panic!(
        "libfmi.so/libfmi.a not found next to {}: build them first with the test's profile and \
         features (`cargo build --release --workspace`, as scripts/test.sh does); `cargo test` \
         alone does not build a crate that is only a cdylib and a staticlib",
        deps.display()
    );
}

fn fmi_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("FMI_BIN") {
        return PathBuf::from(bin);
    }
    let profile_dir = deps_dir()
        .parent()
        .expect("deps is inside target/<profile>")
        .to_path_buf();
    let bin = profile_dir.join("fmi");
    assert!(
        bin.is_file(),
        "the fmi launcher is not built at {}: run `cargo build -p fmi-cli` (with --release for \
         release tests) or `cargo test --workspace`, or set FMI_BIN",
        bin.display()
    );
    bin
}

fn scratch() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fmi-c");
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}

fn check(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    check(what, &out)
}

const WARNINGS: [&str; 5] = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"];

/// Compiles C sources against the shared library; returns the executable.
fn compile(name: &str, sources: &[PathBuf]) -> PathBuf {
    let exe = scratch().join(name);
    let lib = lib_dir();
    run(
        &format!("cc {name}"),
        Command::new("cc")
            .args(WARNINGS)
            .arg("-I")
            .arg(include_dir())
            .args(sources)
            .arg("-o")
            .arg(&exe)
            .arg("-L")
            .arg(&lib)
            .arg("-lfmi")
            .arg("-lpthread")
            .arg(format!("-Wl,-rpath,{}", lib.display())),
    );
    exe
}

/// Runs `program` under `fmi run -n ranks`; returns its (rank-prefixed) output.
fn fmi_run(ranks: u32, program: &Path, args: &[&str]) -> String {
    run(
        &format!("fmi run -n {ranks} {}", program.display()),
        Command::new(fmi_bin())
            .args(["run", "-n", &ranks.to_string(), "--timeout", "300", "--"])
            .arg(program)
            .args(args),
    )
}

fn example(name: &str) -> PathBuf {
    repo().join("examples/c").join(name)
}

fn c_test(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(name)
}

fn assert_allreduce_output(out: &str, ranks: u32) {
    let sum = ranks * (ranks + 1) / 2;
    for r in 0..ranks {
        let line = format!("[{r}] rank {r}/{ranks}: allreduce sum = {sum}");
        assert!(
            out.lines().any(|l| l == line),
            "missing {line:?} in:\n{out}"
        );
        let checksum = format!("[{r}] rank {r}/{ranks}: vector checksum = ");
        assert!(out.contains(&checksum), "missing {checksum:?} in:\n{out}");
    }
}

#[test]
fn allreduce_example_runs_on_four_ranks() {
    let exe = compile("allreduce", &[example("allreduce.c")]);
    let out = fmi_run(4, &exe, &[]);
    assert_allreduce_output(&out, 4);
}

#[test]
fn ping_pong_example_runs_on_two_ranks() {
    let exe = compile("ping_pong", &[example("ping_pong.c")]);
    let out = fmi_run(2, &exe, &["10", "262144"]);
    for size in [8, 64, 512, 4096, 32768, 262144] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("[0]")
                    && l.split_whitespace().nth(1) == Some(&size.to_string())),
            "no line for {size} bytes in:\n{out}"
        );
    }
}

#[test]
fn every_call_matches_expected_values_on_three_and_four_ranks() {
    let exe = compile("collectives", &[c_test("collectives.c")]);
    for ranks in [3u32, 4] {
        let out = fmi_run(ranks, &exe, &[]);
        for r in 0..ranks {
            let ok = format!("[{r}] rank {r}/{ranks}: collectives ok (");
            assert!(out.contains(&ok), "missing {ok:?} in:\n{out}");
        }
    }
}

#[test]
fn invalid_arguments_return_codes_and_messages() {
    let exe = compile("invalid_args", &[c_test("invalid_args.c")]);
    let mut cmd = Command::new(&exe);
    for var in [
        "FMI_RANK",
        "FMI_SIZE",
        "FMI_JOB",
        "FMI_RENDEZVOUS",
        "FMI_TOKEN",
        "FMI_CONFIG",
        "FMI_CHANNEL",
    ] {
        cmd.env_remove(var);
    }
    let out = run("invalid_args", &mut cmd);
    assert!(out.contains("invalid_args ok ("), "{out}");
}

#[test]
fn header_compiles_as_c99_and_cpp() {
    let header = include_dir().join("fmi.h");
    run(
        "cc -std=c99 fmi.h",
        Command::new("cc")
            .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"])
            .args(["-fsyntax-only", "-x", "c"])
            .arg(&header),
    );
    run(
        "c++ fmi.h",
        Command::new("c++")
            .args(["-std=c++11", "-Wall", "-Wextra", "-Werror", "-pedantic"])
            .args(["-fsyntax-only", "-x", "c++"])
            .arg(&header),
    );
}

/// Installs into a scratch prefix with `install.sh` (no build: the libraries of this test).
fn install(prefix: &Path) {
    run(
        "install.sh",
        Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("install.sh"))
            .arg(prefix)
            .env("FMI_LIB_DIR", lib_dir()),
    );
}

fn pkg_config(prefix: &Path, args: &[&str]) -> Vec<String> {
    let out = run(
        "pkg-config",
        Command::new("pkg-config")
            .args(args)
            .arg("fmi")
            .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig")),
    );
    out.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn installed_library_links_with_pkg_config_shared_and_static() {
    let prefix = scratch().join("prefix-pkg-config");
    install(&prefix);
    let cflags = pkg_config(&prefix, &["--cflags"]);
    assert!(cflags.iter().any(|f| f.ends_with("/include")), "{cflags:?}");

    let shared = scratch().join("allreduce-pkg-config");
    run(
        "cc with pkg-config",
        Command::new("cc")
            .args(WARNINGS)
            .args(&cflags)
            .arg(example("allreduce.c"))
            .arg("-o")
            .arg(&shared)
            .args(pkg_config(&prefix, &["--libs"]))
            .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display())),
    );
    assert_allreduce_output(&fmi_run(2, &shared, &[]), 2);

    // Static: the archive itself plus the system libraries of Libs.private.
    let static_exe = scratch().join("allreduce-static");
    let libs = pkg_config(&prefix, &["--libs", "--static"]);
    run(
        "cc static",
        Command::new("cc")
            .args(WARNINGS)
            .args(&cflags)
            .arg(example("allreduce.c"))
            .arg("-o")
            .arg(&static_exe)
            .arg(prefix.join("lib/libfmi.a"))
            .args(libs.iter().filter(|l| *l != "-lfmi")),
    );
    let deps = run("ldd", Command::new("ldd").arg(&static_exe));
    assert!(!deps.contains("libfmi"), "linked dynamically:\n{deps}");
    assert_allreduce_output(&fmi_run(2, &static_exe, &[]), 2);
}

/// The CMake example, when CMake is installed (`apt-get install -y cmake`); set
/// `FMI_REQUIRE_CMAKE=1` to fail instead of skipping without it.
#[test]
fn cmake_example_builds_and_runs() {
    let have_cmake = Command::new("cmake")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_cmake {
        assert!(
            std::env::var_os("FMI_REQUIRE_CMAKE").is_none(),
            "FMI_REQUIRE_CMAKE is set but cmake is not installed"
        );
        eprintln!("cmake is not installed: skipping the CMake example (apt-get install -y cmake)");
        return;
    }
    let prefix = scratch().join("prefix-cmake");
    install(&prefix);
    let build = scratch().join("cmake-build");
    let _ = std::fs::remove_dir_all(&build);
    run(
        "cmake configure",
        Command::new("cmake")
            .arg("-S")
            .arg(repo().join("examples/c"))
            .arg("-B")
            .arg(&build)
            .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig")),
    );
    run(
        "cmake build",
        Command::new("cmake").arg("--build").arg(&build),
    );
    assert_allreduce_output(&fmi_run(4, &build.join("allreduce"), &[]), 4);
    let out = fmi_run(2, &build.join("ping_pong"), &["5", "4096"]);
    assert!(out.contains("[0]       4096"), "{out}");
}
