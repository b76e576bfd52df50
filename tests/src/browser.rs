//! A real headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`):
//! the W3C WebDriver protocol is plain HTTP and JSON, spoken here with reqwest.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// The key W3C WebDriver names an element by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session in it.
pub struct Browser {
    driver: Child,
    base: String,
    http: reqwest::Client,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub async fn start() -> anyhow::Result<Self> {
        let port = crate::pg::free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("chromedriver: install Debian's chromium and chromium-driver (./deploy/install-deps.sh)")?;
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{root}/status")).send().await.is_err() {
            if Instant::now() > deadline {
                bail!("chromedriver did not answer on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1000", "--user-data-dir=/tmp/dongbo-chromium-".to_string() + &port.to_string()],
            },
        } } });
        let created: Value = http.post(format!("{root}/session")).json(&caps).send().await?.json().await?;
        let id = created["value"]["sessionId"].as_str().with_context(|| format!("no WebDriver session: {created}"))?;
        Ok(Self { driver, base: format!("{root}/session/{id}"), http })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let answer: Value = req.send().await?.json().await?;
        if let Some(error) = answer["value"]["error"].as_str() {
            bail!("WebDriver {path}: {error}: {}", answer["value"]["message"]);
        }
        Ok(answer["value"].clone())
    }

    /// Loads `url`.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await.map(|_| ())
    }

    /// The current URL.
    pub async fn url(&self) -> anyhow::Result<String> {
        Ok(self.call(reqwest::Method::GET, "/url", None).await?.as_str().unwrap_or_default().to_string())
    }

    /// Waits (up to 15 s) until the page's URL ends with `suffix`: a click that navigates returns
    /// before the next page has loaded.
    pub async fn wait_url(&self, suffix: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let url = self.url().await?;
            if url.ends_with(suffix) {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "the page is {url}, not …{suffix}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The text of the element `css` once it exists (up to 15 s) and `ok` holds for it.
    pub async fn wait_text(&self, css: &str, ok: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = self.text(css).await.unwrap_or_default();
            if ok(&text) {
                return Ok(text);
            }
            anyhow::ensure!(Instant::now() < deadline, "{css} reads {text:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The element matching the CSS selector `css`.
    pub async fn find(&self, css: &str) -> anyhow::Result<String> {
        let found = self
            .call(reqwest::Method::POST, "/element", Some(json!({ "using": "css selector", "value": css })))
            .await?;
        found[ELEMENT].as_str().map(str::to_string).with_context(|| format!("no element {css}"))
    }

    /// Types `text` into the element `css`.
    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let e = self.find(css).await?;
        self.call(reqwest::Method::POST, &format!("/element/{e}/value"), Some(json!({ "text": text })))
            .await
            .map(|_| ())
    }

    /// Clicks the element `css`.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let e = self.find(css).await?;
        self.call(reqwest::Method::POST, &format!("/element/{e}/click"), Some(json!({}))).await.map(|_| ())
    }

    /// The visible text of the element `css`.
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        let e = self.find(css).await?;
        Ok(self
            .call(reqwest::Method::GET, &format!("/element/{e}/text"), None)
            .await?
            .as_str()
            .unwrap_or_default()
            .into())
    }

    /// An attribute of the element `css`.
    pub async fn attribute(&self, css: &str, name: &str) -> anyhow::Result<Option<String>> {
        let e = self.find(css).await?;
        Ok(self
            .call(reqwest::Method::GET, &format!("/element/{e}/attribute/{name}"), None)
            .await?
            .as_str()
            .map(str::to_string))
    }

    /// Saves a PNG of the page to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine;
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap_or_default())?;
        anyhow::ensure!(bytes.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        std::fs::write(path, bytes)?;
        Ok(())
    }
}

impl Browser {
    /// Ends the session (Chromium exits with it), then chromedriver.
    pub async fn close(self) {
        let _ = self.http.delete(&self.base).send().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
