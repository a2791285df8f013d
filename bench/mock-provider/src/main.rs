//! Minimal OpenAI-Images-compatible mock provider used by the acc benchmark.
//!
//! Every request (any method, any path) gets the same precomputed answer:
//! `200 application/json {"created":1700000000,"data":[{"b64_json":"<base64 of --png>"}]}`.
//! The body is built once at start-up; per request we only drain the request
//! body and clone a `Bytes` handle, so the mock costs as little CPU as possible.
//! `--latency-ms N` makes it wait N ms (a timer, no CPU) before answering each request, to play
//! a slow provider (the mirror candidate of the `acc-mirror` benchmark target).

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
fn base64(input: &[u8]) -> String {
    let mut out = Vec::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(B64[(n >> 18) as usize & 63]);
        out.push(B64[(n >> 12) as usize & 63]);
        out.push(if chunk.len() > 1 { B64[(n >> 6) as usize & 63] } else { b'=' });
        out.push(if chunk.len() > 2 { B64[n as usize & 63] } else { b'=' });
    }
    String::from_utf8(out).expect("base64 alphabet is ASCII")
}

struct Args {
    listen: SocketAddr,
    png: String,
    threads: usize,
    latency: Duration,
}

fn usage() -> ! {
    eprintln!("usage: mock-provider --listen 127.0.0.1:PORT --png FILE [--threads N] [--latency-ms N]");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut listen = None;
    let mut png = None;
    let mut threads = 1usize;
    let mut latency_ms = 0u64;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--listen" => listen = Some(val().parse().unwrap_or_else(|_| usage())),
            "--png" => png = Some(val()),
            "--threads" => threads = val().parse().unwrap_or_else(|_| usage()),
            "--latency-ms" => latency_ms = val().parse().unwrap_or_else(|_| usage()),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    Args {
        listen: listen.unwrap_or_else(|| usage()),
        png: png.unwrap_or_else(|| usage()),
        threads: threads.max(1),
        latency: Duration::from_millis(latency_ms),
    }
}

async fn handle(
    req: Request<Incoming>,
    body: Bytes,
    latency: Duration,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Drain the request body completely so the connection can be reused.
    let _ = req.into_body().collect().await;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

async fn serve(args: Args, body: Bytes) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {addr}")?;
        out.flush()?;
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept error: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let latency = args.latency;
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, body.clone(), latency));
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn main() {
    let args = parse_args();
    let png = std::fs::read(&args.png).unwrap_or_else(|e| {
        eprintln!("cannot read {}: {e}", args.png);
        std::process::exit(1);
    });
    let json = format!(
        "{{\"created\":1700000000,\"data\":[{{\"b64_json\":\"{}\"}}]}}",
        base64(&png)
    );
    let body = Bytes::from(json);
    let rt = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    if let Err(e) = rt.block_on(serve(args, body)) {
        eprintln!("mock-provider: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(b"fooba"), "Zm9vYmE=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
