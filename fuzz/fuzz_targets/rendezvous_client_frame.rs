//! Fuzz target: see `fmi_fuzz::rendezvous_client_frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fmi_fuzz::rendezvous_client_frame(data));
