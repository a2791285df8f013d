//! Placeholder while the adapter is written: every attempt is refused as unsupported.

use async_trait::async_trait;

use super::{AttemptRequest, Generation, Provider, ProviderError};
use crate::policy::Connection;

pub struct Replicate;

impl Replicate {
    pub fn new(_c: &Connection) -> Self {
        Replicate
    }
}

#[async_trait]
impl Provider for Replicate {
    async fn generate(&self, _attempt: &AttemptRequest<'_>) -> Result<Generation, ProviderError> {
        Err(ProviderError::Unsupported("adapter not built yet".into()))
    }
}
