//! `tokend.v1.TokenService`: hands the current token to services that call
//! Douyin themselves, and takes their reports of rejected tokens.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{caller, status};
use crate::access::{ApiClient, Scope};
use crate::audit::{AuditAction, AuditLog};
use crate::clock::SharedClock;
use crate::domain::{AccountId, ClientKey};
use crate::proto::tokend::v1::token_service_server::TokenService;
use crate::proto::tokend::v1::{
    GetAccessTokenRequest, GetAccessTokenResponse, ReportInvalidTokenRequest,
    get_access_token_request, report_invalid_token_request,
};
use crate::registry::Registry;
use crate::token::{TokenLease, TokenManager};

pub(crate) struct TokenGrpc {
    pub(crate) registry: Registry,
    pub(crate) tokens: TokenManager,
    pub(crate) clock: SharedClock,
    pub(crate) audit: AuditLog,
}

/// How a caller names the app whose token it wants.
enum AppSelector {
    Merchant(String),
    App(String),
}

impl TokenGrpc {
    /// Resolves the selector to an app the caller may use.
    fn app_for(
        &self,
        client: &ApiClient,
        selector: Option<AppSelector>,
    ) -> Result<ClientKey, Status> {
        match selector {
            Some(AppSelector::Merchant(account_id)) => {
                let account_id = AccountId::parse(&account_id)
                    .map_err(|error| status::invalid_argument(&error))?;
                crate::telemetry::record_merchant(&account_id);
                let app = self
                    .registry
                    .app_for_merchant(&account_id)
                    .map_err(|error| status::registry_status(&error))?;
                client
                    .require_merchant(&account_id, &app)
                    .map_err(|error| status::access_status(&error))?;
                Ok(app)
            }
            Some(AppSelector::App(client_key)) => {
                let app = ClientKey::parse(&client_key)
                    .map_err(|error| status::invalid_argument(&error))?;
                client
                    .require_app_by_key(&app)
                    .map_err(|error| status::access_status(&error))?;
                Ok(app)
            }
            None => Err(Status::invalid_argument(
                "give either account_id or client_key",
            )),
        }
    }

    fn answer(&self, lease: TokenLease) -> GetAccessTokenResponse {
        let now_ms = self.clock.now_unix_ms();
        GetAccessTokenResponse {
            access_token: lease.access_token.expose().to_owned(),
            client_key: lease.client_key.expose().to_owned(),
            expires_at_unix_ms: lease.expires_at_ms,
            expires_in_seconds: (lease.expires_at_ms - now_ms) / 1000,
            generation: lease.generation,
        }
    }
}

#[tonic::async_trait]
impl TokenService for TokenGrpc {
    async fn get_access_token(
        &self,
        request: Request<GetAccessTokenRequest>,
    ) -> Result<Response<GetAccessTokenResponse>, Status> {
        let client: Arc<ApiClient> = caller(&request)?;
        client
            .require(Scope::TokenRead)
            .map_err(|error| status::access_status(&error))?;
        let selector = request
            .into_inner()
            .selector
            .map(|selector| match selector {
                get_access_token_request::Selector::AccountId(account_id) => {
                    AppSelector::Merchant(account_id)
                }
                get_access_token_request::Selector::ClientKey(client_key) => {
                    AppSelector::App(client_key)
                }
            });
        let app = self.app_for(&client, selector)?;
        crate::telemetry::record_app(&app);
        let lease = self
            .tokens
            .token_for_app(&app)
            .await
            .map_err(|error| status::token_status(&error))?;
        self.audit.record(
            &client.name,
            AuditAction::TokenHandout,
            &app,
            "GetAccessToken",
            Some(&lease.access_token),
        );
        Ok(Response::new(self.answer(lease)))
    }

    async fn report_invalid_token(
        &self,
        request: Request<ReportInvalidTokenRequest>,
    ) -> Result<Response<GetAccessTokenResponse>, Status> {
        let client: Arc<ApiClient> = caller(&request)?;
        client
            .require(Scope::TokenReport)
            .map_err(|error| status::access_status(&error))?;
        let request = request.into_inner();
        let selector = request.selector.map(|selector| match selector {
            report_invalid_token_request::Selector::AccountId(account_id) => {
                AppSelector::Merchant(account_id)
            }
            report_invalid_token_request::Selector::ClientKey(client_key) => {
                AppSelector::App(client_key)
            }
        });
        let app = self.app_for(&client, selector)?;
        crate::telemetry::record_app(&app);
        if request.access_token.is_empty() {
            return Err(Status::invalid_argument(
                "access_token is empty: send the token Douyin rejected",
            ));
        }
        let (lease, outcome) = self
            .tokens
            .report_invalid(&app, &request.access_token)
            .await
            .map_err(|error| status::token_status(&error))?;
        tracing::info!(client = %client.name, app = %app, outcome = outcome.as_str(), "invalid token reported");
        let reported = crate::domain::AccessToken::new(request.access_token);
        self.audit.record(
            &client.name,
            AuditAction::InvalidReport,
            &app,
            outcome.as_str(),
            Some(&reported),
        );
        Ok(Response::new(self.answer(lease)))
    }
}
