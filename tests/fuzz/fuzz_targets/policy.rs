//! A policy file, as `acc check` and a reload validate it (the certificate and model files it
//! names are read from disk only when they exist).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let sources = acc::policy::Sources { files: vec![("fuzz.toml".into(), text.to_string())] };
    let _ = acc::policy::validate(&sources);
});
