//! The after-sale order detail use case: find the merchant's app, take its
//! current token, ask Douyin, and when Douyin rejects the token,
//! compare-and-invalidate, refresh and retry exactly once.

use std::time::Duration;

use tokio::time::Instant;

use crate::domain::{AfterSaleQuery, ClientKey};
use crate::douyin::after_sale::{AfterSaleAnswer, LookupFailure};
use crate::douyin::{CodeClass, DouyinClient};
use crate::registry::{Registry, RegistryError};
use crate::token::{TokenError, TokenManager};

/// Everything that can stop a lookup, mapped to a gRPC status in one place (`grpc::status`).
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Upstream(#[from] LookupFailure),
}

#[derive(Clone)]
pub struct LookupService {
    registry: Registry,
    tokens: TokenManager,
    douyin: DouyinClient,
}

impl LookupService {
    pub fn new(registry: Registry, tokens: TokenManager, douyin: DouyinClient) -> Self {
        Self {
            registry,
            tokens,
            douyin,
        }
    }

    /// Looks up one order's after-sale details. `deadline`, the caller's, bounds
    /// every upstream request.
    pub async fn after_sale_order_detail(
        &self,
        query: &AfterSaleQuery,
        deadline: Option<Instant>,
    ) -> Result<AfterSaleAnswer, LookupError> {
        let client_key = self.registry.app_for_merchant(&query.account_id)?;
        crate::telemetry::record_app(&client_key);
        let lease = self.tokens.token_for_app(&client_key).await?;
        match self
            .douyin
            .get_after_sale_order_detail(&lease.access_token, query, remaining(deadline))
            .await
        {
            Err(LookupFailure::Douyin(error)) if error.class() == CodeClass::TokenRejected => {
                tracing::warn!(app = %client_key, code = error.code, logid = %error.logid, generation = lease.generation, "Douyin rejected the token; refreshing and retrying once");
                self.tokens
                    .invalidate_if_current(&client_key, lease.generation)
                    .await;
                self.retry_with_fresh_token(&client_key, query, deadline)
                    .await
            }
            other => Ok(other?),
        }
    }

    async fn retry_with_fresh_token(
        &self,
        client_key: &ClientKey,
        query: &AfterSaleQuery,
        deadline: Option<Instant>,
    ) -> Result<AfterSaleAnswer, LookupError> {
        let lease = self.tokens.token_for_app(client_key).await?;
        let answer = self
            .douyin
            .get_after_sale_order_detail(&lease.access_token, query, remaining(deadline))
            .await;
        if let Err(LookupFailure::Douyin(error)) = &answer
            && error.class() == CodeClass::TokenRejected
        {
            // Still rejected: leave the next caller a fresh fetch, do not loop.
            tracing::error!(app = %client_key, code = error.code, logid = %error.logid, "Douyin rejected a freshly refreshed token too");
            self.tokens
                .invalidate_if_current(client_key, lease.generation)
                .await;
        }
        Ok(answer?)
    }
}

/// Time left until the caller's deadline.
fn remaining(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()))
}
