//! A real Prometheus server (Debian's package) in a lab namespace, scraping guard's agent as
//! job="guard" and the app as job="app" (the job names alerts.yml and dashboard.json
//! expect) with the shipped alert rules loaded (or their lab variant, [`Prometheus::start_lab_rules`]),
//! and answering queries over its HTTP API.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;

use super::lab_rules::{self, LAB_SPEEDUP};
use crate::agent::wait_for;
use crate::netns::Netns;
use crate::process::{run_checked, ChildGuard};
use crate::tools::TempDir;

/// Where the server listens, inside its namespace.
pub const LISTEN: &str = "127.0.0.1:9090";
/// Scrape and rule evaluation interval: short, so seconds of attack leave many samples.
pub const INTERVAL_SECS: u32 = 1;

/// The running server; stopped and its storage removed on drop.
pub struct Prometheus {
    /// Its network namespace (a path, so a lab that is borrowed mutably can hold it too).
    netns: PathBuf,
    started_unix: u64,
    // Field order: the server stops before its storage goes.
    _server: ChildGuard,
    _dir: TempDir,
}

/// Its config: both jobs, one target each, and the rule files.
pub fn config(guard: &str, app: &str, rules: &[&Path]) -> String {
    let rule_files: String = rules
        .iter()
        .map(|r| format!("  - {}\n", r.display()))
        .collect();
    format!(
        "global:\n  scrape_interval: {INTERVAL_SECS}s\n  evaluation_interval: {INTERVAL_SECS}s\n\
         rule_files:\n{rule_files}\
         scrape_configs:\n\
         \x20 - job_name: guard\n    static_configs:\n      - targets: [\"{guard}\"]\n\
         \x20 - job_name: app\n    static_configs:\n      - targets: [\"{app}\"]\n"
    )
}

impl Prometheus {
    /// Starts it in `ns` scraping `guard` and `app` (host:port) with `rules` loaded, and waits
    /// until its API answers (the targets may come and go: `up` says when they are there).
    pub fn start(ns: &Netns, guard: &str, app: &str, rules: &[&Path]) -> Result<Self> {
        Self::start_in(TempDir::new("deploy-prom")?, ns, guard, app, rules)
    }

    /// The same with the lab's variant of the rules file `shipped` (see [`lab_rules`]: `for:`
    /// and time spans [`LAB_SPEEDUP`] times shorter, so alerts fire within a lab attack),
    /// written next to the server's storage; `shipped` itself is only read.
    pub fn start_lab_rules(ns: &Netns, guard: &str, app: &str, shipped: &Path) -> Result<Self> {
        let dir = TempDir::new("deploy-prom")?;
        let text = std::fs::read_to_string(shipped)
            .with_context(|| format!("read {}", shipped.display()))?;
        let variant = lab_rules::lab_variant(&text, LAB_SPEEDUP)
            .with_context(|| format!("derive the lab's variant of {}", shipped.display()))?;
        let lab = dir.path().join("alerts.lab.yml");
        std::fs::write(&lab, variant).with_context(|| format!("write {}", lab.display()))?;
        Self::start_in(dir, ns, guard, app, &[&lab])
    }

    fn start_in(dir: TempDir, ns: &Netns, guard: &str, app: &str, rules: &[&Path]) -> Result<Self> {
        let conf = dir.path().join("prometheus.yml");
        std::fs::write(&conf, config(guard, app, rules)).context("write prometheus.yml")?;
        let mut cmd = ns.command("prometheus");
        cmd.arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={LISTEN}"))
            .arg("--log.level=warn");
        let mut server =
            ChildGuard::spawn("prometheus", &mut cmd)?.with_grace(Duration::from_secs(10));
        let netns = ns.path().to_path_buf();
        let started_unix = unix_now();
        wait_for("Prometheus to answer", Duration::from_secs(90), || {
            if !server.is_running()? {
                bail!("prometheus exited: {}", server.stderr_so_far());
            }
            Ok(api_get(&netns, "/api/v1/query", &[("query", "1")])
                .ok()
                .map(|_| ()))
        })?;
        Ok(Self {
            netns,
            started_unix,
            _server: server,
            _dir: dir,
        })
    }

    /// Waits until `n` targets were scraped up.
    pub fn wait_targets_up(&self, n: usize, limit: Duration) -> Result<()> {
        wait_for("Prometheus to scrape its targets", limit, || {
            let up = self.query("sum(up)").unwrap_or_default();
            Ok((scalar(&up) == Some(n as f64)).then_some(()))
        })
    }

    /// The names of the alerts whose condition holds now (pending or firing).
    pub fn active_alerts(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .alert_rules()?
            .into_iter()
            .filter(|r| r.state != "inactive")
            .map(|r| r.name)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Waits until no alert is pending or firing: the earlier scenario's samples have left
    /// every window. The names still active when `limit` runs out, or nothing.
    pub fn wait_quiet(&self, limit: Duration) -> Result<Vec<String>> {
        match wait_for("every alert to be inactive", limit, || {
            Ok(self.active_alerts()?.is_empty().then_some(()))
        }) {
            Ok(()) => Ok(Vec::new()),
            Err(_) => self.active_alerts(),
        }
    }

    /// The alerts that were firing at some evaluation in `[from, to]` (Unix seconds), read
    /// from the server's own `ALERTS` series.
    pub fn fired_between(&self, from: f64, to: f64) -> Result<Vec<String>> {
        self.alerts_between(from, to, "ALERTS{alertstate=\"firing\"}")
    }

    /// The alerts that were pending or firing at some evaluation in `[from, to]`.
    pub fn active_between(&self, from: f64, to: f64) -> Result<Vec<String>> {
        self.alerts_between(from, to, "ALERTS")
    }

    fn alerts_between(&self, from: f64, to: f64, series: &str) -> Result<Vec<String>> {
        ensure!(to >= from, "an empty window: {from} to {to}");
        // Whole seconds, rounded up, so the window's first evaluation is inside.
        let span = (to - from).ceil().max(1.0) as u64;
        let query = format!("count by (alertname) (count_over_time({series}[{span}s]))");
        let data = self.api(
            "/api/v1/query",
            &[("query", &query), ("time", &format!("{to:.3}"))],
        )?;
        let result = data["result"]
            .as_array()
            .with_context(|| format!("query {query}: no result vector in {data}"))?;
        let mut names: Vec<String> = result
            .iter()
            .filter_map(|s| s["metric"]["alertname"].as_str().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value> {
        api_get(&self.netns, path, params)
    }

    /// Whether `promql` has data anywhere since the server started, evaluated as a dashboard
    /// panel is: a range query over the whole time shown, one point per interval.
    pub fn has_data_since_start(&self, promql: &str) -> Result<bool> {
        let now = unix_now();
        let data = self.api(
            "/api/v1/query_range",
            &[
                ("query", promql),
                ("start", &self.started_unix.to_string()),
                ("end", &now.to_string()),
                ("step", &INTERVAL_SECS.to_string()),
            ],
        )?;
        let series = data["result"]
            .as_array()
            .with_context(|| format!("query_range {promql}: no result in {data}"))?;
        Ok(series
            .iter()
            .any(|s| s["values"].as_array().is_some_and(|v| !v.is_empty())))
    }

    /// An instant query: the result vector (empty when the expression has no data).
    pub fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let data = self.api("/api/v1/query", &[("query", promql)])?;
        match data["result"].as_array() {
            Some(v) => Ok(v.clone()),
            None => bail!("query {promql}: no result vector in {data}"),
        }
    }

    /// Every loaded alerting rule: (name, state, health), state being inactive, pending or
    /// firing.
    pub fn alert_rules(&self) -> Result<Vec<AlertRule>> {
        let data = self.api("/api/v1/rules", &[("type", "alert")])?;
        let mut out = Vec::new();
        for group in data["groups"].as_array().context("no rule groups")? {
            for rule in group["rules"].as_array().context("a group without rules")? {
                out.push(AlertRule {
                    name: rule["name"].as_str().unwrap_or_default().to_string(),
                    state: rule["state"].as_str().unwrap_or_default().to_string(),
                    health: rule["health"].as_str().unwrap_or_default().to_string(),
                    last_error: rule["lastError"].as_str().unwrap_or_default().to_string(),
                });
            }
        }
        Ok(out)
    }
}

fn unix_now() -> u64 {
    unix_now_f64() as u64
}

/// Now in Unix seconds, as the server's API takes times (same host, same clock).
pub fn unix_now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// GET on the server's API from inside its namespace; the `data` of a successful answer.
fn api_get(netns: &Path, path: &str, params: &[(&str, &str)]) -> Result<Value> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .args(["curl", "-sf", "--max-time", "10", "-G"])
        .arg(format!("http://{LISTEN}{path}"));
    for (k, v) in params {
        cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
    }
    let body = run_checked(&mut cmd)?;
    let doc: Value =
        serde_json::from_str(&body).with_context(|| format!("{path}: not JSON: {body}"))?;
    ensure!(doc["status"] == "success", "{path}: {doc}");
    Ok(doc["data"].clone())
}

/// One alerting rule as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRule {
    pub name: String,
    pub state: String,
    pub health: String,
    pub last_error: String,
}

/// The value of a one-element vector result, if it is one.
pub fn scalar(result: &[Value]) -> Option<f64> {
    match result {
        [one] => one["value"][1].as_str()?.parse().ok(),
        _ => None,
    }
}

/// Every `expr` in a Grafana dashboard, with its variables replaced by what selects the lab's
/// series (`$guard_job` → guard, `$app_job` → app, instances → any, `$__rate_interval` → 1m).
pub fn dashboard_queries(dashboard: &str) -> Result<Vec<String>> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|v| walk(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let doc: Value = serde_json::from_str(dashboard).context("the dashboard is not JSON")?;
    let mut raw = Vec::new();
    walk(&doc, &mut raw);
    Ok(raw
        .into_iter()
        .map(|q| {
            q.replace("$guard_job", "guard")
                .replace("$app_job", "app")
                .replace("$app_instance", ".*")
                .replace("$instance", ".*")
                .replace("$__rate_interval", "1m")
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_names_both_jobs_and_the_rules() {
        let c = config(
            "198.18.96.2:9940",
            "198.18.96.2:8080",
            &[Path::new("/x/alerts.yml")],
        );
        assert!(c.contains(
            "job_name: guard\n    static_configs:\n      - targets: [\"198.18.96.2:9940\"]"
        ));
        assert!(c.contains(
            "job_name: app\n    static_configs:\n      - targets: [\"198.18.96.2:8080\"]"
        ));
        assert!(c.contains("rule_files:\n  - /x/alerts.yml\n"));
    }

    #[test]
    fn dashboard_variables_select_the_lab() {
        let d = r#"{"panels": [{"targets": [{"expr": "sum(rate(x{job=~\"$guard_job\", instance=~\"$instance\"}[$__rate_interval]))"}]},
                    {"targets": [{"expr": "y{job=~\"$app_job\", instance=~\"$app_instance\"}"}]}]}"#;
        let q = dashboard_queries(d).unwrap();
        assert_eq!(
            q,
            [
                "sum(rate(x{job=~\"guard\", instance=~\".*\"}[1m]))",
                "y{job=~\"app\", instance=~\".*\"}"
            ]
        );
    }

    #[test]
    fn scalars_are_one_element_vectors() {
        let v: Vec<Value> = serde_json::from_str(r#"[{"metric": {}, "value": [1, "2"]}]"#).unwrap();
        assert_eq!(scalar(&v), Some(2.0));
        assert_eq!(scalar(&[]), None);
    }
}
