//! The README's first command, `douyin-tokend demo`, run in-process.

#[tokio::test]
async fn the_demo_prints_a_real_lookup_and_a_restart_that_fetches_nothing() {
    let mut output = Vec::new();
    douyin_tokend::demo::run(&mut output).await.unwrap();
    let output = String::from_utf8(output).unwrap();
    assert!(
        output.contains("\"merchant_account_id\": 5953689721084050000"),
        "{output}"
    );
    assert!(
        output.contains("\"logid\": \"202008121419360101980821035705926A\""),
        "{output}"
    );
    assert!(output.contains("valid"), "{output}");
    assert!(
        output.contains("tokens fetched from Douyin by the restart: 0"),
        "{output}"
    );
    assert!(
        !output.contains("demo-secret"),
        "the demo never prints the secret"
    );
}
