//! `tokend.v1.TokenService`: hands the current token to services that call
//! Douyin themselves.

use tonic::{Request, Response, Status};

use super::status;
use crate::clock::SharedClock;
use crate::domain::{AccountId, ClientKey};
use crate::proto::tokend::v1::get_access_token_request::Selector;
use crate::proto::tokend::v1::token_service_server::TokenService;
use crate::proto::tokend::v1::{GetAccessTokenRequest, GetAccessTokenResponse};
use crate::registry::Registry;
use crate::token::TokenManager;

pub struct TokenGrpc {
    pub registry: Registry,
    pub tokens: TokenManager,
    pub clock: SharedClock,
}

#[tonic::async_trait]
impl TokenService for TokenGrpc {
    async fn get_access_token(
        &self,
        request: Request<GetAccessTokenRequest>,
    ) -> Result<Response<GetAccessTokenResponse>, Status> {
        let client_key = match request.into_inner().selector {
            Some(Selector::AccountId(account_id)) => {
                let account_id = AccountId::parse(&account_id)
                    .map_err(|error| status::invalid_argument(&error))?;
                crate::telemetry::record_merchant(&account_id);
                self.registry
                    .app_for_merchant(&account_id)
                    .map_err(|error| status::registry_status(&error))?
            }
            Some(Selector::ClientKey(client_key)) => {
                ClientKey::parse(&client_key).map_err(|error| status::invalid_argument(&error))?
            }
            None => {
                return Err(Status::invalid_argument(
                    "give either account_id or client_key",
                ));
            }
        };
        crate::telemetry::record_app(&client_key);
        let lease = self
            .tokens
            .token_for_app(&client_key)
            .await
            .map_err(|error| status::token_status(&error))?;
        let now_ms = self.clock.now_unix_ms();
        Ok(Response::new(GetAccessTokenResponse {
            access_token: lease.access_token.expose().to_owned(),
            client_key: lease.client_key.expose().to_owned(),
            expires_at_unix_ms: lease.expires_at_ms,
            expires_in_seconds: (lease.expires_at_ms - now_ms) / 1000,
            generation: lease.generation,
        }))
    }
}
