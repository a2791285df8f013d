//! Provider image URLs as the fetch guard reads them: the URL, a redirect's Location joined to
//! it, the address checks on IP-literal hosts, and `data:` URLs (nothing goes to the network).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (url, location) = text.split_once('\n').unwrap_or((text, "/"));
    if url.starts_with("data:") {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let _ = rt.block_on(acc::fetch::fetch(url, &Default::default()));
        return;
    }
    let Ok(uri) = url.parse::<http::Uri>() else { return };
    if let Some(host) = uri.host() {
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse() {
            let _ = acc::fetch::is_public(ip);
        }
    }
    let _ = acc::fetch::join(&uri, location);
    let _ = acc::upstream::Endpoint::parse(url);
});
