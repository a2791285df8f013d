//! Every adapter's answer parsers (success and error shapes), the JSON skim and the image sniff,
//! on an untrusted provider answer; the first two bytes are the status.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let status = u16::from_be_bytes([data[0], data[1]]) % 600;
    acc::providers::parse_untrusted(status, &bytes::Bytes::copy_from_slice(&data[2..]));
});
