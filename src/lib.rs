//! Workspace-level tests, examples and benchmarks of fmi live in tests/, examples/ and benches/.
