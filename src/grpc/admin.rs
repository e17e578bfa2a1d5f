//! `tokend.v1.AdminService`: apps, merchants, API clients, token state, the
//! audit trail and configuration reloads, for callers with the `admin` scope
//! (reloads also for `config.reload`). Accepts secrets, never returns one (a
//! new client's key is shown once, on creation). Every change is audited with
//! the client that made it.

use tonic::{Request, Response, Status};

use super::{caller, status};
use crate::access::Scope;
use crate::audit::{AuditAction, AuditLog};
use crate::clock::SharedClock;
use crate::domain::{AccountId, ClientKey, ClientSecret};
use crate::proto::tokend::v1::admin_service_server::AdminService;
use crate::proto::tokend::v1::*;
use crate::registry::Registry;
use crate::reload::Reloader;
use crate::token::TokenManager;

pub(crate) struct AdminGrpc {
    pub(crate) registry: Registry,
    pub(crate) tokens: TokenManager,
    pub(crate) clock: SharedClock,
    pub(crate) audit: AuditLog,
    pub(crate) reloader: Reloader,
}

fn client_key(value: &str) -> Result<ClientKey, Status> {
    ClientKey::parse(value).map_err(|error| status::invalid_argument(&error))
}

fn account_id(value: &str) -> Result<AccountId, Status> {
    AccountId::parse(value).map_err(|error| status::invalid_argument(&error))
}

/// The caller's name, once it is known to hold the admin scope.
fn admin<T>(request: &Request<T>) -> Result<String, Status> {
    let client = caller(request)?;
    client
        .require(Scope::Admin)
        .map_err(|error| status::access_status(&error))?;
    Ok(client.name.clone())
}

#[tonic::async_trait]
impl AdminService for AdminGrpc {
    async fn put_app(
        &self,
        request: Request<PutAppRequest>,
    ) -> Result<Response<PutAppResponse>, Status> {
        let operator = admin(&request)?;
        let request = request.into_inner();
        let key = client_key(&request.client_key)?;
        let secret = ClientSecret::parse(&request.client_secret)
            .map_err(|error| status::invalid_argument(&error))?;
        let created = self
            .registry
            .put_app(&key, &secret)
            .await
            .map_err(|error| status::registry_status(&error))?;
        let (action, reason) = if created {
            (AuditAction::AppAdded, "app added")
        } else {
            (AuditAction::AppSecretReplaced, "secret replaced")
        };
        self.audit
            .record_change(&operator, action, Some(&key), reason);
        Ok(Response::new(PutAppResponse { created }))
    }

    async fn remove_app(
        &self,
        request: Request<RemoveAppRequest>,
    ) -> Result<Response<RemoveAppResponse>, Status> {
        let operator = admin(&request)?;
        let request = request.into_inner();
        let key = client_key(&request.client_key)?;
        let merchants_removed = self
            .registry
            .remove_app(&key, request.cascade)
            .await
            .map_err(|error| status::registry_status(&error))?;
        self.audit.record_change(
            &operator,
            AuditAction::AppRemoved,
            Some(&key),
            &format!("app removed with {merchants_removed} merchant(s)"),
        );
        Ok(Response::new(RemoveAppResponse { merchants_removed }))
    }

    async fn list_apps(
        &self,
        request: Request<ListAppsRequest>,
    ) -> Result<Response<ListAppsResponse>, Status> {
        admin(&request)?;
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
        let operator = admin(&request)?;
        let request = request.into_inner();
        let account = account_id(&request.account_id)?;
        let key = client_key(&request.client_key)?;
        let created = self
            .registry
            .put_merchant(&account, &key)
            .await
            .map_err(|error| status::registry_status(&error))?;
        let action = if created {
            AuditAction::MerchantAdded
        } else {
            AuditAction::MerchantMoved
        };
        self.audit.record_change(
            &operator,
            action,
            Some(&key),
            &format!("merchant {account}"),
        );
        Ok(Response::new(PutMerchantResponse { created }))
    }

    async fn remove_merchant(
        &self,
        request: Request<RemoveMerchantRequest>,
    ) -> Result<Response<RemoveMerchantResponse>, Status> {
        let operator = admin(&request)?;
        let account = account_id(&request.into_inner().account_id)?;
        let served_by = self
            .registry
            .remove_merchant(&account)
            .await
            .map_err(|error| status::registry_status(&error))?;
        self.audit.record_change(
            &operator,
            AuditAction::MerchantRemoved,
            Some(&served_by),
            &format!("merchant {account}"),
        );
        Ok(Response::new(RemoveMerchantResponse {}))
    }

    async fn list_merchants(
        &self,
        request: Request<ListMerchantsRequest>,
    ) -> Result<Response<ListMerchantsResponse>, Status> {
        admin(&request)?;
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
        request: Request<ListTokenStatusRequest>,
    ) -> Result<Response<ListTokenStatusResponse>, Status> {
        admin(&request)?;
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
        let operator = admin(&request)?;
        let key = client_key(&request.into_inner().client_key)?;
        let refreshed = self.tokens.force_refresh(&key).await;
        let outcome = if refreshed.is_ok() {
            "refreshed"
        } else {
            "failed"
        };
        self.audit.record(
            &operator,
            AuditAction::ForcedRefresh,
            &key,
            outcome,
            refreshed.as_ref().ok().map(|lease| &lease.access_token),
        );
        let lease = refreshed.map_err(|error| status::token_status(&error))?;
        Ok(Response::new(RefreshTokenResponse {
            generation: lease.generation,
            expires_at_unix_ms: lease.expires_at_ms,
        }))
    }

    async fn create_client(
        &self,
        request: Request<CreateClientRequest>,
    ) -> Result<Response<CreateClientResponse>, Status> {
        let operator = admin(&request)?;
        let request = request.into_inner();
        let api_key = self
            .registry
            .create_client(
                &request.name,
                &request.scopes,
                &request.apps,
                &request.merchants,
            )
            .await
            .map_err(|error| status::registry_status(&error))?;
        self.audit.record_change(
            &operator,
            AuditAction::ClientCreated,
            None,
            &format!(
                "client {:?} with scopes {}",
                request.name.trim(),
                request.scopes.join(",")
            ),
        );
        Ok(Response::new(CreateClientResponse { api_key }))
    }

    async fn remove_client(
        &self,
        request: Request<RemoveClientRequest>,
    ) -> Result<Response<RemoveClientResponse>, Status> {
        let operator = admin(&request)?;
        let name = request.into_inner().name;
        self.registry
            .remove_client(&name)
            .await
            .map_err(|error| status::registry_status(&error))?;
        self.audit.record_change(
            &operator,
            AuditAction::ClientRemoved,
            None,
            &format!("client {name:?}"),
        );
        Ok(Response::new(RemoveClientResponse {}))
    }

    async fn list_clients(
        &self,
        request: Request<ListClientsRequest>,
    ) -> Result<Response<ListClientsResponse>, Status> {
        admin(&request)?;
        let clients = self
            .registry
            .list_clients()
            .await
            .map_err(|error| status::registry_status(&error))?;
        Ok(Response::new(ListClientsResponse {
            clients: clients
                .into_iter()
                .map(|client| ClientInfo {
                    name: client.name,
                    scopes: client.scopes,
                    apps: client.apps.unwrap_or_default(),
                    merchants: client.merchants.unwrap_or_default(),
                    source: client.source.as_str().to_owned(),
                })
                .collect(),
        }))
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        admin(&request)?;
        let request = request.into_inner();
        let limit = match request.limit {
            0 => 100,
            limit => i64::from(limit.clamp(1, 10_000)),
        };
        let records = self
            .audit
            .list(request.since_unix_ms, limit)
            .await
            .map_err(|error| {
                tracing::error!(%error, "cannot read the audit trail");
                Status::internal("the daemon's database failed; see its log")
            })?;
        Ok(Response::new(ListAuditResponse {
            entries: records
                .into_iter()
                .map(|record| AuditEntry {
                    at_unix_ms: record.at_ms,
                    client: record.client,
                    action: record.action,
                    app: record.app,
                    reason: record.reason,
                    token_fingerprint: record.token_fingerprint,
                    count: record.count,
                })
                .collect(),
        }))
    }

    async fn reload_config(
        &self,
        request: Request<ReloadConfigRequest>,
    ) -> Result<Response<ReloadConfigResponse>, Status> {
        let client = caller(&request)?;
        // `config.reload` is the narrow scope the daemon's own reload key
        // holds; an admin may reload too.
        if client.require(Scope::Admin).is_err() {
            client
                .require(Scope::ConfigReload)
                .map_err(|error| status::access_status(&error))?;
        }
        let outcome = self
            .reloader
            .reload(&client.name)
            .await
            .map_err(|reason| status::reload_failed(&reason))?;
        Ok(Response::new(outcome.response()))
    }
}
