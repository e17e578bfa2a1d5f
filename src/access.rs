//! Who may call the daemon: API clients with bearer keys (only their SHA-256
//! is kept), scopes, and optional app/merchant restrictions. Authentication
//! compares hashes in constant time; authorisation is one call per RPC.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;

use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::{AccountId, ClientKey};

/// What a client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Scope {
    /// GetAfterSaleOrderDetail, ListAfterSaleOrders.
    AfterSaleRead,
    /// AuditAfterSaleOrder: approving or rejecting refunds, a write.
    AfterSaleAudit,
    /// WatchAfterSaleEvents.
    AfterSaleEvents,
    /// GetAccessToken.
    TokenRead,
    /// ReportInvalidToken.
    TokenReport,
    /// AdminService.ReloadConfig alone: what `systemctl reload` needs, and
    /// nothing more (the daemon's own reload key holds only this).
    ConfigReload,
    /// AdminService.
    Admin,
}

impl Scope {
    pub(crate) const ALL: [Scope; 7] = [
        Self::AfterSaleRead,
        Self::AfterSaleAudit,
        Self::AfterSaleEvents,
        Self::TokenRead,
        Self::TokenReport,
        Self::ConfigReload,
        Self::Admin,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::AfterSaleRead => "aftersale.read",
            Self::AfterSaleAudit => "aftersale.audit",
            Self::AfterSaleEvents => "aftersale.events",
            Self::TokenRead => "token.read",
            Self::TokenReport => "token.report",
            Self::ConfigReload => "config.reload",
            Self::Admin => "admin",
        }
    }

    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|scope| scope.as_str() == text)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|scope| scope.as_str()).collect();
                format!("unknown scope {text:?}; scopes are {}", known.join(", "))
            })
    }
}

/// Read from the config file (a client's `scopes`).
impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::parse(&String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// The SHA-256 of an API key, as stored. Never the key itself.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash([u8; 32]);

impl fmt::Debug for KeyHash {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "KeyHash({}…)", &self.to_hex()[..8])
    }
}

impl KeyHash {
    pub fn of_key(api_key: &str) -> Self {
        Self(Sha256::digest(api_key.as_bytes()).into())
    }

    /// Reads 64 hex digits (surrounding white space ignored). Decoded by the
    /// `hex` crate, which checks every character, so text that is not ASCII
    /// is refused rather than sliced mid-character.
    pub(crate) fn parse_hex(text: &str) -> Result<Self, String> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| {
            "a key hash is 64 hexadecimal digits (the SHA-256 of the key)".to_owned()
        })?;
        Ok(Self(bytes))
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

/// Read from the config file (a client's `key_sha256`).
impl<'de> Deserialize<'de> for KeyHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::parse_hex(&String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// Makes a new API key: `dtk_` and 64 hex digits of randomness.
pub(crate) fn generate_api_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("dtk_{}", hex::encode(bytes))
}

/// A service allowed to call the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiClient {
    pub(crate) name: String,
    pub(crate) key_hash: KeyHash,
    pub(crate) scopes: BTreeSet<Scope>,
    /// None: every app.
    pub(crate) apps: Option<BTreeSet<ClientKey>>,
    /// None: every merchant.
    pub(crate) merchants: Option<BTreeSet<AccountId>>,
}

/// Why a client cannot be declared, whether in the config file or over
/// AdminService: the two paths share these rules so neither lets through what
/// the other refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum InvalidApiClient {
    #[error("a client name is 1 to {} characters", ApiClient::MAX_NAME_LENGTH)]
    Name,
    #[error("give at least one scope")]
    NoScope,
}

impl InvalidApiClient {
    /// The field of the declaration at fault (`name`, `scopes`), for
    /// messages that name the config key.
    pub(crate) fn field(&self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::NoScope => "scopes",
        }
    }
}

impl ApiClient {
    /// Longest name, in bytes: names show in logs, the audit trail and listings.
    pub(crate) const MAX_NAME_LENGTH: usize = 64;

    /// A client that keeps the rules every client keeps: a name of 1 to
    /// [`Self::MAX_NAME_LENGTH`] bytes (white space around it dropped) and at
    /// least one scope. The config file and AdminService both declare clients
    /// through this.
    pub(crate) fn declare(
        name: &str,
        key_hash: KeyHash,
        scopes: BTreeSet<Scope>,
        apps: Option<BTreeSet<ClientKey>>,
        merchants: Option<BTreeSet<AccountId>>,
    ) -> Result<Self, InvalidApiClient> {
        let name = name.trim();
        if name.is_empty() || name.len() > Self::MAX_NAME_LENGTH {
            return Err(InvalidApiClient::Name);
        }
        if scopes.is_empty() {
            return Err(InvalidApiClient::NoScope);
        }
        Ok(Self {
            name: name.to_owned(),
            key_hash,
            scopes,
            apps,
            merchants,
        })
    }
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AccessDenied {
    #[error(
        "no API key: send \"authorization: Bearer <key>\" (create one with `douyin-tokend client create`)"
    )]
    MissingKey,
    #[error("the API key is not known to this daemon")]
    UnknownKey,
    #[error("client {client:?} lacks the scope {scope:?} this call needs")]
    MissingScope { client: String, scope: &'static str },
    #[error("client {client:?} may not use {what}")]
    OutOfBounds { client: String, what: String },
}

impl ApiClient {
    pub(crate) fn require(&self, scope: Scope) -> Result<(), AccessDenied> {
        if self.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(AccessDenied::MissingScope {
                client: self.name.clone(),
                scope: scope.as_str(),
            })
        }
    }

    /// Whether the client may act for this merchant, served by this app.
    pub(crate) fn require_merchant(
        &self,
        account_id: &AccountId,
        client_key: &ClientKey,
    ) -> Result<(), AccessDenied> {
        self.require_merchant_within_bounds(account_id)?;
        self.require_app(client_key)
    }

    /// Whether the merchant is within the client's merchant bounds (its app aside).
    pub(crate) fn require_merchant_within_bounds(
        &self,
        account_id: &AccountId,
    ) -> Result<(), AccessDenied> {
        if self
            .merchants
            .as_ref()
            .is_some_and(|merchants| !merchants.contains(account_id))
        {
            return Err(AccessDenied::OutOfBounds {
                client: self.name.clone(),
                what: format!("merchant {account_id}"),
            });
        }
        Ok(())
    }

    /// Whether an event of this merchant, for this app, is the client's to
    /// see: the bounds of `require_merchant`, as a filter on a stream.
    pub(crate) fn may_see(&self, account_id: &AccountId, client_key: &ClientKey) -> bool {
        self.require_merchant(account_id, client_key).is_ok()
    }

    /// Whether the client may name this app directly. A client bounded to some
    /// merchants reaches apps only through them, unless its apps are listed too.
    pub(crate) fn require_app_by_key(&self, client_key: &ClientKey) -> Result<(), AccessDenied> {
        if self.merchants.is_some() && self.apps.is_none() {
            return Err(AccessDenied::OutOfBounds {
                client: self.name.clone(),
                what: "apps by client_key (it is bound to merchants: ask by account_id)".to_owned(),
            });
        }
        self.require_app(client_key)
    }

    pub(crate) fn require_app(&self, client_key: &ClientKey) -> Result<(), AccessDenied> {
        if self
            .apps
            .as_ref()
            .is_some_and(|apps| !apps.contains(client_key))
        {
            return Err(AccessDenied::OutOfBounds {
                client: self.name.clone(),
                what: client_key.to_string(),
            });
        }
        Ok(())
    }
}

/// The clients in force, swapped whole when the set changes.
#[derive(Clone, Default)]
pub(crate) struct Authenticator {
    clients: Arc<RwLock<Arc<Vec<Arc<ApiClient>>>>>,
}

impl Authenticator {
    pub(crate) fn replace(&self, clients: Vec<ApiClient>) {
        let clients = Arc::new(clients.into_iter().map(Arc::new).collect());
        *self.clients.write() = clients;
    }

    /// Finds the client holding `authorization`'s bearer key. Every stored hash
    /// is compared, in constant time, whether or not one already matched.
    pub(crate) fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> Result<Arc<ApiClient>, AccessDenied> {
        let presented = authorization
            .and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .ok_or(AccessDenied::MissingKey)?;
        let presented = KeyHash::of_key(presented);
        let clients = Arc::clone(&self.clients.read());
        let mut found = None;
        for client in clients.iter() {
            if bool::from(client.key_hash.0.ct_eq(&presented.0)) {
                found = Some(Arc::clone(client));
            }
        }
        found.ok_or(AccessDenied::UnknownKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, key: &str, scopes: &[Scope]) -> ApiClient {
        ApiClient {
            name: name.to_owned(),
            key_hash: KeyHash::of_key(key),
            scopes: scopes.iter().copied().collect(),
            apps: None,
            merchants: None,
        }
    }

    #[test]
    fn bearer_keys_find_their_client_and_nothing_else() {
        let authenticator = Authenticator::default();
        authenticator.replace(vec![
            client("a", "key-a", &[Scope::TokenRead]),
            client("b", "key-b", &[Scope::Admin]),
        ]);
        assert_eq!(
            authenticator
                .authenticate(Some("Bearer key-b"))
                .unwrap()
                .name,
            "b"
        );
        assert_eq!(
            authenticator
                .authenticate(Some("Bearer key-c"))
                .unwrap_err(),
            AccessDenied::UnknownKey
        );
        assert_eq!(
            authenticator.authenticate(Some("key-a")).unwrap_err(),
            AccessDenied::MissingKey
        );
        assert_eq!(
            authenticator.authenticate(None).unwrap_err(),
            AccessDenied::MissingKey
        );
        let a = authenticator.authenticate(Some("Bearer key-a")).unwrap();
        assert!(a.require(Scope::TokenRead).is_ok());
        assert!(matches!(
            a.require(Scope::Admin),
            Err(AccessDenied::MissingScope { scope: "admin", .. })
        ));
    }

    #[test]
    fn restrictions_bound_apps_and_merchants() {
        let app = ClientKey::parse("app-1").unwrap();
        let other_app = ClientKey::parse("app-2").unwrap();
        let merchant = AccountId::parse("100").unwrap();
        let other_merchant = AccountId::parse("200").unwrap();
        let mut limited = client("limited", "k", &[Scope::AfterSaleRead]);
        limited.merchants = Some([merchant.clone()].into());
        assert!(limited.require_merchant(&merchant, &app).is_ok());
        assert!(limited.require_merchant(&other_merchant, &app).is_err());
        limited.apps = Some([app.clone()].into());
        assert!(limited.require_merchant(&merchant, &other_app).is_err());
        assert!(limited.require_app(&app).is_ok());
    }

    #[test]
    fn every_declared_client_has_a_name_and_a_scope() {
        let hash = KeyHash::of_key("k");
        let declared = ApiClient::declare(" ops ", hash, [Scope::Admin].into(), None, None);
        assert_eq!(
            declared.unwrap().name,
            "ops",
            "white space around is dropped"
        );
        for name in ["", "   ", &"n".repeat(65)] {
            assert_eq!(
                ApiClient::declare(name, hash, [Scope::Admin].into(), None, None),
                Err(InvalidApiClient::Name),
                "{name:?}"
            );
        }
        let no_scope = ApiClient::declare("ops", hash, BTreeSet::new(), None, None).unwrap_err();
        assert_eq!(no_scope.field(), "scopes");
        assert_eq!(no_scope, InvalidApiClient::NoScope);
    }

    #[test]
    fn keys_are_random_hashes_round_trip_and_debug_shows_no_key() {
        let key = generate_api_key();
        assert!(key.starts_with("dtk_") && key.len() == 68);
        assert_ne!(key, generate_api_key());
        let hash = KeyHash::of_key(&key);
        assert_eq!(KeyHash::parse_hex(&hash.to_hex()).unwrap(), hash);
        assert!(KeyHash::parse_hex("xyz").is_err());
        assert_eq!(
            KeyHash::parse_hex(&format!("  {}\n", hash.to_hex().to_uppercase())).unwrap(),
            hash,
            "white space around and upper-case digits are fine"
        );
        assert!(KeyHash::parse_hex(&hash.to_hex()[..62]).is_err());
        // 64 bytes that are not 64 characters: a byte-offset slice would have
        // cut 'é' in half and panicked.
        let not_ascii = format!("{}é{}", "a".repeat(31), "b".repeat(31));
        assert_eq!(not_ascii.len(), 64);
        assert!(KeyHash::parse_hex(&not_ascii).is_err());
        let printed = format!("{:?}", client("a", &key, &[]));
        assert!(!printed.contains(&key[4..]));
        assert!(!printed.contains(&hash.to_hex()));
    }
}
