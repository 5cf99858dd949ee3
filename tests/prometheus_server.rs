//! A real Prometheus server scrapes a real `observer serve` while a real
//! gunicorn pool is saturated: the shipped saturation alert fires and
//! resolves, and every query of the shipped Grafana dashboard returns data.
mod support;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use support::{Daemon, free_port, reuseport_pair_with_a_stopped_holder, ss_listen_queues, until};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A child killed (and its directory removed) on drop.
struct Running(Child, PathBuf);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// GET against the Prometheus HTTP API, parsed.
fn api(port: u16, path_and_query: &str) -> serde_json::Value {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return serde_json::Value::Null; // not up yet
    };
    let mut text = String::new();
    if write!(s, "GET {path_and_query} HTTP/1.0\r\n\r\n").is_err()
        || s.read_to_string(&mut text).is_err()
    {
        return serde_json::Value::Null;
    }
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

fn start_prometheus(observer_port: u16) -> (Running, u16) {
    let dir = std::env::temp_dir().join(format!("observer-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    // The shipped rules, with `for:` shortened so the test need not wait minutes.
    let rules =
        std::fs::read_to_string(repo("deploy/prometheus/observer.rules.yml")).expect("rules");
    let rules: String = rules
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for:") {
                l.split("for:").next().unwrap_or("").to_owned() + "for: 0s"
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("rules.yml"), rules).expect("write rules");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yml]\n\
             scrape_configs:\n  - job_name: observer\n    static_configs:\n      - targets: ['127.0.0.1:{observer_port}']\n"
        ),
    )
    .expect("write config");
    let port = free_port();
    let child = Command::new("prometheus")
        .args([
            "--config.file=prometheus.yml",
            "--storage.tsdb.path=data",
            &format!("--web.listen-address=127.0.0.1:{port}"),
        ])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (cargo xtask setup installs it)");
    let running = Running(child, dir);
    until("prometheus to be ready", 30, || {
        api(port, "/api/v1/status/buildinfo")["status"]
            .as_str()
            .map(|_| ())
    });
    (running, port)
}

/// Every query of the autoscaling recipe (deploy/kubernetes/autoscaling:
/// one per line), with its selector of a Deployment's pods swapped for the
/// listener on `port`; and the threshold it scales on, in seconds for the
/// waits.
fn autoscaling_queries(port: u16) -> Vec<(String, f64)> {
    let selector = format!("port=\"{port}\"");
    let mut queries = vec![];
    for file in ["keda-scaledobject.yaml", "prometheus-adapter-rules.yaml"] {
        let text = std::fs::read_to_string(repo(&format!("deploy/kubernetes/autoscaling/{file}")))
            .expect("autoscaling recipe");
        for line in text.lines().map(str::trim) {
            let Some(query) = line
                .strip_prefix("query: '")
                .or_else(|| line.strip_prefix("metricsQuery: '"))
                .and_then(|q| q.strip_suffix('\''))
            else {
                continue;
            };
            let query = query
                .replace(r#"namespace="shop", pod=~"web-.*""#, &selector)
                .replace("<<.LabelMatchers>>", &selector)
                .replace("<<.GroupBy>>", "port");
            let threshold = if query.contains("busy") { 3.0 } else { 0.1 };
            queries.push((query, threshold));
        }
    }
    assert_eq!(queries.len(), 4, "two queries in each file: {queries:?}");
    queries
}

/// The alerts named `name` for the listener on `port`.
fn alerts(prom: u16, name: &str, port: u16) -> Vec<serde_json::Value> {
    let port = port.to_string(); // labels are strings
    api(prom, "/api/v1/alerts")["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["labels"]["alertname"] == name && a["labels"]["port"] == port.as_str())
        .cloned()
        .collect()
}

fn saturation_alerts(prom: u16, port: u16) -> Vec<String> {
    alerts(prom, "ObserverWorkerPoolSaturated", port)
        .iter()
        .filter_map(|a| a["state"].as_str().map(str::to_owned))
        .collect()
}

/// The verdicts `observer:listener_verdict` gives the listener on `port`
/// (one, when the rules are right).
fn verdicts(prom: u16, port: u16) -> Vec<String> {
    let query = percent_encode(&format!("observer:listener_verdict{{port=\"{port}\"}}"));
    api(prom, &format!("/api/v1/query?query={query}"))["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["metric"]["verdict"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn prometheus_fires_and_resolves_the_saturation_alert_and_every_dashboard_query_returns_data() {
    // Program stats on: the dashboard's cost panel charts them.
    let daemon = Daemon::start_with(&["--collector.program-stats"]);
    let dir = std::env::temp_dir().join(format!("observer-prom-app-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("app.py"), "import time\ndef app(e, start_response):\n    time.sleep(0.5)\n    start_response('200 OK', [])\n    return [b'ok']\n").expect("app");
    let app_port = free_port();
    let gunicorn = Command::new("gunicorn")
        .args(["-w", "1", "-b", &format!("127.0.0.1:{app_port}"), "app:app"])
        .current_dir(&dir)
        .stderr(Stdio::null())
        .spawn()
        .expect("gunicorn");
    let _gunicorn = Running(gunicorn, dir);
    until("gunicorn to listen", 20, || {
        (!ss_listen_queues(app_port).is_empty()).then_some(())
    });
    // Meanwhile, a reuseport group with one socket's holder stopped: its
    // queued connections wait for good while the sibling's are accepted.
    let stalled_port = free_port();
    let (mut stopped, sibling) = reuseport_pair_with_a_stopped_holder(stalled_port);
    std::thread::spawn(move || while sibling.accept().is_ok() {});
    let _stalled: Vec<TcpStream> = (0..20)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", stalled_port)).ok())
        .collect();
    let stalled_since = Instant::now();
    let (_prometheus, prom) = start_prometheus(daemon.port);

    // 3 clients on 1 worker: it is always busy and 2 connections queue.
    let clients: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..12 {
                    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", app_port)) {
                        let _ = write!(s, "GET / HTTP/1.0\r\n\r\n");
                        let _ = s.read_to_end(&mut Vec::new());
                    }
                }
            })
        })
        .collect();
    until("the saturation alert to fire", 30, || {
        saturation_alerts(prom, app_port)
            .contains(&"firing".to_owned())
            .then_some(())
    });
    // The same cause, as the verdict rule says it (one verdict, not two).
    until("the saturated verdict", 30, || {
        (verdicts(prom, app_port) == ["saturated"]).then_some(())
    });
    // The autoscaling recipe's queries, for this listener: its one worker
    // busy, and connections waiting far over the 100 ms target.
    for (query, threshold) in autoscaling_queries(app_port) {
        let busy = query.contains("busy");
        let what = if busy {
            format!("{query} to say the one worker is busy")
        } else {
            format!("{query} to say connections wait over {threshold} s")
        };
        let value = until(&what, 20, || {
            let r = api(
                prom,
                &format!("/api/v1/query?query={}", percent_encode(&query)),
            );
            let value: f64 = r["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
            let expected = if busy {
                value == 1.0
            } else {
                value > threshold
            };
            expected.then_some(value)
        });
        println!("{query} = {value} (scales on {threshold})");
    }

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/observer.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(queries.len() >= 10, "{} queries", queries.len());
    for query in &queries {
        let concrete = query
            .replace("$addr", ".*")
            .replace("$path", ".*")
            .replace("$port", &app_port.to_string())
            .replace("$__rate_interval", "10s");
        let result = until(&format!("data for {concrete}"), 20, || {
            let r = api(
                prom,
                &format!("/api/v1/query?query={}", percent_encode(&concrete)),
            );
            (r["status"] == "success"
                && r["data"]["result"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty()))
            .then_some(r)
        });
        println!(
            "{concrete} → {} series",
            result["data"]["result"].as_array().map_or(0, |a| a.len())
        );
    }

    for c in clients {
        c.join().expect("client");
    }
    until("the saturation alert to resolve", 30, || {
        saturation_alerts(prom, app_port).is_empty().then_some(())
    });
    // The load is gone: it accepted in the last 5 minutes, nothing waits.
    until("the healthy verdict", 30, || {
        (verdicts(prom, app_port) == ["healthy"]).then_some(())
    });

    // Oldest wait over 30 s and grown by over 45 s in the last minute.
    let alert = until("the not-accepting alert to fire", 120, || {
        alerts(prom, "ObserverListenerNotAccepting", stalled_port)
            .into_iter()
            .find(|a| a["state"] == "firing")
    });
    let fired_after = stalled_since.elapsed().as_secs_f64();
    println!("ObserverListenerNotAccepting after {fired_after:.1} s: {alert}");
    assert!(
        fired_after >= 40.0,
        "fired after {fired_after} s of stall, before its thresholds allow"
    );
    let summary = alert["annotations"]["summary"].as_str().unwrap_or_default();
    assert!(
        summary.starts_with(&format!("Nobody accepts from 127.0.0.1:{stalled_port}:")),
        "{summary}"
    );
    assert!(
        alerts(prom, "ObserverListenerNotAccepting", app_port).is_empty(),
        "the saturated but accepting gunicorn listener is not flagged"
    );
    // The verdict group evaluates on its own schedule: the same condition,
    // as it crosses its thresholds, may be seen there a moment later.
    until("the not-accepting verdict", 30, || {
        (verdicts(prom, stalled_port) == ["not_accepting"]).then_some(())
    });
    assert!(
        alerts(prom, "ObserverWorkerAcceptsUneven", app_port).is_empty(),
        "one worker, so never uneven"
    );
    let _ = stopped.kill();
    let _ = stopped.wait();
}
