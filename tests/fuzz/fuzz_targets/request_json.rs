//! The client's JSON body (`POST /v1/images/generations`) as the proxy parses it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = acc::request::GenerationRequest::from_json(data);
});
