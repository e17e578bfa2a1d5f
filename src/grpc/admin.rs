//! `tokend.v1.AdminService`: apps, merchants and token state for operators.
//! Accepts secrets, never returns one.

use tonic::{Request, Response, Status};

use super::status;
use crate::clock::SharedClock;
use crate::domain::{AccountId, ClientKey, ClientSecret};
use crate::proto::tokend::v1::admin_service_server::AdminService;
use crate::proto::tokend::v1::*;
use crate::registry::Registry;
use crate::token::TokenManager;

pub struct AdminGrpc {
    pub registry: Registry,
    pub tokens: TokenManager,
    pub clock: SharedClock,
}

fn client_key(value: &str) -> Result<ClientKey, Status> {
    ClientKey::parse(value).map_err(|error| status::invalid_argument(&error))
}

fn account_id(value: &str) -> Result<AccountId, Status> {
    AccountId::parse(value).map_err(|error| status::invalid_argument(&error))
}

#[tonic::async_trait]
impl AdminService for AdminGrpc {
    async fn put_app(
        &self,
        request: Request<PutAppRequest>,
    ) -> Result<Response<PutAppResponse>, Status> {
        let request = request.into_inner();
        let key = client_key(&request.client_key)?;
        let secret = ClientSecret::parse(&request.client_secret)
            .map_err(|error| status::invalid_argument(&error))?;
        let created = self
            .registry
            .put_app(&key, &secret)
            .await
            .map_err(|error| status::registry_status(&error))?;
        Ok(Response::new(PutAppResponse { created }))
    }

    async fn remove_app(
        &self,
        request: Request<RemoveAppRequest>,
    ) -> Result<Response<RemoveAppResponse>, Status> {
        let key = client_key(&request.into_inner().client_key)?;
        let merchants_removed = self
            .registry
            .remove_app(&key)
            .await
            .map_err(|error| status::registry_status(&error))?;
        Ok(Response::new(RemoveAppResponse { merchants_removed }))
    }

    async fn list_apps(
        &self,
        _request: Request<ListAppsRequest>,
    ) -> Result<Response<ListAppsResponse>, Status> {
        let apps = self
            .registry
            .list_apps()
            .await
            .map_err(|error| status::registry_status(&error))?;
        Ok(Response::new(ListAppsResponse {
            apps: apps
                .into_iter()
                .map(|app| AppInfo {
                    client_key: app.client_key.expose().to_owned(),
                    source: app.source.as_str().to_owned(),
                    merchant_count: app.merchant_count,
                })
                .collect(),
        }))
    }

    async fn put_merchant(
        &self,
        request: Request<PutMerchantRequest>,
    ) -> Result<Response<PutMerchantResponse>, Status> {
        let request = request.into_inner();
        let account = account_id(&request.account_id)?;
        let key = client_key(&request.client_key)?;
        let created = self
            .registry
            .put_merchant(&account, &key)
            .await
            .map_err(|error| status::registry_status(&error))?;
        Ok(Response::new(PutMerchantResponse { created }))
    }

    async fn remove_merchant(
        &self,
        request: Request<RemoveMerchantRequest>,
    ) -> Result<Response<RemoveMerchantResponse>, Status> {
        let account = account_id(&request.into_inner().account_id)?;
        self.registry
            .remove_merchant(&account)
            .await
            .map_err(|error| status::registry_status(&error))?;
        Ok(Response::new(RemoveMerchantResponse {}))
    }

    async fn list_merchants(
        &self,
        request: Request<ListMerchantsRequest>,
    ) -> Result<Response<ListMerchantsResponse>, Status> {
        let only_app = request.into_inner().client_key;
        let merchants = self
            .registry
            .list_merchants()
            .await
            .map_err(|error| status::registry_status(&error))?;
        Ok(Response::new(ListMerchantsResponse {
            merchants: merchants
                .into_iter()
                .filter(|merchant| only_app.is_empty() || merchant.client_key.expose() == only_app)
                .map(|merchant| MerchantInfo {
                    account_id: merchant.account_id.as_str().to_owned(),
                    client_key: merchant.client_key.expose().to_owned(),
                    source: merchant.source.as_str().to_owned(),
                })
                .collect(),
        }))
    }

    async fn list_token_status(
        &self,
        _request: Request<ListTokenStatusRequest>,
    ) -> Result<Response<ListTokenStatusResponse>, Status> {
        let now_ms = self.clock.now_unix_ms();
        let tokens = self
            .tokens
            .status()
            .into_iter()
            .map(|view| TokenStatus {
                client_key: view.client_key.expose().to_owned(),
                state: view.state.to_owned(),
                generation: view.generation,
                expires_at_unix_ms: view.expires_at_ms.unwrap_or(0),
                expires_in_seconds: view
                    .expires_at_ms
                    .map_or(0, |at| ((at - now_ms) / 1000).max(0)),
                last_refresh_unix_ms: view.fetched_at_ms.unwrap_or(0),
                refresh_at_unix_ms: view.refresh_at_ms.unwrap_or(0),
                last_error: view.last_error.unwrap_or_default(),
                last_error_unix_ms: view.last_error_at_ms.unwrap_or(0),
                consecutive_failures: i64::from(view.consecutive_failures),
            })
            .collect();
        Ok(Response::new(ListTokenStatusResponse { tokens }))
    }

    async fn refresh_token(
        &self,
        request: Request<RefreshTokenRequest>,
    ) -> Result<Response<RefreshTokenResponse>, Status> {
        let key = client_key(&request.into_inner().client_key)?;
        let lease = self
            .tokens
            .force_refresh(&key)
            .await
            .map_err(|error| status::token_status(&error))?;
        Ok(Response::new(RefreshTokenResponse {
            generation: lease.generation,
            expires_at_unix_ms: lease.expires_at_ms,
        }))
    }
}
