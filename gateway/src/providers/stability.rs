//! Placeholder while the adapter is written: every attempt is refused as unsupported.

use async_trait::async_trait;

use super::{AttemptRequest, Generation, Provider, ProviderError};
use crate::policy::Connection;

pub struct Stability;

impl Stability {
    pub fn new(_c: &Connection) -> Self {
        Stability
    }
}

#[async_trait]
impl Provider for Stability {
    async fn generate(&self, _attempt: &AttemptRequest<'_>) -> Result<Generation, ProviderError> {
        Err(ProviderError::Unsupported("adapter not built yet".into()))
    }
}
