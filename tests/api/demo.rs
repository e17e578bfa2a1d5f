//! The README's first command, `douyin-tokend demo`, run in-process.

/// The line of the output that starts with `prefix`, or a failure showing all of it.
fn line_starting<'output>(output: &'output str, prefix: &str) -> &'output str {
    output
        .lines()
        .find(|line| line.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in\n{output}"))
}

#[tokio::test]
async fn the_demo_prints_a_real_lookup_a_restart_that_fetches_nothing_and_the_after_sale_chapter() {
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

    // Hear: the notification was acknowledged and the watcher printed it, decoded.
    let posted = line_starting(&output, "sandbox Douyin: a customer asks for a refund");
    assert!(posted.ends_with("answered HTTP 200"), "{posted}");
    let received = line_starting(&output, "watcher received event #");
    assert!(
        received.contains(
            "merchant 7000000000000000001 order keXkM0H5DR certificate apvmjJm6US refund 1990"
        ),
        "{received}"
    );
    assert!(received.contains("msg demo-refund-request-1"), "{received}");
    let decoded = line_starting(&output, "  decoded:");
    assert!(decoded.contains("refund_amount=1990"), "{decoded}");
    assert!(decoded.contains("reasons=[102 "), "{decoded}");

    // Look: the order the event names.
    let detail = line_starting(
        &output,
        "GetAfterSaleOrderDetail(order_id=keXkM0H5DR, certificate_id=apvmjJm6US): 1 after-sale order(s)",
    );
    assert!(!detail.is_empty());

    // Decide: approved once upstream; the repeat is the recorded answer.
    let approved = line_starting(&output, "AuditAfterSaleOrder(approve):");
    assert!(approved.contains("error_code 0"), "{approved}");
    assert!(approved.contains("replayed false"), "{approved}");
    assert!(approved.ends_with("received so far: 1"), "{approved}");
    let replayed = line_starting(&output, "AuditAfterSaleOrder(approve again):");
    assert!(replayed.contains("error_code 0"), "{replayed}");
    assert!(replayed.contains("replayed true"), "{replayed}");
    assert!(
        replayed.ends_with("received so far: 1"),
        "no second upstream call: {replayed}"
    );

    // Reconcile: the list holds the refund, now approved (refund_status 20).
    let listed = output
        .split_once("ListAfterSaleOrders(account_id=7000000000000000001): 1 refund(s):")
        .unwrap_or_else(|| panic!("no list in\n{output}"))
        .1;
    assert!(
        listed.contains(
            "order_id=keXkM0H5DR refund_amount=1990 certificate_id=apvmjJm6US refund_status=20"
        ),
        "{output}"
    );

    assert!(
        !output.contains("demo-secret"),
        "the demo never prints the secret"
    );
}
