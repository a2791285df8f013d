//! The prompt contract (`x-acc-contract`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = acc::request::contract::Contract::parse(data);
});
