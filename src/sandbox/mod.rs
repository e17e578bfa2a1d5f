//! A strict fake of Douyin's open platform for tests, the demo and benchmarks:
//! the client_token endpoint with the two-token rule, the grace period and the
//! fetch budget, the after-sale detail endpoint with per-app QPS, Douyin's
//! error envelopes and the documented example, the refund list with cursor
//! paging over seeded refunds and the per-developer QPS, and the refund audit,
//! taken once per refund. Knobs inject latency and faults.
//! It rejects a superseded or expired token exactly as Douyin would, so a
//! daemon regression shows up as a failing test. `notifications` pushes
//! signed refund-request notifications to a daemon's webhook, as Douyin does.

pub mod notifications;
mod rules;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::{SharedClock, duration_ms};
use crate::douyin::after_sale::PATH as AFTER_SALE_PATH;
use crate::douyin::after_sale_audit::PATH as AFTER_SALE_AUDIT_PATH;
use crate::douyin::after_sale_list::PATH as AFTER_SALE_LIST_PATH;
use crate::douyin::codes;
use notifications::RefundRequestContent;

pub use rules::TokenVerdict;

/// The documented example response of the after-sale detail API, verbatim.
pub const DOCUMENTED_EXAMPLE: &str = include_str!("documented_example.json");
/// The order id of the documented example, which the sandbox knows from the start.
pub const DOCUMENTED_ORDER_ID: &str = "keXkM0H5DR";

/// Douyin's rules as the sandbox enforces them; all adjustable at run time.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub token_lifetime: Duration,
    /// How long the previous token stays valid after a new one is fetched.
    pub grace: Duration,
    /// Token endpoint calls allowed per app within `token_budget_window`.
    pub token_budget: usize,
    pub token_budget_window: Duration,
    /// After-sale lookups allowed per app per second; 0 means unlimited.
    pub lookup_qps: usize,
    /// Refund list calls allowed per second across every app (Douyin counts
    /// them per developer); 0 means unlimited.
    pub list_qps_per_developer: usize,
    /// Added to every answer (real time, not the sandbox clock).
    pub latency: Duration,
    /// Send `expires_in` as a numeric string, as sibling endpoints do.
    pub expires_in_as_string: bool,
    /// Fraction (0..=1) of lookups answered with busy code 2119002, spread
    /// evenly and deterministically (at 0.3: lookups 3, 6, 10, 13, …), so a
    /// test can rely on the pattern.
    pub busy_fraction: f64,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            token_lifetime: Duration::from_secs(7200),
            grace: Duration::from_secs(300),
            token_budget: 500,
            token_budget_window: Duration::from_secs(300),
            lookup_qps: 10,
            list_qps_per_developer: 10,
            latency: Duration::ZERO,
            expires_in_as_string: false,
            busy_fraction: 0.0,
        }
    }
}

/// A scripted misbehaviour, consumed by the next request of its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 200 with this Douyin error code.
    ErrorCode(i64),
    /// This HTTP status with a plain-text body.
    HttpStatus(u16),
    /// This HTTP status with a proxy's HTML error page.
    HtmlPage(u16),
    /// HTTP 200 with JSON cut off in the middle.
    TruncatedJson,
    /// Waits this long (real time) before answering normally.
    Delay(Duration),
    /// Sends the headers, then breaks the connection in the middle of the body.
    DropConnection,
    /// HTTP 200 with the newer open-API gateway's envelope:
    /// `{"err_no": code, "err_msg": "…", "log_id": "…"}`, no `data`, no `extra`.
    GatewayEnvelope(i64),
    /// HTTP 200 with the code in `data` only (no `extra`).
    CodeInDataOnly(i64),
    /// HTTP 200 with exactly this body (JSON or not).
    Body(String),
}

/// What the sandbox has seen and answered.
#[derive(Debug, Clone, Default)]
pub struct SandboxStats {
    /// Calls to the token endpoints, whatever their outcome.
    pub token_calls: u64,
    /// Tokens issued, per client_key.
    pub(crate) tokens_issued: HashMap<String, u64>,
    /// Token endpoint refusals by code.
    pub token_refusals: BTreeMap<i64, u64>,
    pub lookups: u64,
    /// Lookup answers by Douyin code (0 = success).
    pub lookup_codes: BTreeMap<i64, u64>,
    /// Lookups answered with an injected fault that carries no code.
    pub(crate) lookup_faults: u64,
    /// Lookups that found their app's one-second window already full (each
    /// answered 2119003): how often the daemon overran Douyin's rate.
    pub lookup_window_overruns: u64,
    /// The query string of the latest lookup, as received.
    pub last_lookup_query: BTreeMap<String, String>,
    /// Calls to the refund list, whatever their outcome.
    pub list_calls: u64,
    /// Refund list answers by Douyin code (0 = success).
    pub list_codes: BTreeMap<i64, u64>,
    /// List calls that found the developer's one-second window already full
    /// (each answered 2119003).
    pub list_window_overruns: u64,
    /// The query string of the latest list call, as received.
    pub last_list_query: BTreeMap<String, String>,
    /// Calls to the refund audit that reached it, whatever their outcome.
    pub audit_calls: u64,
    /// Refund audit answers by Douyin code (0 = success).
    pub audit_codes: BTreeMap<i64, u64>,
}

impl SandboxStats {
    pub fn tokens_issued_total(&self) -> u64 {
        self.tokens_issued.values().sum()
    }

    pub fn tokens_issued_for(&self, client_key: &str) -> u64 {
        self.tokens_issued.get(client_key).copied().unwrap_or(0)
    }

    pub fn lookups_answered_with(&self, code: i64) -> u64 {
        self.lookup_codes.get(&code).copied().unwrap_or(0)
    }

    pub fn lists_answered_with(&self, code: i64) -> u64 {
        self.list_codes.get(&code).copied().unwrap_or(0)
    }

    pub fn audits_answered_with(&self, code: i64) -> u64 {
        self.audit_codes.get(&code).copied().unwrap_or(0)
    }

    /// Lookups refused because of the token (invalid, expired or superseded).
    pub fn token_rejections(&self) -> u64 {
        [
            codes::TOKEN_INVALID,
            codes::TOKEN_EXPIRED,
            codes::GATEWAY_TOKEN_INVALID,
            codes::GATEWAY_TOKEN_EXPIRED,
        ]
        .iter()
        .map(|code| self.lookups_answered_with(*code))
        .sum()
    }
}

#[derive(Debug, Clone)]
struct IssuedToken {
    value: String,
    issued_at_ms: i64,
    expires_at_ms: i64,
}

#[derive(Debug, Default)]
struct SandboxApp {
    secret: String,
    /// Issued tokens, newest last; only the last two can still be valid.
    issued: VecDeque<IssuedToken>,
    token_calls_ms: VecDeque<i64>,
    lookups_ms: VecDeque<i64>,
}

#[derive(Debug, Default)]
struct World {
    apps: HashMap<String, SandboxApp>,
    token_owner: HashMap<String, String>,
    authorized: HashMap<String, HashSet<String>>,
    /// Serialized once, when taught: a lookup answers these bytes as they
    /// are, instead of cloning and serializing a JSON tree each time (the
    /// soak makes tens of thousands of lookups).
    order_responses: HashMap<String, Bytes>,
    lookup_faults: VecDeque<Fault>,
    token_faults: VecDeque<Fault>,
    audit_faults: VecDeque<Fault>,
    /// Seeded refunds per merchant, in list order.
    refund_orders: HashMap<String, Vec<Value>>,
    /// Times of the refund list calls of the last second, all apps together.
    list_calls_ms: VecDeque<i64>,
    /// Audits taken: (account_id, order_id, certificate_id) → approved.
    audits: HashMap<(String, String, String), bool>,
    stats: SandboxStats,
    next_logid: u64,
    busy_counter: u64,
}

/// The sandbox's state, shared by its HTTP handlers and whoever drives it.
pub struct SandboxState {
    clock: SharedClock,
    config: Mutex<SandboxConfig>,
    world: Mutex<World>,
    token_gate: Mutex<Option<Arc<Gate>>>,
    lookup_gate: Mutex<Option<Arc<Gate>>>,
}

/// Holds every request of one endpoint until the test releases them, and
/// tells the test when they arrive: tests wait on events, not on time.
#[derive(Debug)]
pub struct Gate {
    arrivals: tokio::sync::watch::Sender<usize>,
    open: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            arrivals: tokio::sync::watch::channel(0).0,
            open: tokio::sync::watch::channel(false).0,
        })
    }

    /// Completes once `count` requests have arrived at the gate in all.
    pub async fn arrived(&self, count: usize) {
        let mut arrivals = self.arrivals.subscribe();
        // The sender lives as long as the gate, so waiting cannot fail.
        let _ = arrivals.wait_for(|arrived| *arrived >= count).await;
    }

    /// Lets every held request, and every later one, through.
    pub fn release(&self) {
        self.open.send_replace(true);
    }

    async fn pass(&self) {
        let mut open = self.open.subscribe();
        self.arrivals.send_modify(|arrived| *arrived += 1);
        let _ = open.wait_for(|open| *open).await;
    }
}

impl SandboxState {
    pub(crate) fn new(clock: SharedClock, config: SandboxConfig) -> Arc<Self> {
        let mut world = World::default();
        let documented: Value =
            serde_json::from_str(DOCUMENTED_EXAMPLE).expect("the documented example is JSON");
        world
            .order_responses
            .insert(DOCUMENTED_ORDER_ID.to_owned(), json_bytes(&documented));
        Arc::new(Self {
            clock,
            config: Mutex::new(config),
            world: Mutex::new(world),
            token_gate: Mutex::new(None),
            lookup_gate: Mutex::new(None),
        })
    }

    pub fn add_app(&self, client_key: &str, client_secret: &str) {
        let mut world = self.world.lock();
        world.apps.entry(client_key.to_owned()).or_default().secret = client_secret.to_owned();
    }

    /// Lets `client_key` act for merchant `account_id` (else lookups get 2119005).
    pub fn authorize_merchant(&self, account_id: &str, client_key: &str) {
        self.world
            .lock()
            .authorized
            .entry(account_id.to_owned())
            .or_default()
            .insert(client_key.to_owned());
    }

    /// The whole response body served for `order_id` (any authorised merchant).
    pub fn put_order_response(&self, order_id: &str, body: Value) {
        self.world
            .lock()
            .order_responses
            .insert(order_id.to_owned(), json_bytes(&body));
    }

    pub fn push_lookup_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.world.lock().lookup_faults.extend(faults);
    }

    pub fn push_token_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.world.lock().token_faults.extend(faults);
    }

    /// Faults for the next refund audits. `Delay` and `DropConnection` take
    /// the audit first and then answer late or break the connection, as a
    /// Douyin that applied a decision whose answer got lost; any other fault
    /// replaces the answer and takes nothing.
    pub fn push_audit_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.world.lock().audit_faults.extend(faults);
    }

    /// Seeds `count` refunds for merchant `account_id`, listed in order:
    /// after_sale_id `AS-<account_id>-<index>`, created one minute apart from
    /// `created_from_s` (Unix seconds), completed 30 s after creation, refund
    /// status 50 for even indexes and 10 for odd ones.
    pub fn seed_refund_orders(&self, account_id: &str, count: usize, created_from_s: i64) {
        let orders = (0..count)
            .map(|index| {
                let created = created_from_s + 60 * i64::try_from(index).unwrap_or(0);
                json!({
                    "after_sale_id": format!("AS-{account_id}-{index:05}"),
                    "order_id": format!("O-{account_id}-{index:05}"),
                    "merchant_account_id": account_id.parse::<i64>().unwrap_or(0),
                    "status": 1,
                    "create_time": created,
                    "update_time": created + 30,
                    "complete_time": created + 30,
                    "refund_amount": 100 + index,
                    "refund_info_list": [{
                        "refund_id": format!("R-{index:05}"),
                        "certificate_id": format!("C-{index:05}"),
                        "refund_status": if index % 2 == 0 { 50 } else { 10 },
                    }],
                })
            })
            .collect();
        self.world
            .lock()
            .refund_orders
            .insert(account_id.to_owned(), orders);
    }

    /// Opens a refund as a customer's request does: the merchant's refund list
    /// gains it, under review (refund_status 10, 审核中 as third-party code
    /// reads the undocumented values), until an audit decides it. Send the
    /// matching notification with `notifications::NotificationSender`.
    pub fn add_refund_request(&self, request: &RefundRequestContent) {
        let item = json!({
            "after_sale_id": format!("AS-{}-{}", request.order_id, request.certificate_id),
            "order_id": request.order_id,
            "merchant_account_id": request.account_id.parse::<i64>().unwrap_or(0),
            "status": 1,
            "create_time": request.refund_time,
            "update_time": request.refund_time,
            "refund_amount": request.refund_amount,
            "refund_info_list": [{
                "certificate_id": request.certificate_id,
                "refund_status": rules::REFUND_UNDER_REVIEW,
            }],
        });
        self.world
            .lock()
            .refund_orders
            .entry(request.account_id.clone())
            .or_default()
            .push(item);
    }

    /// The decision taken for a refund: Some(true) approved, Some(false) rejected.
    pub fn audited(&self, account_id: &str, order_id: &str, certificate_id: &str) -> Option<bool> {
        self.world
            .lock()
            .audits
            .get(&(
                account_id.to_owned(),
                order_id.to_owned(),
                certificate_id.to_owned(),
            ))
            .copied()
    }

    /// From now on, token endpoint calls wait at the returned gate.
    pub fn gate_token_endpoint(&self) -> Arc<Gate> {
        let gate = Gate::new();
        *self.token_gate.lock() = Some(Arc::clone(&gate));
        gate
    }

    /// From now on, after-sale detail lookups wait at the returned gate
    /// (after they are counted, before they are answered).
    pub fn gate_lookups(&self) -> Arc<Gate> {
        let gate = Gate::new();
        *self.lookup_gate.lock() = Some(Arc::clone(&gate));
        gate
    }

    pub fn stats(&self) -> SandboxStats {
        self.world.lock().stats.clone()
    }

    /// Issues a token as if another service fetched one with the app's key
    /// behind the daemon's back. Returns the token.
    pub fn issue_token_out_of_band(&self, client_key: &str) -> Option<String> {
        let config = self.config.lock().clone();
        let now_ms = self.clock.now_unix_ms();
        let mut world = self.world.lock();
        world
            .apps
            .contains_key(client_key)
            .then(|| issue_token(&mut world, client_key, &config, now_ms).value)
    }

    /// How the sandbox judges a token right now.
    pub fn judge_token(&self, token: &str) -> TokenVerdict {
        let config = self.config.lock().clone();
        let world = self.world.lock();
        rules::judge_token(&world, token, &config, self.clock.now_unix_ms())
    }
}

fn issue_token(
    world: &mut World,
    client_key: &str,
    config: &SandboxConfig,
    now_ms: i64,
) -> IssuedToken {
    let value: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    let token = IssuedToken {
        value: format!("clt.{value}"),
        issued_at_ms: now_ms,
        expires_at_ms: now_ms + duration_ms(config.token_lifetime),
    };
    world
        .token_owner
        .insert(token.value.clone(), client_key.to_owned());
    let app = world
        .apps
        .get_mut(client_key)
        .expect("caller checked the app exists");
    app.issued.push_back(token.clone());
    while app.issued.len() > 2 {
        if let Some(dead) = app.issued.pop_front() {
            // Keep the owner so that a dead token is reported invalid, not unknown.
            world.token_owner.insert(dead.value, client_key.to_owned());
        }
    }
    *world
        .stats
        .tokens_issued
        .entry(client_key.to_owned())
        .or_default() += 1;
    token
}

/// A running sandbox on a loopback port.
pub struct Sandbox {
    state: Arc<SandboxState>,
    address: SocketAddr,
    stopped: CancellationToken,
    task: JoinHandle<()>,
}

impl Sandbox {
    /// Starts on 127.0.0.1 with a free port.
    pub async fn start(clock: SharedClock, config: SandboxConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        Self::start_on(listener, clock, config)
    }

    pub fn start_on(
        listener: TcpListener,
        clock: SharedClock,
        config: SandboxConfig,
    ) -> std::io::Result<Self> {
        let address = listener.local_addr()?;
        let state = SandboxState::new(clock, config);
        let stopped = CancellationToken::new();
        let router = router(Arc::clone(&state));
        let shutdown = stopped.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(%error, "sandbox server failed");
            }
        });
        Ok(Self {
            state,
            address,
            stopped,
            task,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn state(&self) -> &Arc<SandboxState> {
        &self.state
    }

    pub async fn stop(self) {
        self.stopped.cancel();
        let _ = self.task.await;
    }
}

fn router(state: Arc<SandboxState>) -> Router {
    Router::new()
        .route(
            crate::config::TokenEndpoint::ClientToken.path(),
            post(client_token),
        )
        .route(
            crate::config::TokenEndpoint::StableClientToken.path(),
            post(stable_client_token),
        )
        .route(AFTER_SALE_PATH, get(after_sale_order_detail))
        .route(AFTER_SALE_LIST_PATH, get(after_sale_order_list))
        .route(AFTER_SALE_AUDIT_PATH, post(after_sale_order_audit))
        .with_state(state)
}

// === token endpoint ===

async fn client_token(State(state): State<Arc<SandboxState>>, body: Bytes) -> Response {
    token_endpoint(&state, &body, false).await
}

async fn stable_client_token(State(state): State<Arc<SandboxState>>, body: Bytes) -> Response {
    token_endpoint(&state, &body, true).await
}

async fn token_endpoint(state: &SandboxState, body: &[u8], stable: bool) -> Response {
    let config = config_after_latency(state).await;
    let gate = state.token_gate.lock().clone();
    if let Some(gate) = gate {
        gate.pass().await;
    }
    let fault = {
        let mut world = state.world.lock();
        world.stats.token_calls += 1;
        world.token_faults.pop_front()
    };
    if let Some(fault) = fault
        && let Some(response) = fault_response(state, fault).await
    {
        return response;
    }
    let now_ms = state.clock.now_unix_ms();
    let mut world = state.world.lock();
    let outcome = rules::grant_token(&mut world, body, &config, now_ms, stable);
    match outcome {
        Ok(token) => {
            let lifetime_s = (token.expires_at_ms - now_ms) / 1000;
            let expires_in = if config.expires_in_as_string {
                json!(lifetime_s.to_string())
            } else {
                json!(lifetime_s)
            };
            axum::Json(json!({
                "data": {"access_token": token.value, "description": "", "error_code": 0, "expires_in": expires_in},
                "message": "success"
            }))
            .into_response()
        }
        Err((code, description)) => {
            *world.stats.token_refusals.entry(code).or_default() += 1;
            axum::Json(json!({"data": {"error_code": code, "description": description}, "message": "error"})).into_response()
        }
    }
}

// === after-sale endpoint ===

async fn after_sale_order_detail(
    State(state): State<Arc<SandboxState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let config = config_after_latency(&state).await;
    let fault = {
        let mut world = state.world.lock();
        world.stats.lookups += 1;
        world.stats.last_lookup_query = query.clone().into_iter().collect();
        world.lookup_faults.pop_front()
    };
    let gate = state.lookup_gate.lock().clone();
    if let Some(gate) = gate {
        gate.pass().await;
    }
    if let Some(fault) = fault {
        match fault {
            Fault::ErrorCode(code) => {
                return error_envelope(&state, Endpoint::Detail, code, "injected fault", 0);
            }
            Fault::GatewayEnvelope(code) | Fault::CodeInDataOnly(code) => {
                *state
                    .world
                    .lock()
                    .stats
                    .lookup_codes
                    .entry(code)
                    .or_default() += 1;
            }
            _ => {}
        }
        let counted = matches!(fault, Fault::GatewayEnvelope(_) | Fault::CodeInDataOnly(_));
        if let Some(response) = fault_response(&state, fault).await {
            if !counted {
                state.world.lock().stats.lookup_faults += 1;
            }
            return response;
        }
    }
    if config.busy_fraction > 0.0 {
        let fraction = config.busy_fraction.clamp(0.0, 1.0);
        let busy = {
            let mut world = state.world.lock();
            world.busy_counter += 1;
            let n = world.busy_counter as f64;
            (n * fraction).floor() > ((n - 1.0) * fraction).floor()
        };
        if busy {
            return error_envelope(
                &state,
                Endpoint::Detail,
                codes::SYSTEM_BUSY,
                "系统繁忙,请稍候再试",
                0,
            );
        }
    }
    let token = access_token_header(&headers);
    let now_ms = state.clock.now_unix_ms();
    let verdict = {
        let mut world = state.world.lock();
        rules::admit_lookup(&mut world, token, &query, &config, now_ms)
    };
    match verdict {
        Err((code, description)) => error_envelope(&state, Endpoint::Detail, code, description, 0),
        Ok(()) => {
            let order_id = query.get("order_id").cloned().unwrap_or_default();
            let mut world = state.world.lock();
            *world.stats.lookup_codes.entry(0).or_default() += 1;
            match world.order_responses.get(&order_id) {
                // A cheap clone: the bytes are shared, not copied.
                Some(body) => {
                    ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response()
                }
                None => {
                    let logid = next_logid(&mut world);
                    axum::Json(json!({
                        "extra": {"logid": logid, "now": now_ms, "error_code": 0, "description": "", "sub_error_code": 0, "sub_description": ""},
                        "data": {"error_code": 0, "description": "", "has_more": false, "cursor": "", "after_sale_order_list": []}
                    }))
                    .into_response()
                }
            }
        }
    }
}

/// `body` as the bytes a lookup answers with.
fn json_bytes(body: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(body).expect("a JSON value serializes"))
}

/// The sandbox's rules as they stand, read after the configured latency
/// (every endpoint answers that much later).
async fn config_after_latency(state: &SandboxState) -> SandboxConfig {
    let latency = state.config.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    state.config.lock().clone()
}

/// The goodlife APIs' `access-token` header, "" when absent.
fn access_token_header(headers: &HeaderMap) -> &str {
    headers
        .get("access-token")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
}

fn next_logid(world: &mut World) -> String {
    world.next_logid += 1;
    format!("SANDBOX{:020}", world.next_logid)
}

/// The goodlife endpoints, each counting its answers by code in its own stats.
#[derive(Clone, Copy)]
enum Endpoint {
    Detail,
    List,
    Audit,
}

fn count_code(world: &mut World, endpoint: Endpoint, code: i64) {
    let codes = match endpoint {
        Endpoint::Detail => &mut world.stats.lookup_codes,
        Endpoint::List => &mut world.stats.list_codes,
        Endpoint::Audit => &mut world.stats.audit_codes,
    };
    *codes.entry(code).or_default() += 1;
}

/// Douyin's error envelope: HTTP 200, the code in `data` and in `extra`.
fn error_envelope(
    state: &SandboxState,
    endpoint: Endpoint,
    code: i64,
    description: &str,
    sub_code: i64,
) -> Response {
    let now_ms = state.clock.now_unix_ms();
    let logid = {
        let mut world = state.world.lock();
        count_code(&mut world, endpoint, code);
        next_logid(&mut world)
    };
    (
        [("x-tt-logid", logid.clone())],
        axum::Json(json!({
            "extra": {"logid": logid, "now": now_ms, "error_code": code, "description": description, "sub_error_code": sub_code, "sub_description": ""},
            "data": {"error_code": code, "description": description}
        })),
    )
        .into_response()
}

/// A success envelope around `data`, with a fresh logid.
fn success_envelope(state: &SandboxState, endpoint: Endpoint, data: Value) -> Response {
    let now_ms = state.clock.now_unix_ms();
    let logid = {
        let mut world = state.world.lock();
        count_code(&mut world, endpoint, 0);
        next_logid(&mut world)
    };
    (
        [("x-tt-logid", logid.clone())],
        axum::Json(json!({
            "extra": {"logid": logid, "now": now_ms, "error_code": 0, "description": "", "sub_error_code": 0, "sub_description": ""},
            "data": data
        })),
    )
        .into_response()
}

// === refund list and audit endpoints ===

async fn after_sale_order_list(
    State(state): State<Arc<SandboxState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let config = config_after_latency(&state).await;
    let token = access_token_header(&headers);
    let now_ms = state.clock.now_unix_ms();
    let page = {
        let mut world = state.world.lock();
        world.stats.list_calls += 1;
        world.stats.last_list_query = query.clone().into_iter().collect();
        rules::list_refunds(&mut world, token, &query, &config, now_ms)
    };
    match page {
        Err((code, description)) => error_envelope(&state, Endpoint::List, code, description, 0),
        Ok(page) => success_envelope(
            &state,
            Endpoint::List,
            json!({"error_code": 0, "description": "", "has_more": page.has_more, "cursor": page.cursor, "after_sale_order_list": page.items}),
        ),
    }
}

async fn after_sale_order_audit(
    State(state): State<Arc<SandboxState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let config = config_after_latency(&state).await;
    let fault = {
        let mut world = state.world.lock();
        world.stats.audit_calls += 1;
        world.audit_faults.pop_front()
    };
    // A late or broken answer comes after the audit was taken: the request
    // reached Douyin, only its answer is lost.
    let answer_lost = matches!(fault, Some(Fault::Delay(_) | Fault::DropConnection));
    if let Some(fault) = fault.clone()
        && !answer_lost
    {
        if let Fault::ErrorCode(code) = fault {
            return error_envelope(&state, Endpoint::Audit, code, "injected fault", 0);
        }
        if let Some(response) = fault_response(&state, fault).await {
            return response;
        }
    }
    let token = access_token_header(&headers);
    let now_ms = state.clock.now_unix_ms();
    let verdict = {
        let mut world = state.world.lock();
        rules::audit_refund(&mut world, token, &body, &config, now_ms)
    };
    let response = match verdict {
        Err((code, description, sub_code)) => {
            error_envelope(&state, Endpoint::Audit, code, description, sub_code)
        }
        Ok(()) => success_envelope(
            &state,
            Endpoint::Audit,
            json!({"error_code": 0, "description": "", "reentry": false}),
        ),
    };
    match fault {
        Some(fault @ (Fault::Delay(_) | Fault::DropConnection)) => {
            fault_response(&state, fault).await.unwrap_or(response)
        }
        _ => response,
    }
}

/// The answer of a fault that replaces the real answer; None for a delay.
async fn fault_response(state: &SandboxState, fault: Fault) -> Option<Response> {
    match fault {
        Fault::GatewayEnvelope(code) => {
            let log_id = next_logid(&mut state.world.lock());
            Some(
                axum::Json(json!({"err_no": code, "err_msg": "injected fault", "log_id": log_id}))
                    .into_response(),
            )
        }
        Fault::CodeInDataOnly(code) => Some(
            axum::Json(json!({"data": {"error_code": code, "description": "injected fault"}}))
                .into_response(),
        ),
        Fault::Body(body) => Some(
            ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        ),
        Fault::ErrorCode(code) => Some(
            axum::Json(json!({"data": {"error_code": code, "description": "injected fault"}, "message": "error"}))
                .into_response(),
        ),
        Fault::HttpStatus(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Some((status, "internal error").into_response())
        }
        Fault::HtmlPage(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            Some(
                (
                    status,
                    [(header::CONTENT_TYPE, "text/html")],
                    "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>",
                )
                    .into_response(),
            )
        }
        Fault::TruncatedJson => Some(
            ([(header::CONTENT_TYPE, "application/json")], r#"{"extra":{"logid":"TRUNC","now":1},"data":{"error_code":0,"after_sale_order_list":[{"order_id":"#)
                .into_response(),
        ),
        Fault::Delay(delay) => {
            tokio::time::sleep(delay).await;
            None
        }
        Fault::DropConnection => {
            let broken = futures::stream::once(async { Err::<Bytes, std::io::Error>(std::io::Error::other("connection dropped by the sandbox")) });
            Some(([(header::CONTENT_TYPE, "application/json"), (header::CONTENT_LENGTH, "512")], axum::body::Body::from_stream(broken)).into_response())
        }
    }
}
