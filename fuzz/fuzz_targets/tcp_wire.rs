//! Fuzz target: see `fmi_fuzz::tcp_wire`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fmi_fuzz::tcp_wire(data));
