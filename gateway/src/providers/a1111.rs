//! Placeholder while the adapter is written: every attempt is refused as unsupported.

use async_trait::async_trait;

use super::{AttemptRequest, Generation, Provider, ProviderError};
use crate::policy::Connection;

pub struct A1111;

impl A1111 {
    pub fn new(_c: &Connection) -> Self {
        A1111
    }
}

#[async_trait]
impl Provider for A1111 {
    async fn generate(&self, _attempt: &AttemptRequest<'_>) -> Result<Generation, ProviderError> {
        Err(ProviderError::Unsupported("adapter not built yet".into()))
    }
}
