//! The generated gRPC code, quarantined here, plus hand-written `Debug` for the
//! `tokend.v1` messages, which carry tokens, secrets and client keys, and for
//! `AfterSaleEvent`, which carries its app's client key.

#![allow(clippy::all, clippy::pedantic)]

pub mod douyin {
    pub mod goodlife {
        pub mod v1 {
            tonic::include_proto!("douyin.goodlife.v1");
        }
    }
}

pub mod tokend {
    pub mod v1 {
        tonic::include_proto!("tokend.v1");
    }
}

/// Deserializes a message field only from a JSON object: serde's derive would
/// also accept an array and fill the struct position by position.
pub(crate) fn json_object_only<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    struct ObjectOnly<T>(std::marker::PhantomData<T>);

    impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for ObjectOnly<T> {
        type Value = Option<T>;

        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("a JSON object")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }

    deserializer.deserialize_map(ObjectOnly(std::marker::PhantomData))
}

/// Every file of the contract, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tokend_descriptor.bin"));

/// `Debug` that names the message and nothing it holds: these messages may
/// carry a token, a secret or a client key, and Debug output ends up in logs.
macro_rules! opaque_debug {
    ($($message:path),* $(,)?) => {
        $(
            impl std::fmt::Debug for $message {
                fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    formatter
                        .debug_struct(stringify!($message))
                        .finish_non_exhaustive()
                }
            }
        )*
    };
}

mod opaque_debug_impls {
    use super::tokend::v1::*;

    opaque_debug!(
        GetAccessTokenRequest,
        GetAccessTokenResponse,
        PutAppRequest,
        PutAppResponse,
        RemoveAppRequest,
        RemoveAppResponse,
        ListAppsRequest,
        ListAppsResponse,
        AppInfo,
        PutMerchantRequest,
        PutMerchantResponse,
        RemoveMerchantRequest,
        RemoveMerchantResponse,
        ListMerchantsRequest,
        ListMerchantsResponse,
        MerchantInfo,
        ListTokenStatusRequest,
        ListTokenStatusResponse,
        TokenStatus,
        RefreshTokenRequest,
        RefreshTokenResponse,
        get_access_token_request::Selector,
        ReportInvalidTokenRequest,
        report_invalid_token_request::Selector,
        CreateClientRequest,
        CreateClientResponse,
        RemoveClientRequest,
        RemoveClientResponse,
        ListClientsRequest,
        ListClientsResponse,
        ClientInfo,
        ListAuditRequest,
        ListAuditResponse,
        AuditEntry,
        ReloadConfigRequest,
        ReloadConfigResponse,
    );
    opaque_debug!(super::douyin::goodlife::v1::AfterSaleEvent);
}
