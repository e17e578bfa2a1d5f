//! Compiles the gRPC contract in `proto/` with the pure-Rust protox compiler, so
//! `cargo build` needs no protoc, and writes the descriptor set that server
//! reflection serves.

use std::path::PathBuf;

use prost::Message;

const PROTO_FILES: &[&str] = &[
    "proto/douyin/goodlife/v1/after_sale.proto",
    "proto/tokend/v1/token.proto",
    "proto/tokend/v1/admin.proto",
];

/// The attribute that makes a response's `data` and `extra` accept only a JSON object.
const OBJECT_ONLY: &str = "#[serde(deserialize_with = \"crate::proto::json_object_only\")]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tonic-prost-build prints no rerun-if-changed of its own, and
    // sqlx::migrate! embeds the migrations at compile time.
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");

    let file_descriptors = protox::compile(PROTO_FILES, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tokend_descriptor.bin"),
        file_descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        // The after-sale messages mirror Douyin's JSON field for field, so the
        // upstream decoder deserializes straight into them (unknown upstream
        // fields ignored, absent ones defaulted) and the demo prints them as JSON.
        .type_attribute(
            ".douyin.goodlife.v1",
            "#[derive(serde::Deserialize, serde::Serialize)] #[serde(default)]",
        )
        // serde's derive would also fill a struct from a JSON array, position by
        // position; the envelope's `data` and `extra` must be objects, or the
        // answer is not a success (`{"data":[]}` must not read as "no records").
        .field_attribute(
            ".douyin.goodlife.v1.GetAfterSaleOrderDetailResponse.data",
            OBJECT_ONLY,
        )
        .field_attribute(
            ".douyin.goodlife.v1.GetAfterSaleOrderDetailResponse.extra",
            OBJECT_ONLY,
        )
        .field_attribute(
            ".douyin.goodlife.v1.ListAfterSaleOrdersResponse.data",
            OBJECT_ONLY,
        )
        .field_attribute(
            ".douyin.goodlife.v1.ListAfterSaleOrdersResponse.extra",
            OBJECT_ONLY,
        )
        .field_attribute(
            ".douyin.goodlife.v1.AuditAfterSaleOrderResponse.data",
            OBJECT_ONLY,
        )
        .field_attribute(
            ".douyin.goodlife.v1.AuditAfterSaleOrderResponse.extra",
            OBJECT_ONLY,
        )
        // A refund-request notification's content must be a JSON object, not an array.
        .field_attribute(
            ".douyin.goodlife.v1.AfterSaleEvent.apply_reason",
            "#[serde(deserialize_with = \"crate::proto::json_object_only\")]",
        )
        // tokend.v1 messages carry tokens, secrets and client keys, and an
        // AfterSaleEvent its app's client_key: their Debug is written by hand
        // in src/proto.rs and shows no field values.
        .skip_debug([".tokend.v1", ".douyin.goodlife.v1.AfterSaleEvent"])
        .compile_fds(file_descriptors)?;
    Ok(())
}
