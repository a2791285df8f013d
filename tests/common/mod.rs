//! Shared helpers for the end-to-end tests, by topic:
//!
//! - [`gateway`]: a running `acc` binary (`acc serve` on port 0), start-up refusals, waiting;
//! - [`policy`]: policy directories and provider TOML pointing at mocks;
//! - [`client`]: a tiny HTTP client and [`Resp`] assertions;
//! - [`form`]: `multipart/form-data` bodies, sent and parsed;
//! - [`images`]: PNG and base64 helpers;
//! - [`metrics`]: Prometheus text parsing;
//! - [`mock`]: the mock-provider kit, one server with a shape per provider kind.
//!
//! Every test binds port 0 everywhere, so tests can run in parallel. `use common::*;` brings in
//! all of it (the provider shapes stay under `common::mock::*`).
#![allow(dead_code, unused_imports)]

pub mod abstract_images;
mod client;
mod form;
mod gateway;
mod images;
mod metrics;
pub mod mock;
mod policy;

pub use client::*;
pub use form::*;
pub use gateway::*;
pub use images::*;
pub use metrics::*;
pub use mock::{Call, Captured, Endpoint, Fault, Mock, MockBuilder, MockProvider, OpenAiImages, Reply, Shape, Step};
pub use policy::*;
