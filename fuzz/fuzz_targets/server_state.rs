//! Fuzz target: see `fmi_fuzz::server_state`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fmi_fuzz::server_state(data));
