//! Reading Prometheus expositions the way Prometheus does: a GET of `/metrics` (with an operator
//! token for the hub's), and the value of one series written exactly, name and labels.

use std::time::{Duration, Instant};

/// GETs `url` (with the bearer `token` if given), retrying while nothing listens yet for 10 s:
/// status and body.
pub async fn get(url: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut req = reqwest::Client::new().get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        match req.send().await {
            Ok(r) => return Ok((r.status().as_u16(), r.text().await?)),
            Err(e) if e.is_connect() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => anyhow::bail!("GET {url}: {e:#}"),
        }
    }
}

/// The value of the series written exactly `series` (name and labels) in an exposition.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

/// Waits up to 30 s until the agent listening on `status_port` exports `series` with a value
/// `ready` accepts; returns the value.
pub async fn wait_agent(status_port: u16, series: &str, ready: impl Fn(f64) -> bool) -> anyhow::Result<f64> {
    let url = format!("http://127.0.0.1:{status_port}/metrics");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, text) = get(&url, None).await?;
        let v = value(&text, series).filter(|_| status == 200);
        if let Some(v) = v.filter(|v| ready(*v)) {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "{series} is {v:?} on the agent:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
