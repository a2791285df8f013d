//! The client's multipart body (`/v1/images/edits`, `/variations`) as the proxy parses it; the
//! first byte picks the operation, the boundary is fixed.
#![no_main]
use acc::request::{GenerationRequest, Operation};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&op, body)) = data.split_first() else { return };
    let op = if op % 2 == 0 { Operation::Edit } else { Operation::Variation };
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let body = bytes::Bytes::copy_from_slice(body);
    let _ = rt.block_on(GenerationRequest::from_multipart(op, body, "BOUNDARY"));
});
