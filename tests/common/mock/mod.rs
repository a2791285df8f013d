//! The mock-provider kit: one in-process HTTP/1.1 server on 127.0.0.1:0 for every provider kind.
//!
//! A [`Mock`] owns the scaffolding every provider test needs: it captures each request (method,
//! path, query, headers, body), checks a credential header, counts generation calls (`hits`, on
//! arrival), per-endpoint calls, calls in flight and calls cancelled by the other side, and lets a
//! test change, while it runs, how generation calls are answered: status, exact body, chosen
//! images, extra headers, latency, transport faults (reset, stall mid-body) and a script of
//! per-hit [`Step`]s.
//!
//! What differs between providers is a [`Shape`]: how a request is routed to an endpoint of the
//! provider's documented API, how a success or an error is answered, and any state the API keeps
//! (job state machines, seeds, loaded checkpoints). One small shape per provider kind lives next
//! to this file.

pub mod a1111;
pub mod azure;
pub mod fal;
pub mod openai;
pub mod replicate;
pub mod stability;
pub mod vertex;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use super::{parse_form, FormPart};

pub use openai::OpenAiImages;

/// The OpenAI-compatible mock most tests use (`kind = "openai"`).
pub type MockProvider = Mock<OpenAiImages>;

// ---------------------------------------------------------------------------------------------
// What the mock saw
// ---------------------------------------------------------------------------------------------

/// One request the mock received.
#[derive(Clone, Debug)]
pub struct Captured {
    pub method: String,
    pub path: String,
    /// The query string without `?` (`None` when the URI has none).
    pub query: Option<String>,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// The shape's name of the endpoint it was routed to (`None`: not an endpoint of the API).
    pub endpoint: Option<&'static str>,
    /// Routed to a generation endpoint (counted in `hits`).
    pub generation: bool,
    /// Refused by the mock's credential check (answered by [`Shape::unauthorized`]).
    pub rejected: bool,
    /// Its place among every request the mock received (from 0), fixed when it was recorded.
    pub seq: usize,
}

impl Captured {
    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("{} {}: body is not JSON ({e}): {}", self.method, self.path, String::from_utf8_lossy(&self.body))
        })
    }

    /// A header as text (`None` when absent).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap_or("").to_string())
    }

    /// The multipart form of this request (panics if it is not one).
    pub async fn form(&self) -> Vec<FormPart> {
        let ct =
            self.header("content-type").unwrap_or_else(|| panic!("{} {}: no content-type", self.method, self.path));
        assert!(
            ct.starts_with("multipart/form-data"),
            "{} {}: content-type {ct:?} is not multipart/form-data",
            self.method,
            self.path
        );
        parse_form(&ct, self.body.clone()).await.unwrap_or_else(|e| panic!("{} {}: {e}", self.method, self.path))
    }

    /// `form()` when the request is multipart, `None` otherwise (or when it does not parse).
    pub async fn try_form(&self) -> Option<Vec<FormPart>> {
        let ct = self.header("content-type")?;
        parse_form(&ct, self.body.clone()).await.ok()
    }
}

// ---------------------------------------------------------------------------------------------
// How to answer
// ---------------------------------------------------------------------------------------------

/// One answer: status, content type, extra headers, body.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Reply {
    /// `status` with this JSON body.
    pub fn json(status: u16, body: &Value) -> Reply {
        Reply::raw(status, "application/json", body.to_string())
    }

    /// `status` with this body as it is.
    pub fn raw(status: u16, content_type: &str, body: impl Into<Bytes>) -> Reply {
        Reply { status, content_type: content_type.to_string(), headers: Vec::new(), body: body.into() }
    }

    /// The same answer with another content type.
    pub fn with_type(mut self, content_type: &str) -> Reply {
        self.content_type = content_type.to_string();
        self
    }

    /// The same answer with one more header.
    pub fn header(mut self, name: &str, value: impl ToString) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    fn into_response(self, extra: &[(String, String)]) -> axum::response::Response {
        let mut b = axum::response::Response::builder().status(self.status);
        if !self.content_type.is_empty() {
            b = b.header("content-type", self.content_type.as_str());
        }
        for (k, v) in self.headers.iter().chain(extra) {
            b = b.header(k.as_str(), v.as_str());
        }
        b.body(axum::body::Body::from(self.body)).unwrap()
    }
}

/// A transport-level misbehaviour of the mock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Answer normally.
    #[default]
    None,
    /// Read the request (after the configured latency), then close the connection without
    /// answering anything.
    Reset,
    /// Send 200, the headers and the first half of the normal body, then never finish it (the
    /// connection stays open until the other side gives up).
    StallMidBody,
    /// Send 200, the headers and the first half of the normal body, then (200 ms later) cut the
    /// connection.
    CutMidBody,
    /// An event stream: send everything before the first `*.completed` event at once, then wait
    /// for [`Mock::release_stream`] before sending the rest (the gateway's client can be seen
    /// receiving partial images while the provider has not finished).
    GatedStream,
    /// As `GatedStream`, but once released the connection is cut instead of finishing.
    GatedStreamCut,
}

/// How the mock answers one generation call; `None` fields keep the configured default.
#[derive(Clone, Debug, Default)]
pub struct Step {
    pub status: Option<u16>,
    pub latency: Option<Duration>,
    pub fault: Option<Fault>,
    /// The exact body (for a 200 or an error status alike).
    pub body: Option<String>,
    /// Extra headers on this answer, after the configured ones.
    pub headers: Vec<(String, String)>,
}

impl Step {
    pub fn new() -> Step {
        Step::default()
    }

    /// A plain success, whatever the configured default is.
    pub fn ok() -> Step {
        Step::new().status(200).fault(Fault::None).latency(Duration::ZERO)
    }

    /// `status` with exactly this body (e.g. a `serde_json::Value` or a `&str`).
    pub fn reply(status: u16, body: impl ToString) -> Step {
        Step::new().status(status).body(&body.to_string())
    }

    pub fn status(mut self, status: u16) -> Step {
        self.status = Some(status);
        self
    }

    pub fn latency(mut self, latency: Duration) -> Step {
        self.latency = Some(latency);
        self
    }

    pub fn fault(mut self, fault: Fault) -> Step {
        self.fault = Some(fault);
        self
    }

    pub fn body(mut self, body: &str) -> Step {
        self.body = Some(body.to_string());
        self
    }

    pub fn header(mut self, name: &str, value: impl ToString) -> Step {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

/// A shape's error answer as a step of a script (its body text, status and headers).
impl From<Reply> for Step {
    fn from(r: Reply) -> Step {
        let mut s = Step::reply(r.status, String::from_utf8_lossy(&r.body));
        s.headers = r.headers;
        s
    }
}

#[derive(Clone, Debug)]
struct Config {
    status: u16,
    error_body: Option<String>,
    latency: Duration,
    body_override: Option<String>,
    fault: Fault,
    headers: Vec<(String, String)>,
    images: Option<Vec<Vec<u8>>>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            status: 200,
            error_body: None,
            latency: Duration::ZERO,
            body_override: None,
            fault: Fault::None,
            headers: Vec::new(),
            images: None,
        }
    }
}

impl Config {
    fn apply(&mut self, step: Step) {
        if let Some(s) = step.status {
            self.status = s;
            self.error_body = None;
            self.body_override = None;
        }
        if let Some(l) = step.latency {
            self.latency = l;
        }
        if let Some(f) = step.fault {
            self.fault = f;
        }
        if let Some(b) = step.body {
            self.error_body = Some(b.clone());
            self.body_override = Some(b);
        }
        self.headers.extend(step.headers);
    }
}

// ---------------------------------------------------------------------------------------------
// Shapes
// ---------------------------------------------------------------------------------------------

/// An endpoint of a provider's API, as a shape routes a request to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// A name for counting and filtering (`Mock::count`, `Mock::calls_to`).
    pub name: &'static str,
    /// A generation call: counted in `hits`, answered as the mock is told (status, body, images,
    /// latency, faults, script), and by [`Shape::generate`] otherwise.
    pub generation: bool,
    /// Subject to the mock's credential check.
    pub authenticated: bool,
}

impl Endpoint {
    /// A generation endpoint (credential checked).
    pub fn generation(name: &'static str) -> Endpoint {
        Endpoint { name, generation: true, authenticated: true }
    }

    /// Another endpoint of the API (job status, result, cancel), answered by [`Shape::serve`]
    /// (credential checked).
    pub fn other(name: &'static str) -> Endpoint {
        Endpoint { name, generation: false, authenticated: true }
    }

    /// The same endpoint without a credential check (e.g. signed file URLs).
    pub fn open(mut self) -> Endpoint {
        self.authenticated = false;
        self
    }
}

/// What a shape gets to answer a call with.
pub struct Call<'a> {
    /// The request being answered.
    pub req: &'a Captured,
    /// Where the mock listens (for the URLs it hands out).
    pub addr: SocketAddr,
    png: &'a [u8],
    images: Option<Vec<Vec<u8>>>,
    requests: &'a Mutex<Vec<Captured>>,
}

impl Call<'_> {
    /// The image the mock draws.
    pub fn png(&self) -> &[u8] {
        self.png
    }

    /// The images of a success: the chosen ones (`Mock::set_images`) as they are, else `n`
    /// copies of the mock's image.
    pub fn images(&self, n: usize) -> Vec<Vec<u8>> {
        self.images.clone().unwrap_or_else(|| vec![self.png.to_vec(); n])
    }

    /// The requests routed to `endpoint` so far (this one included), not refused by the
    /// credential check.
    pub fn accepted_calls_to(&self, endpoint: &str) -> Vec<Captured> {
        let all = self.requests.lock().unwrap();
        all.iter().filter(|c| c.endpoint == Some(endpoint) && !c.rejected).cloned().collect()
    }

    /// Which accepted request to `endpoint` this one is (from 1), counting only those recorded
    /// before it: unlike `accepted_calls_to(..).len()`, two requests served at once never get
    /// the same number.
    pub fn ordinal(&self, endpoint: &str) -> usize {
        let all = self.requests.lock().unwrap();
        all.iter().filter(|c| c.seq <= self.req.seq && c.endpoint == Some(endpoint) && !c.rejected).count()
    }
}

/// A file the mock hosts at /files/{name}, for shapes whose answers name image URLs: `redirect`
/// sends to `redirect_to` on localhost (loopback under another name, where a gateway must not
/// go); any other name is `image(name)` as image/png.
pub fn hosted_file(call: &Call<'_>, redirect_to: &str, image: impl Fn(&str) -> Vec<u8>) -> Reply {
    let name = call.req.path.strip_prefix("/files/").unwrap_or_default();
    if name == "redirect" {
        return Reply::raw(302, "", "")
            .header("location", format!("http://localhost:{}{redirect_to}", call.addr.port()));
    }
    Reply::raw(200, "image/png", image(name))
}

/// One provider kind's API: routing, answers and API state. The kit does the rest.
#[async_trait::async_trait]
pub trait Shape: Send + Sync + 'static {
    /// The path of the provider's base URL (e.g. `/v1`, or `` for a bare host).
    fn base_path(&self) -> &'static str {
        ""
    }

    /// The endpoint `req` is (`None`: the API has no such endpoint).
    fn route(&self, req: &Captured) -> Option<Endpoint>;

    /// The normal answer to a generation call, when the mock is not told otherwise.
    async fn generate(&self, call: Call<'_>) -> Reply;

    /// The answer of a non-generation endpoint.
    async fn serve(&self, _endpoint: &'static str, call: Call<'_>) -> Reply {
        self.not_found(call.req)
    }

    /// The API's error answer for `status` when the mock is told to fail without a body.
    fn error(&self, status: u16) -> Reply;

    /// The API's answer to a request that is none of its endpoints.
    fn not_found(&self, _req: &Captured) -> Reply {
        self.error(404)
    }

    /// The API's answer to a missing or wrong credential.
    fn unauthorized(&self) -> Reply {
        self.error(401)
    }

    /// The content type of bodies a test sets (`set_error`, `set_body`, `Step::body`).
    fn content_type(&self) -> &'static str {
        "application/json"
    }
}

/// The job state machine of a queue-style API (fal, Replicate): every job goes through the same
/// list of states, one per poll; the last one repeats.
pub struct Jobs<T> {
    states: Mutex<Vec<T>>,
    /// Polls so far, per job id.
    polls: Mutex<std::collections::HashMap<String, usize>>,
}

impl<T: Clone> Jobs<T> {
    pub fn new(states: Vec<T>) -> Jobs<T> {
        Jobs { states: Mutex::new(states), polls: Mutex::default() }
    }

    /// The states every job goes through from now on.
    pub fn set_states(&self, states: Vec<T>) {
        *self.states.lock().unwrap() = states;
    }

    /// Counts a poll of job `id` and returns the state it sees.
    pub fn poll(&self, id: &str) -> T {
        let n = {
            let mut polls = self.polls.lock().unwrap();
            let n = polls.entry(id.to_string()).or_insert(0);
            *n += 1;
            *n
        };
        let states = self.states.lock().unwrap();
        states[(n - 1).min(states.len() - 1)].clone()
    }
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// The header a credential goes in and the values accepted.
#[derive(Clone, Debug)]
struct Credential {
    header: String,
    accepted: Vec<String>,
}

struct Inner<S> {
    shape: S,
    addr: SocketAddr,
    config: Mutex<Config>,
    script: Mutex<VecDeque<Step>>,
    credential: Mutex<Option<Credential>>,
    hits: AtomicUsize,
    cancelled: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    requests: Mutex<Vec<Captured>>,
    png: Vec<u8>,
    /// Permits for `Fault::GatedStream` answers to finish.
    stream_gate: Arc<tokio::sync::Semaphore>,
}

/// A running mock provider of shape `S` on 127.0.0.1:PORT (HTTP/1.1); its behaviour can be
/// changed while it runs. Cheap to clone (one server).
pub struct Mock<S: Shape = OpenAiImages> {
    inner: Arc<Inner<S>>,
    pub addr: SocketAddr,
}

impl<S: Shape> Clone for Mock<S> {
    fn clone(&self) -> Self {
        Mock { inner: self.inner.clone(), addr: self.addr }
    }
}

/// Settings a mock starts with; each has a setter on the running [`Mock`] too.
pub struct MockBuilder<S: Shape> {
    shape: S,
    png: Vec<u8>,
    config: Config,
    script: Vec<Step>,
    credential: Option<Credential>,
}

impl<S: Shape> MockBuilder<S> {
    /// The image the mock draws (default: a 4x4 PNG).
    pub fn png(mut self, png: Vec<u8>) -> Self {
        self.png = png;
        self
    }

    /// Answer generation calls with exactly these images, whatever was asked.
    pub fn images(mut self, images: Vec<Vec<u8>>) -> Self {
        self.config.images = Some(images);
        self
    }

    /// Answer generation calls with `status` and the API's error body (200 = succeed).
    pub fn status(mut self, status: u16) -> Self {
        self.config.status = status;
        self
    }

    /// Wait this long before answering a generation call.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.config.latency = latency;
        self
    }

    /// Misbehave at the transport level on every generation call.
    pub fn fault(mut self, fault: Fault) -> Self {
        self.config.fault = fault;
        self
    }

    /// One more header on every generation answer.
    pub fn header(mut self, name: &str, value: impl ToString) -> Self {
        self.config.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Behaviours for the first generation calls, one per hit.
    pub fn script(mut self, steps: Vec<Step>) -> Self {
        self.script = steps;
        self
    }

    /// Refuse (with [`Shape::unauthorized`]) every request to an authenticated endpoint whose
    /// `header` is not one of `accepted`.
    pub fn credential<T: ToString>(mut self, header: &str, accepted: impl IntoIterator<Item = T>) -> Self {
        let accepted = accepted.into_iter().map(|t| t.to_string()).collect();
        self.credential = Some(Credential { header: header.to_string(), accepted });
        self
    }

    pub async fn start(self) -> Mock<S> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            shape: self.shape,
            addr,
            config: Mutex::new(self.config),
            script: Mutex::new(self.script.into()),
            credential: Mutex::new(self.credential),
            hits: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            png: self.png,
            stream_gate: Arc::new(tokio::sync::Semaphore::new(0)),
        });
        let state = inner.clone();
        // Our own accept loop (rather than axum::serve) so that a handler can make the
        // connection close without an answer (Fault::Reset): hyper drops the connection when the
        // service fails.
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(_) => {
                        // Out of file descriptors or similar: retry rather than spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move { handle(state, req.map(axum::body::Body::new)).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Mock { inner, addr }
    }
}

impl Mock<OpenAiImages> {
    /// An OpenAI Images API (see [`OpenAiImages`]) that succeeds with a 4x4 PNG.
    pub async fn start() -> Mock<OpenAiImages> {
        Mock::builder(OpenAiImages).start().await
    }
}

impl<S: Shape> Mock<S> {
    /// A mock of `shape`, to be configured and started.
    pub fn builder(shape: S) -> MockBuilder<S> {
        MockBuilder {
            shape,
            png: super::make_png(4, 4, [200, 40, 90]),
            config: Config::default(),
            script: Vec::new(),
            credential: None,
        }
    }

    /// The shape, for its own state and settings.
    pub fn shape(&self) -> &S {
        &self.inner.shape
    }

    /// `http://127.0.0.1:PORT` and the shape's base path (e.g. `/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}{}", self.addr, self.inner.shape.base_path())
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The image the mock draws when it succeeds.
    pub fn png(&self) -> &[u8] {
        &self.inner.png
    }

    // --- counters -------------------------------------------------------------------------

    /// Generation calls received (counted on arrival, refused credentials included).
    pub fn hits(&self) -> usize {
        self.inner.hits.load(Ordering::SeqCst)
    }

    /// Requests routed to `endpoint` (refused credentials included).
    pub fn count(&self, endpoint: &str) -> usize {
        self.inner.requests.lock().unwrap().iter().filter(|c| c.endpoint == Some(endpoint)).count()
    }

    /// Generation calls whose handler was dropped before it answered: the other side closed
    /// the connection while the mock was still waiting out its latency.
    pub fn cancelled(&self) -> usize {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Generation calls being handled right now (waiting out their latency).
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// The highest `in_flight` seen so far.
    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight.load(Ordering::SeqCst)
    }

    // --- behaviour --------------------------------------------------------------------------

    /// Answer every generation call with `status` and the API's error body (200 = succeed).
    pub fn set_status(&self, status: u16) {
        let mut c = self.inner.config.lock().unwrap();
        c.status = status;
        c.error_body = None;
    }

    /// Answer with `status` and exactly this body.
    pub fn set_error(&self, status: u16, body: &str) {
        let mut c = self.inner.config.lock().unwrap();
        c.status = status;
        c.error_body = Some(body.to_string());
    }

    /// Wait this long before answering.
    pub fn set_latency(&self, latency: Duration) {
        self.inner.config.lock().unwrap().latency = latency;
    }

    /// Lets one `Fault::GatedStream` answer (waiting or to come) finish.
    pub fn release_stream(&self) {
        self.inner.stream_gate.add_permits(1);
    }

    /// Misbehave at the transport level on every generation call (`Fault::None` = stop).
    pub fn set_fault(&self, fault: Fault) {
        self.inner.config.lock().unwrap().fault = fault;
    }

    /// Extra headers on every generation answer, e.g. `("retry-after", "2")` with
    /// `set_status(429)` (an empty list = none).
    pub fn set_headers(&self, headers: Vec<(String, String)>) {
        self.inner.config.lock().unwrap().headers = headers;
    }

    /// Behaviours for the next generation calls, one consumed per hit, in order; after the
    /// last one the configured default applies again. Replaces any script not yet consumed.
    pub fn script<T: Into<Step>>(&self, steps: Vec<T>) {
        *self.inner.script.lock().unwrap() = steps.into_iter().map(Into::into).collect();
    }

    /// One more step at the end of the script.
    pub fn then(&self, step: impl Into<Step>) {
        self.inner.script.lock().unwrap().push_back(step.into());
    }

    /// Answer every generation call with exactly these images (`None` = the mock's own image,
    /// as many as asked).
    pub fn set_images(&self, images: Option<Vec<Vec<u8>>>) {
        self.inner.config.lock().unwrap().images = images;
    }

    /// Answer every generation call with this one image, whatever `n` was asked.
    pub fn answer_with(&self, image: &[u8]) {
        self.set_images(Some(vec![image.to_vec()]));
    }

    /// Answer 200 with exactly this body instead of the normal one (None = back to normal).
    pub fn set_body(&self, body: Option<&str>) {
        self.inner.config.lock().unwrap().body_override = body.map(|s| s.to_string());
    }

    /// Accept only these values of the credential header from now on.
    pub fn set_credentials<T: ToString>(&self, accepted: impl IntoIterator<Item = T>) {
        let mut c = self.inner.credential.lock().unwrap();
        let c = c.as_mut().expect("the mock was built without a credential");
        c.accepted = accepted.into_iter().map(|t| t.to_string()).collect();
    }

    // --- what it saw --------------------------------------------------------------------------

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<Captured> {
        self.inner.requests.lock().unwrap().clone()
    }

    pub fn last_request(&self) -> Option<Captured> {
        self.inner.requests.lock().unwrap().last().cloned()
    }

    /// The last request (panics if none).
    pub fn last(&self) -> Captured {
        self.last_request().expect("the mock received no request")
    }

    /// The generation calls received, in order.
    pub fn calls(&self) -> Vec<Captured> {
        self.inner.requests.lock().unwrap().iter().filter(|c| c.generation).cloned().collect()
    }

    /// The last generation call (panics if none).
    pub fn last_call(&self) -> Captured {
        self.calls().pop().expect("the mock received no generation call")
    }

    /// The requests routed to `endpoint`, in order.
    pub fn calls_to(&self, endpoint: &str) -> Vec<Captured> {
        self.inner.requests.lock().unwrap().iter().filter(|c| c.endpoint == Some(endpoint)).cloned().collect()
    }

    /// The requests refused by the credential check, in order.
    pub fn rejected(&self) -> Vec<Captured> {
        self.inner.requests.lock().unwrap().iter().filter(|c| c.rejected).cloned().collect()
    }

    pub fn last_body_json(&self) -> Value {
        let r = self.last_request().expect("mock received no request");
        serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("gateway sent a non-JSON body ({e}): {}", String::from_utf8_lossy(&r.body)))
    }

    pub fn last_header(&self, name: &str) -> Option<String> {
        self.last_request().and_then(|r| r.headers.get(name).map(|v| v.to_str().unwrap_or("").to_string()))
    }
}

/// Returned by the mock's service to make hyper drop the connection without an answer.
#[derive(Debug)]
struct MockReset;

impl std::fmt::Display for MockReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mock: connection reset on purpose")
    }
}

impl std::error::Error for MockReset {}

/// Counts a generation call in flight; one dropped before `finish` was cancelled.
struct InFlightGuard<'a> {
    in_flight: &'a AtomicUsize,
    cancelled: &'a AtomicUsize,
    finished: bool,
}

impl<'a> InFlightGuard<'a> {
    fn new<S>(state: &'a Inner<S>) -> InFlightGuard<'a> {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlightGuard { in_flight: &state.in_flight, cancelled: &state.cancelled, finished: false }
    }

    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            self.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn handle<S: Shape>(
    state: Arc<Inner<S>>,
    req: axum::extract::Request,
) -> Result<axum::response::Response, MockReset> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024).await.unwrap_or_default();
    let mut seen = Captured {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
        endpoint: None,
        generation: false,
        rejected: false,
        seq: 0,
    };
    let shape = &state.shape;
    let endpoint = shape.route(&seen);
    seen.endpoint = endpoint.map(|e| e.name);
    seen.generation = endpoint.is_some_and(|e| e.generation);
    if endpoint.is_some_and(|e| e.authenticated) {
        if let Some(c) = state.credential.lock().unwrap().as_ref() {
            let given = seen.headers.get(c.header.as_str()).and_then(|v| v.to_str().ok());
            seen.rejected = !given.is_some_and(|g| c.accepted.iter().any(|a| a == g));
        }
    }
    if seen.generation {
        state.hits.fetch_add(1, Ordering::SeqCst);
    }
    {
        let mut requests = state.requests.lock().unwrap();
        seen.seq = requests.len();
        requests.push(seen.clone());
    }
    let mut cfg = state.config.lock().unwrap().clone();
    let call = |images| Call { req: &seen, addr: state.addr, png: &state.png, images, requests: &state.requests };
    let Some(endpoint) = endpoint else {
        return Ok(shape.not_found(&seen).into_response(&cfg.headers));
    };
    if seen.rejected {
        return Ok(shape.unauthorized().into_response(&[]));
    }
    if !endpoint.generation {
        return Ok(shape.serve(endpoint.name, call(None)).await.into_response(&[]));
    }
    if let Some(step) = state.script.lock().unwrap().pop_front() {
        cfg.apply(step);
    }
    let guard = InFlightGuard::new(&state);
    if !cfg.latency.is_zero() {
        tokio::time::sleep(cfg.latency).await;
    }
    guard.finish();
    match cfg.fault {
        Fault::None => {}
        Fault::Reset => return Err(MockReset),
        Fault::StallMidBody | Fault::CutMidBody => {
            let normal = shape.generate(call(cfg.images.clone())).await;
            let first = normal.body.slice(..normal.body.len() / 2);
            let cut = cfg.fault == Fault::CutMidBody;
            let stream = futures_util::StreamExt::chain(
                futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) }),
                futures_util::stream::once(async move {
                    if !cut {
                        std::future::pending::<()>().await;
                    }
                    // After the first half has gone out (an error at once would abort the
                    // answer before its head left the buffer).
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Err(std::io::Error::other("cut mid-body"))
                }),
            );
            let mut b = axum::response::Response::builder().status(200).header("content-type", normal.content_type);
            for (k, v) in normal.headers.iter().chain(&cfg.headers) {
                b = b.header(k.as_str(), v.as_str());
            }
            return Ok(b.body(axum::body::Body::from_stream(stream)).unwrap());
        }
        Fault::GatedStream | Fault::GatedStreamCut => {
            let normal = shape.generate(call(cfg.images.clone())).await;
            let split = std::str::from_utf8(&normal.body)
                .ok()
                .and_then(|t| {
                    t.find("event: image_generation.completed").or_else(|| t.find("event: image_edit.completed"))
                })
                .expect("a gated stream answers a stream request");
            let (first, rest) = (normal.body.slice(..split), normal.body.slice(split..));
            let gate = state.stream_gate.clone();
            let cut = cfg.fault == Fault::GatedStreamCut;
            let later = async move {
                gate.acquire().await.expect("gate open").forget();
                if cut {
                    Err(std::io::Error::other("mock: connection cut mid-stream"))
                } else {
                    Ok(rest)
                }
            };
            let stream = futures_util::StreamExt::chain(
                futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) }),
                futures_util::stream::once(later),
            );
            let b = axum::response::Response::builder().status(200).header("content-type", normal.content_type);
            return Ok(b.body(axum::body::Body::from_stream(stream)).unwrap());
        }
    }
    let exact = |status: u16, body: String| Reply::raw(status, shape.content_type(), body);
    let reply = if cfg.status != 200 {
        cfg.error_body.map(|b| exact(cfg.status, b)).unwrap_or_else(|| shape.error(cfg.status))
    } else if let Some(b) = cfg.body_override {
        // A body set as server-sent events goes out as an event stream.
        let events = b.starts_with("event:") || b.starts_with("data:");
        if events {
            Reply::raw(200, "text/event-stream", b)
        } else {
            exact(200, b)
        }
    } else {
        shape.generate(call(cfg.images)).await
    };
    Ok(reply.into_response(&cfg.headers))
}
