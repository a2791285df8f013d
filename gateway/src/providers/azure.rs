//! Placeholder while the adapter is written: every attempt is refused as unsupported.

use async_trait::async_trait;

use super::{AttemptRequest, Generation, Provider, ProviderError};
use crate::policy::Connection;

pub struct Azure;

impl Azure {
    pub fn new(_c: &Connection) -> Self {
        Azure
    }
}

#[async_trait]
impl Provider for Azure {
    async fn generate(&self, _attempt: &AttemptRequest<'_>) -> Result<Generation, ProviderError> {
        Err(ProviderError::Unsupported("adapter not built yet".into()))
    }
}
