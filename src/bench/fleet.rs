//! A fleet of benchmark apps and merchants: deterministic keys, secrets and
//! account ids, taught to the sandbox and written to the daemon's database
//! through the store (as AdminService would write them), so a daemon started
//! on that database serves them all without a config file entry each.

use std::time::Instant;

use crate::domain::{AccountId, ClientKey, ClientSecret};
use crate::sandbox::{DOCUMENTED_EXAMPLE, SandboxState};
use crate::store::{Source, Store, StoreError};

/// Apps `0..apps`; merchant `m` belongs to app `m % apps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fleet {
    pub apps: usize,
    pub merchants: usize,
}

/// How long the database writes took, for the report.
#[derive(Debug, Clone, Copy)]
pub struct Populated {
    pub seconds: f64,
}

impl Fleet {
    pub fn new(apps: usize, merchants: usize) -> Self {
        assert!(apps > 0, "a fleet needs at least one app");
        Self {
            apps,
            merchants: merchants.max(apps),
        }
    }

    pub fn client_key(&self, app: usize) -> String {
        format!("awbench{app:09}")
    }

    pub fn client_secret(&self, app: usize) -> String {
        format!("bench-secret-{app}")
    }

    pub fn account_id(&self, merchant: usize) -> String {
        format!("72{merchant:017}")
    }

    pub fn app_of_merchant(&self, merchant: usize) -> usize {
        merchant % self.apps
    }

    /// The first merchant of an app (every app has at least one).
    pub fn merchant_of_app(&self, app: usize) -> usize {
        app
    }

    /// Tells the sandbox every app's secret and every merchant's authorisation.
    pub fn teach_sandbox(&self, sandbox: &SandboxState) {
        for app in 0..self.apps {
            sandbox.add_app(&self.client_key(app), &self.client_secret(app));
        }
        for merchant in 0..self.merchants {
            sandbox.authorize_merchant(
                &self.account_id(merchant),
                &self.client_key(self.app_of_merchant(merchant)),
            );
        }
    }

    /// Writes every app and merchant as AdminService would (source `admin`, so
    /// a daemon's config sync leaves them alone).
    pub async fn store_in(&self, store: &Store, now_ms: i64) -> Result<Populated, StoreError> {
        let started = Instant::now();
        for app in 0..self.apps {
            store
                .apps()
                .put(
                    &parse_key(&self.client_key(app)),
                    &ClientSecret::parse(&self.client_secret(app)).expect("bench secrets parse"),
                    Source::Admin,
                    now_ms,
                )
                .await?;
        }
        for merchant in 0..self.merchants {
            store
                .merchants()
                .put(
                    &AccountId::parse(&self.account_id(merchant)).expect("bench ids parse"),
                    &parse_key(&self.client_key(self.app_of_merchant(merchant))),
                    Source::Admin,
                    now_ms,
                )
                .await?;
        }
        Ok(Populated {
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

fn parse_key(text: &str) -> ClientKey {
    ClientKey::parse(text).expect("bench keys parse")
}

/// Registers `count` order ids (`bench-order-<n>`) that answer with the
/// documented example body, so lookups carry a realistic 2 KB answer with
/// every field mapped, and distinct order ids keep coalescing out of the way.
pub fn teach_orders(sandbox: &SandboxState, count: usize) {
    let body: serde_json::Value =
        serde_json::from_str(DOCUMENTED_EXAMPLE).expect("the documented example is JSON");
    for order in 0..count {
        sandbox.put_order_response(&order_id(order), body.clone());
    }
}

pub fn order_id(order: usize) -> String {
    format!("bench-order-{order}")
}
