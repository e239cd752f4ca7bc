//! Fuzz target: see `fmi_fuzz::storage_chunk`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fmi_fuzz::storage_chunk(data));
