//! Configuration reloads, one at a time, whether SIGHUP or
//! AdminService.ReloadConfig (`douyin-tokend reload`, systemd's `ExecReload=`)
//! asked: systemd hears RELOADING=1 and then READY=1, with a STATUS that keeps
//! a failed reload visible until one succeeds; the log says what changed or
//! why nothing did; the audit trail records who asked; the caller gets the
//! same answer. A reload applies the file's apps, merchants and API clients;
//! every other setting applies at the next restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::audit::{AuditAction, AuditLog};
use crate::config::{Config, ConfigError};
use crate::proto::tokend::v1::ReloadConfigResponse;
use crate::registry::{Registry, ReloadReport};
use crate::systemd_notify::SystemdNotifier;

/// Who asked for a reload sent by signal, in the log and the audit trail.
pub(crate) const SIGNAL: &str = "SIGHUP";
/// The name of the daemon's own reload key (scope `config.reload`), as the
/// audit trail shows reloads asked with it (`systemctl reload`).
pub(crate) const RELOAD_KEY_CLIENT: &str = "reload-key";

/// A reload that was applied: what changed, and what the operator should know.
#[derive(Debug, Clone)]
pub(crate) struct ReloadOutcome {
    pub(crate) report: ReloadReport,
    pub(crate) notes: Vec<String>,
}

impl ReloadOutcome {
    /// The answer to AdminService.ReloadConfig.
    pub(crate) fn response(&self) -> ReloadConfigResponse {
        let count = |value: usize| i64::try_from(value).unwrap_or(i64::MAX);
        let report = &self.report;
        ReloadConfigResponse {
            apps_added: count(report.apps_added),
            apps_removed: count(report.apps_removed),
            app_secrets_changed: count(report.app_secrets_changed),
            merchants_added: count(report.merchants_added),
            merchants_removed: count(report.merchants_removed),
            merchants_moved: count(report.merchants_moved),
            clients_added: count(report.clients_added),
            clients_removed: count(report.clients_removed),
            clients_changed: count(report.clients_changed),
            notes: self.notes.clone(),
        }
    }
}

/// "1 app added, 2 merchants removed" (only what changed), or "nothing
/// changed": for the audit trail and `douyin-tokend reload`'s output.
pub(crate) fn summary(response: &ReloadConfigResponse) -> String {
    let counts = [
        (response.apps_added, "app", "added"),
        (response.apps_removed, "app", "removed"),
        (response.app_secrets_changed, "app secret", "changed"),
        (response.merchants_added, "merchant", "added"),
        (response.merchants_removed, "merchant", "removed"),
        (response.merchants_moved, "merchant", "moved to another app"),
        (response.clients_added, "API client", "added"),
        (response.clients_removed, "API client", "removed"),
        (response.clients_changed, "API client", "changed"),
    ];
    let changes: Vec<String> = counts
        .into_iter()
        .filter(|(count, _, _)| *count > 0)
        .map(|(count, noun, verb)| {
            let plural = if count == 1 { "" } else { "s" };
            format!("{count} {noun}{plural} {verb}")
        })
        .collect();
    if changes.is_empty() {
        "nothing changed".to_owned()
    } else {
        changes.join(", ")
    }
}

/// Runs reloads for the serving daemon. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Reloader {
    shared: Arc<Shared>,
}

struct Shared {
    registry: Registry,
    audit: AuditLog,
    /// The file the daemon was started with; None: defaults and environment.
    config_path: Option<PathBuf>,
    notifier: SystemdNotifier,
    /// The STATUS READY=1 carried at start (the addresses served).
    serving_status: String,
    /// Reloads run one at a time, so each STATUS follows its own outcome.
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub(crate) fn new(
        registry: Registry,
        audit: AuditLog,
        config_path: Option<PathBuf>,
        notifier: SystemdNotifier,
        serving_status: String,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                registry,
                audit,
                config_path,
                notifier,
                serving_status,
                one_at_a_time: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Re-reads the config file and applies it, for `requested_by` (a client
    /// name, or [`SIGNAL`]). On failure nothing changed and the error is the
    /// reason, one line naming the config key when there is one.
    pub(crate) async fn reload(&self, requested_by: &str) -> Result<ReloadOutcome, String> {
        let shared = &self.shared;
        let _one_at_a_time = shared.one_at_a_time.lock().await;
        shared.notifier.reloading();
        let applied = self.apply().await;
        match &applied {
            Ok(outcome) => {
                let report = &outcome.report;
                tracing::info!(
                    requested_by,
                    apps_added = report.apps_added,
                    apps_removed = report.apps_removed,
                    app_secrets_changed = report.app_secrets_changed,
                    merchants_added = report.merchants_added,
                    merchants_removed = report.merchants_removed,
                    merchants_moved = report.merchants_moved,
                    clients_added = report.clients_added,
                    clients_removed = report.clients_removed,
                    clients_changed = report.clients_changed,
                    "configuration reloaded: apps, merchants and API clients applied; other settings apply at the next restart"
                );
                for note in &outcome.notes {
                    tracing::info!(requested_by, "reload: {note}");
                }
                shared.audit.record_change(
                    requested_by,
                    AuditAction::ConfigReload,
                    None,
                    &format!("applied: {}", summary(&outcome.response())),
                );
                // READY=1 ends RELOADING; the STATUS drops an earlier failure.
                shared.notifier.ready(&shared.serving_status);
            }
            Err(reason) => {
                tracing::error!(
                    requested_by,
                    error = %reason,
                    "configuration not reloaded; the previous apps, merchants and API clients stay in force"
                );
                shared.audit.record_change(
                    requested_by,
                    AuditAction::ConfigReload,
                    None,
                    &format!("refused: {reason}"),
                );
                shared.notifier.ready(&format!(
                    "{}; last reload failed: {reason}",
                    shared.serving_status
                ));
            }
        }
        applied
    }

    async fn apply(&self) -> Result<ReloadOutcome, String> {
        let credentials_directory = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let config =
            Config::load(self.shared.config_path.as_deref()).map_err(|error| error.to_string())?;
        let declarations = config
            .resolve_declarations(
                |name| std::env::var(name).ok(),
                credentials_directory.as_deref(),
            )
            .map_err(|error| {
                explain_unreadable_credential(&error, credentials_directory.as_deref())
            })?;
        let report = self
            .shared
            .registry
            .reload_config(&declarations)
            .await
            .map_err(|error| {
                format!("cannot apply the config's apps, merchants and clients: {error}")
            })?;
        let notes = credential_notes(&config, credentials_directory.as_deref(), &report);
        Ok(ReloadOutcome { report, notes })
    }
}

/// A secret file that cannot be read, with what systemd does about
/// credentials when the file was to come from `$CREDENTIALS_DIRECTORY`:
/// systemd copies `LoadCredential=` files there only when the service
/// starts, so one added or replaced since is not there yet.
fn explain_unreadable_credential(
    error: &ConfigError,
    credentials_directory: Option<&Path>,
) -> String {
    match (error, credentials_directory) {
        (ConfigError::Invalid { key, .. }, Some(_)) if key.ends_with(".client_secret_file") => {
            format!(
                "{error}; systemd copies LoadCredential= files into $CREDENTIALS_DIRECTORY only when the service starts, so a credential added since needs `systemctl restart douyin-tokend`"
            )
        }
        _ => error.to_string(),
    }
}

/// Says when a secret read from `$CREDENTIALS_DIRECTORY` is the one already
/// in force: the operator may have changed the credential's source file and
/// expect the reload to pick it up, which it cannot (systemd copies
/// credentials only at start).
fn credential_notes(
    config: &Config,
    credentials_directory: Option<&Path>,
    report: &ReloadReport,
) -> Vec<String> {
    if credentials_directory.is_none() {
        return Vec::new();
    }
    let unchanged_credentials: Vec<String> = config
        .apps
        .iter()
        .filter(|app| report.unchanged_secrets.contains(&app.client_key))
        .filter_map(|app| app.client_secret_file.as_ref())
        .filter(|file| file.is_relative())
        .map(|file| file.display().to_string())
        .collect();
    if unchanged_credentials.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "the app secrets read from $CREDENTIALS_DIRECTORY ({}) are unchanged; systemd copies LoadCredential= files only when the service starts, so a secret changed at its source takes `systemctl restart douyin-tokend` (an app added with `douyin-tokend app add --client-secret-file` takes a new secret at once)",
        unchanged_credentials.join(", ")
    )]
}
