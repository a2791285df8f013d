//! Image bytes as the gateway reads them: the header's size (before any decoding), the format
//! sniff, and the bounded decode.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = acc::eval::header_size(data);
    let _ = acc::providers::sniff_image(data);
    let _ = acc::eval::decode(data);
});
