//! Upstream HTTP/1.1 connections, kept per proxy worker thread and driven by the request that
//! uses them.
//!
//! hyper's pooled client runs every connection as a task of its own and talks to it over
//! channels: each request then costs an extra task switch and several wake-ups. Here a request
//! takes an idle connection of its thread, polls the connection's I/O itself while it waits for
//! the answer, and puts the connection back when the answer is read. Connections never cross
//! threads (each worker has its own runtime), so the pool needs no lock.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{header, HeaderName, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::body::{ChunkedBody, Rope};

/// Idle connections kept per upstream (scheme + authority) and thread.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused (servers close theirs).
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most of a non-2xx answer's body that is read (bytes): an error is classified from its
/// start, and a provider answering a 400 with megabytes must not have them all held (the rest
/// is left unread and the connection closed).
pub const MAX_ERROR_BODY: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made: nothing was sent.
    #[error("{0}")]
    Connect(String),
    /// The connection failed after the request may have been sent.
    #[error("{0}")]
    Transport(String),
    /// Reading the answer would have put the answers being read, all attempts together, over
    /// their memory bound (`[server] max_answer_buffer_mib`, bytes here): the rest was left
    /// unread and the connection closed.
    #[error("the gateway's memory for provider answers ({} MiB) is full", .0 >> 20)]
    AnswerMemoryFull(usize),
    /// A 2xx answer in a content coding (gzip, br, ...) although the request accepted only
    /// `identity`: its body cannot be read as the API's JSON or image.
    #[error("the answer is {0}-encoded, which the gateway does not accept (it asks for identity)")]
    Encoded(String),
}

/// Bytes of provider answers being read or held, all attempts of the process together (see
/// [`Answer`]'s memory hold).
static ANSWERS_HELD: AtomicUsize = AtomicUsize::new(0);

/// Bytes of provider answers held now, all attempts together: what
/// `[server] max_answer_buffer_mib` bounds.
pub fn answer_memory_held() -> usize {
    ANSWERS_HELD.load(Ordering::Relaxed)
}

/// One answer's share of the process's answer memory; given back when the [`Answer`] is
/// dropped (the images cut from it may live on in the client's answer: the bound is on what
/// is read at once, which is where a provider that answers hundreds of megabytes costs).
struct AnswerHold {
    bytes: usize,
}

impl AnswerHold {
    /// Takes `n` more bytes; `false` (nothing taken) when all answers together would pass `max`.
    fn grow(&mut self, n: usize, max: usize) -> bool {
        let taken = ANSWERS_HELD
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| held.checked_add(n).filter(|&t| t <= max))
            .is_ok();
        if taken {
            self.bytes += n;
        }
        taken
    }
}

impl Drop for AnswerHold {
    fn drop(&mut self) {
        ANSWERS_HELD.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A status and a fully read body.
pub struct Answer {
    pub status: StatusCode,
    /// How long the upstream asked to be left alone (`Retry-After` and the like), read from a
    /// non-2xx answer's headers.
    pub retry_after: Option<std::time::Duration>,
    /// The answer's headers (moved out of the response, not copied).
    pub headers: http::HeaderMap,
    /// The body as the pieces it arrived in (an image payload inside it is forwarded as slices
    /// of them, not copied); [`Rope::to_bytes`] for one buffer.
    pub body: Rope,
    /// The body's bytes counted against the answer memory of the [`scoped`] call that read it.
    _hold: AnswerHold,
}

/// Where requests go: resolved once per provider, not per request.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Pool key: `scheme://authority`.
    key: String,
    host: String,
    port: u16,
    tls: bool,
    host_header: HeaderValue,
    /// Origin-form request target (path and query).
    path: Uri,
}

impl Endpoint {
    /// An endpoint from an absolute `http`/`https` URL.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let uri: Uri = url.parse().map_err(|e| format!("invalid URL {url}: {e}"))?;
        let (scheme, authority) = match (uri.scheme_str(), uri.authority()) {
            (Some(s @ ("http" | "https")), Some(a)) => (s, a),
            _ => return Err(format!("not an absolute http(s) URL: {url}")),
        };
        let tls = scheme == "https";
        Ok(Endpoint {
            key: format!("{scheme}://{authority}"),
            host: authority.host().trim_start_matches('[').trim_end_matches(']').to_string(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            tls,
            host_header: HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?,
            path: Uri::try_from(uri.path_and_query().map_or("/", |p| p.as_str())).map_err(|e| e.to_string())?,
        })
    }
}

/// The W3C Trace Context headers an attempt's requests carry
/// (<https://www.w3.org/TR/trace-context/>): the attempt's `traceparent`, and the client's
/// `tracestate` passed on unchanged where the request continued the client's trace (section
/// 3.3: a participant propagates the `tracestate` it received).
#[derive(Debug, Clone)]
pub struct TraceHeaders {
    pub traceparent: HeaderValue,
    pub tracestate: Option<HeaderValue>,
}

/// What every request an attempt sends carries and is held to ([`scoped`]).
#[derive(Debug, Clone)]
pub struct Scope {
    /// The attempt's trace context; `None` sends no `traceparent`.
    pub trace: Option<TraceHeaders>,
    /// The most bytes of provider answers the process may hold at once, all attempts together
    /// (`[server] max_answer_buffer_mib`); an answer that would pass it fails with
    /// [`UpstreamError::AnswerMemoryFull`]. Outside a scope, answers are not bounded together.
    pub answer_memory: usize,
    /// Set once an answer with a 2xx status has arrived (its head; not an event stream's, which
    /// comes before the images are made), for an attempt that must know whether the provider
    /// made its images when the deadline passed; `None`: not told.
    pub answered: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

tokio::task_local! {
    /// The attempt being sent ([`scoped`]).
    static SCOPE: Scope;
}

/// Runs `fut` (an adapter's call) so that every request [`send`] makes for it carries the
/// scope's `traceparent` (and `tracestate` when there is one) and its answer is held to the
/// scope's answer memory.
pub async fn scoped<F: Future>(scope: Scope, fut: F) -> F::Output {
    SCOPE.scope(scope, fut).await
}

/// Sees an answer's body as it arrives, for a caller that acts before the whole of it is read
/// (a stream's partial images relayed live). The answer is still read whole and returned by
/// [`send_observed`].
pub trait BodyObserver: Send {
    /// The answer's status and headers, before any of its body: whether [`chunk`](Self::chunk)
    /// wants the body's pieces.
    fn head(&mut self, status: StatusCode, headers: &http::HeaderMap) -> bool;
    /// The next piece of the body, in order, as it came off the connection.
    fn chunk(&mut self, data: &[u8]);
}

/// Sends `req` to `endpoint` (the request's own URI is replaced) and reads the whole answer,
/// up to `max_body` bytes. Inside [`scoped`] the request carries that `traceparent` and the
/// answer counts against that memory.
pub async fn send(endpoint: &Endpoint, req: Request<ChunkedBody>, max_body: usize) -> Result<Answer, UpstreamError> {
    send_observed(endpoint, req, max_body, None).await
}

/// [`send`], with `observer` shown the body piece by piece as it arrives (when its
/// [`BodyObserver::head`] asks for it). Errors as [`send`]; a body over `max_body` fails the
/// same way whether observed or not.
pub async fn send_observed(
    endpoint: &Endpoint,
    mut req: Request<ChunkedBody>,
    max_body: usize,
    mut observer: Option<&mut dyn BodyObserver>,
) -> Result<Answer, UpstreamError> {
    *req.uri_mut() = endpoint.path.clone();
    req.headers_mut().insert(header::HOST, endpoint.host_header.clone());
    // Without it any content coding is acceptable (RFC 9110, 12.5.3), and a gzip body would be
    // read as a broken answer.
    req.headers_mut().insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    let mut answered = None;
    let answer_memory = match SCOPE.try_with(|s| (s.trace.clone(), s.answer_memory, s.answered.clone())) {
        Ok((trace, max, told)) => {
            answered = told;
            if let Some(tc) = trace {
                req.headers_mut().insert(HeaderName::from_static("traceparent"), tc.traceparent);
                if let Some(state) = tc.tracestate {
                    req.headers_mut().insert(HeaderName::from_static("tracestate"), state);
                }
            }
            max
        }
        Err(_) => usize::MAX,
    };
    // A pooled connection the server has since closed is only found out by using it: the
    // request comes back unsent, and goes out once more on a fresh connection.
    for _ in 0..3 {
        let (conn, reused) = match take_idle(&endpoint.key) {
            Some(c) => (c, true),
            None => (connect(endpoint).await?, false),
        };
        let observer = observer.as_mut().map(|o| &mut **o as &mut dyn BodyObserver);
        match exchange(conn, req, max_body, answer_memory, observer, answered.as_deref()).await {
            Ok((answer, Some(conn))) => {
                put_idle(&endpoint.key, conn);
                return Ok(answer);
            }
            Ok((answer, None)) => return Ok(answer),
            Err(Exchange::Unsent(back)) if reused => req = *back,
            Err(Exchange::Unsent(_)) => {
                return Err(UpstreamError::Transport("connection closed before the request was sent".into()))
            }
            Err(Exchange::Failed(e)) => return Err(e),
        }
    }
    Err(UpstreamError::Transport("no usable connection to the upstream".into()))
}

struct Conn {
    send: http1::SendRequest<ChunkedBody>,
    driver: Pin<Box<http1::Connection<TokioIo<Stream>, ChunkedBody>>>,
    idle_since: Instant,
}

enum Exchange {
    /// The connection was unusable and the request was not sent; here it is back.
    Unsent(Box<Request<ChunkedBody>>),
    Failed(UpstreamError),
}

/// One request on one connection, polling the connection's I/O alongside. Returns the
/// connection when it can carry another request.
async fn exchange(
    conn: Conn,
    req: Request<ChunkedBody>,
    max_body: usize,
    answer_memory: usize,
    observer: Option<&mut dyn BodyObserver>,
    answered: Option<&std::sync::atomic::AtomicBool>,
) -> Result<(Answer, Option<Conn>), Exchange> {
    let Conn { mut send, mut driver, .. } = conn;
    let mut driver_done = false;
    let result = {
        let work = async {
            let resp = match send.try_send_request(req).await {
                Ok(r) => r,
                Err(mut e) => {
                    return Err(match e.take_message() {
                        Some(back) => Exchange::Unsent(Box::new(back)),
                        None => Exchange::Failed(UpstreamError::Transport(chain(e.error()))),
                    })
                }
            };
            let (parts, body) = resp.into_parts();
            let status = parts.status;
            // An event stream's 200 comes before its images are made: not told.
            let stream =
                parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            if let Some(a) = answered.filter(|_| status.is_success() && !stream) {
                a.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let retry_after = if status.is_success() {
                None
            } else {
                crate::health::retry_after(&parts.headers, std::time::SystemTime::now())
            };
            let headers = parts.headers;
            if let Some(coding) = headers
                .get(header::CONTENT_ENCODING)
                .filter(|c| status.is_success() && !c.as_bytes().eq_ignore_ascii_case(b"identity"))
            {
                let coding: String = String::from_utf8_lossy(coding.as_bytes())
                    .chars()
                    .filter(char::is_ascii_graphic)
                    .take(40)
                    .collect();
                return Err(Exchange::Failed(UpstreamError::Encoded(coding)));
            }
            let read_error = |e: &dyn std::fmt::Display| {
                Exchange::Failed(UpstreamError::Transport(format!("reading the answer: {e}")))
            };
            let wanted = match observer {
                Some(o) => o.head(status, &headers).then_some(o),
                None => None,
            };
            // The frames are kept as they came (each a slice of the connection's read buffer):
            // joining them would copy every image payload once more.
            let mut body = Limited::new(body, max_body);
            let mut pieces = Vec::new();
            let mut observer = wanted;
            let error_cap = (!status.is_success()).then_some(MAX_ERROR_BODY);
            let mut read = 0usize;
            let mut cut = false;
            let mut hold = AnswerHold { bytes: 0 };
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| read_error(&e))?;
                if let Ok(mut data) = frame.into_data() {
                    if let Some(cap) = error_cap.filter(|cap| read + data.len() > *cap) {
                        data.truncate(cap - read);
                        cut = true;
                    }
                    if !hold.grow(data.len(), answer_memory) {
                        return Err(Exchange::Failed(UpstreamError::AnswerMemoryFull(answer_memory)));
                    }
                    read += data.len();
                    if let Some(o) = observer.as_mut() {
                        o.chunk(&data);
                    }
                    pieces.push(data);
                    if cut {
                        break;
                    }
                }
            }
            let body = Rope::from(pieces);
            Ok((Answer { status, retry_after, headers, body, _hold: hold }, cut))
        };
        let mut work = std::pin::pin!(work);
        std::future::poll_fn(|cx: &mut Context<'_>| {
            // Closed or broken: the request's own future then resolves with the error.
            if !driver_done && driver.as_mut().poll(cx).is_ready() {
                driver_done = true;
            }
            work.as_mut().poll(cx)
        })
        .await
    };
    let (answer, cut) = result?;
    let reusable = !cut && !driver_done && send.is_ready();
    Ok((answer, reusable.then(|| Conn { send, driver, idle_since: Instant::now() })))
}

thread_local! {
    static IDLE: RefCell<HashMap<String, Vec<Conn>>> = RefCell::new(HashMap::new());
}

fn take_idle(key: &str) -> Option<Conn> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(key)?;
        while let Some(mut c) = list.pop() {
            if c.idle_since.elapsed() < IDLE_TIMEOUT && c.send.is_ready() && !closed(&mut c) {
                return Some(c);
            }
        }
        None
    })
}

fn put_idle(key: &str, conn: Conn) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        if !idle.contains_key(key) {
            idle.insert(key.to_string(), Vec::new());
        }
        let Some(list) = idle.get_mut(key) else { return };
        if list.len() < MAX_IDLE {
            list.push(conn);
        }
    });
}

/// Polls an idle connection once: a server that closed it (or sent garbage) is seen here.
fn closed(c: &mut Conn) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    c.driver.as_mut().poll(&mut cx).is_ready()
}

async fn connect(endpoint: &Endpoint) -> Result<Conn, UpstreamError> {
    let (host, port, tls) = (endpoint.host.as_str(), endpoint.port, endpoint.tls);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| UpstreamError::Connect(format!("connecting to {host}:{port} timed out")))?
        .map_err(|e| UpstreamError::Connect(format!("tcp connect error to {host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let stream = if tls {
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| UpstreamError::Connect(format!("invalid TLS server name {host}: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(tls_config());
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| UpstreamError::Connect(format!("TLS handshake with {host} timed out")))?
            .map_err(|e| UpstreamError::Connect(format!("TLS handshake with {host}: {e}")))?;
        Stream::Tls(Box::new(tls))
    } else {
        Stream::Plain(tcp)
    };
    let (send, driver) =
        http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(|e| UpstreamError::Connect(chain(&e)))?;
    Ok(Conn { send, driver: Box::pin(driver), idle_since: Instant::now() })
}

pub(crate) fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .with_root_certificates(rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() })
                .with_no_client_auth();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(c)
        })
        .clone()
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// A plain or TLS TCP stream.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers one request per connection and then closes it without saying so
    /// (no `Connection: close`), as servers do when their keep-alive timeout passes.
    async fn one_shot_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if !read_head(&mut s).await {
                        return;
                    }
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                });
            }
        });
        (addr, accepted)
    }

    /// Reads a request's head (through the blank line); false when the client left first.
    async fn read_head(s: &mut tokio::net::TcpStream) -> bool {
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return false;
            }
            got.extend_from_slice(&buf[..n]);
        }
        true
    }

    fn get(addr: std::net::SocketAddr) -> (Endpoint, Request<ChunkedBody>) {
        (Endpoint::parse(&format!("http://{addr}/x")).unwrap(), Request::get("/").body(ChunkedBody::default()).unwrap())
    }

    async fn fetch(addr: std::net::SocketAddr, max: usize) -> Result<Answer, UpstreamError> {
        let (e, r) = get(addr);
        send(&e, r, max).await
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced_transparently() {
        let (addr, accepted) = one_shot_server().await;
        let a = fetch(addr, 1024).await.unwrap();
        assert_eq!((a.status, &a.body.to_bytes()[..]), (StatusCode::OK, &b"ok"[..]));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b = fetch(addr, 1024).await.unwrap();
        assert_eq!(&b.body.to_bytes()[..], b"ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn keep_alive_connections_are_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"hi"),
                    )))
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc));
            }
        });
        for _ in 0..5 {
            assert_eq!(&fetch(addr, 1024).await.unwrap().body.to_bytes()[..], b"hi");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn refused_connections_and_oversized_answers_are_errors() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = fetch(format!("127.0.0.1:{port}").parse().unwrap(), 1024).await.err().unwrap();
        assert!(matches!(e, UpstreamError::Connect(_)), "{e}");
        let (addr, _) = one_shot_server().await;
        let e = fetch(addr, 1).await.err().unwrap();
        assert!(matches!(e, UpstreamError::Transport(_)), "{e}");
    }

    /// A server that answers every request with `head` and then `pieces`, each written on its
    /// own after a pause (so they come off the connection as separate frames).
    async fn piecewise_server(head: String, pieces: Vec<Vec<u8>>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            if !read_head(&mut s).await {
                return;
            }
            let _ = s.write_all(head.as_bytes()).await;
            for p in pieces {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if s.write_all(&p).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_body_in_many_pieces_is_read_whole_in_order() {
        let parts: Vec<Vec<u8>> = (0..5u8).map(|i| vec![b'a' + i; 70_000]).collect();
        let whole: Vec<u8> = parts.concat();
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", whole.len());
        let a = fetch(piecewise_server(head, parts.clone()).await, 1 << 20).await.unwrap();
        assert_eq!(a.body.len(), whole.len());
        assert!(a.body == whole[..], "the pieces, in order");
        // Chunked transfer encoding: no length known up front.
        let chunked: Vec<Vec<u8>> = parts
            .iter()
            .map(|p| [format!("{:x}\r\n", p.len()).into_bytes(), p.clone(), b"\r\n".to_vec()].concat())
            .chain([b"0\r\n\r\n".to_vec()])
            .collect();
        let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_string();
        let a = fetch(piecewise_server(head.clone(), chunked.clone()).await, 1 << 20).await.unwrap();
        assert!(a.body == whole[..], "the chunks, in order");
        // Over the limit part-way: an error, not a truncated body.
        let e = fetch(piecewise_server(head, chunked).await, 200_000).await.err().unwrap();
        assert!(matches!(&e, UpstreamError::Transport(m) if m.contains("reading the answer")), "{e}");
    }
}
