//! Criterion micro-benchmarks of the daemon's hot paths, each without the
//! network: Douyin's after-sale JSON decoded into the proto messages, the
//! answer encoded for gRPC, and a held token handed out by the token manager.
//! `cargo bench --bench hot_paths`; numbers in BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use douyin_tokend::clock::{ManualClock, SharedClock};
use douyin_tokend::config::{Config, DouyinConfig};
use douyin_tokend::domain::{AccessToken, ClientKey, ClientSecret};
use douyin_tokend::douyin::DouyinClient;
use douyin_tokend::douyin::after_sale::decode_after_sale_answer;
use douyin_tokend::metrics::Metrics;
use douyin_tokend::sandbox::DOCUMENTED_EXAMPLE;
use douyin_tokend::store::{NewToken, Source, Store};
use douyin_tokend::token::TokenManager;
use prost::Message;

fn upstream_json_to_proto(criterion: &mut Criterion) {
    let body = DOCUMENTED_EXAMPLE.as_bytes();
    criterion.bench_function("decode documented after-sale answer", |bench| {
        bench.iter(|| {
            decode_after_sale_answer(200, black_box(body), "application/json", String::new())
                .expect("the documented example decodes")
        })
    });
    let busy = br#"{"extra":{"logid":"L","now":1,"error_code":2119002,"description":"busy","sub_error_code":0,"sub_description":""},"data":{"error_code":2119002,"description":"busy"}}"#;
    criterion.bench_function("decode a Douyin error envelope", |bench| {
        bench.iter(|| {
            decode_after_sale_answer(200, black_box(busy), "application/json", String::new())
                .expect_err("an error code is an error")
        })
    });
    let answer = decode_after_sale_answer(200, body, "application/json", String::new())
        .expect("the documented example decodes");
    criterion.bench_function("encode the answer as protobuf", |bench| {
        bench.iter(|| black_box(&answer.response).encode_to_vec())
    });
}

fn token_look_up(criterion: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let directory = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::starting_at(1_767_225_600_000);
    let shared_clock: SharedClock = clock.clone();
    let client_key = ClientKey::parse("awbenchkey0000001").expect("a key");
    let tokens = runtime.block_on(async {
        let (store, _) = Store::open(
            &directory.path().join("bench.db"),
            &directory.path().join("master.key"),
        )
        .await
        .expect("a store");
        let audit = douyin_tokend::audit::AuditLog::start(store.clone(), Arc::clone(&shared_clock));
        store
            .apps()
            .put(
                &client_key,
                &ClientSecret::parse("secret").expect("a secret"),
                Source::Admin,
                0,
            )
            .await
            .expect("an app");
        store
            .tokens()
            .save_fetched(&NewToken {
                client_key: &client_key,
                access_token: &AccessToken::new("clt.benchmark".to_owned()),
                generation: 1,
                fetched_at_ms: 1_767_225_600_000,
                expires_at_ms: 1_767_225_600_000 + 7_200_000,
            })
            .await
            .expect("a token");
        TokenManager::load(
            store,
            DouyinClient::new(&DouyinConfig::default(), Metrics::unregistered()).expect("a client"),
            Arc::clone(&shared_clock),
            &Config::default(),
            audit,
            Metrics::unregistered(),
            tokio_util::task::TaskTracker::new(),
        )
        .await
        .expect("the token manager")
    });
    criterion.bench_function("hand out a held token", |bench| {
        bench.iter(|| {
            runtime
                .block_on(tokens.token_for_app(black_box(&client_key)))
                .expect("a held token")
        })
    });
}

criterion_group!(hot_paths, upstream_json_to_proto, token_look_up);
criterion_main!(hot_paths);
