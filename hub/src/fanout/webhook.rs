//! Webhook delivery: each record is POSTed as JSON, signed as [`dongbo_proto::webhook`] says
//! (`X-Dongbo-Signature: t=…,v1=…`, HMAC-SHA256 over the time, the event id and the body), with its
//! id in `X-Dongbo-Event-Id`. Redirects are never followed: a receiver that answers 3xx gets the
//! record treated as refused, so a compromised or misconfigured receiver cannot point the hub's
//! citizen data at another host. The secret never appears in a log line or an admin answer.
//!
//! A record the receiver answers with an error is retried with exponential backoff up to
//! `max_attempts`, then goes to the subscription's dead-letter queue, and the cursor moves on. Later
//! records of the same citizen go straight to the queue behind it ("held"), so a citizen's records
//! never arrive out of order; other citizens flow on. A receiver that cannot be reached at all is not
//! the record's fault: the worker waits and retries without dead-lettering. Operators list and
//! replay the queue (admin API / CLI); a replay delivers in order and keeps what still fails.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use dongbo_proto::webhook;
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::projection::{Outgoing, Subscription};
use super::record::now_micros;
use super::state::DeadLetter;
use super::subscription::Delivery;
use super::{Command, Fanout};
use crate::audit::Entry;

/// Records read from the log per page.
const PAGE: usize = 500;

/// Why a POST failed.
enum Failure {
    /// The receiver answered, with an error: the record may be at fault.
    Answered(String),
    /// The receiver could not be reached.
    Unreachable(String),
}

struct Sender {
    client: reqwest::Client,
    url: String,
    secret: Vec<u8>,
    subscription: String,
}

impl Sender {
    async fn post(&self, event_id: &str, body: &[u8], attempt: u32) -> Result<(), Failure> {
        let response = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header(
                webhook::SIGNATURE_HEADER,
                webhook::sign(
                    &self.secret,
                    now_micros() / 1_000_000,
                    &hex::encode(rand::random::<[u8; 16]>()),
                    event_id,
                    body,
                ),
            )
            .header(webhook::EVENT_ID_HEADER, event_id)
            .header("x-dongbo-subscription", &self.subscription)
            .header("x-dongbo-attempt", attempt.to_string())
            .body(body.to_vec())
            .send()
            .await;
        match response {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) if r.status().is_redirection() => Err(Failure::Answered(format!(
                "the receiver answered {} (a redirect): the hub does not follow redirects; set the final URL",
                r.status()
            ))),
            Ok(r) => Err(Failure::Answered(format!("the receiver answered {}", r.status()))),
            Err(e) if e.is_connect() => Err(Failure::Unreachable(format!("cannot reach {}: {e}", self.url))),
            Err(e) => Err(Failure::Answered(format!("request failed: {e}"))),
        }
    }
}

/// Delivers one subscription until it is removed or replaced.
pub async fn run(fanout: Arc<Fanout>, sub: Arc<Subscription>, mut commands: mpsc::Receiver<Command>) {
    let Delivery::Webhook { url, max_attempts, initial_backoff_ms, max_backoff_ms, concurrency, .. } =
        &sub.def.delivery
    else {
        return;
    };
    let secret = match sub.def.delivery.webhook_secret() {
        Ok(s) => s,
        Err(e) => {
            warn!(subscription = %sub.def.id, error = %e, "cannot read the webhook secret; not delivering");
            return;
        }
    };
    let sender = Sender {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a plain HTTP client builds"),
        url: url.clone(),
        secret,
        subscription: sub.def.id.clone(),
    };
    let policy = || backoff::ExponentialBackoff {
        initial_interval: Duration::from_millis(*initial_backoff_ms),
        max_interval: Duration::from_millis(*max_backoff_ms),
        max_elapsed_time: None,
        ..Default::default()
    };
    let id = sub.def.id.clone();
    let mut end = fanout.log.end();
    loop {
        if !fanout.is_current(&sub).await {
            return;
        }
        while let Ok(cmd) = commands.try_recv() {
            handle(&fanout, &sub, &sender, cmd).await;
        }
        let limits = Limits { max_attempts: *max_attempts, concurrency: *concurrency };
        let result = deliver_page(&fanout, &sub, &sender, &limits, &policy).await;
        match result {
            Ok(true) => continue,
            Ok(false) => {
                tokio::select! {
                    _ = end.changed() => {}
                    cmd = commands.recv() => match cmd {
                        Some(cmd) => handle(&fanout, &sub, &sender, cmd).await,
                        None => return,
                    },
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Err(e) => {
                warn!(subscription = %id, error = %e, "webhook delivery paused; retrying in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

async fn handle(fanout: &Fanout, sub: &Subscription, sender: &Sender, cmd: Command) {
    match cmd {
        Command::Replay(reply) => {
            let _ = reply.send(replay(fanout, sub, sender).await);
        }
    }
}

/// Delivers one page from the cursor; `Ok(true)` when there may be more right away.
///
/// The page's audit entries are written in one go before any POST. Citizens are delivered
/// concurrently (up to `concurrency` at once), each citizen's records one after another; the cursor
/// moves past the page once every record in it was delivered or dead-lettered. A crash in between
/// delivers the page again, which at-least-once with stable event ids allows.
async fn deliver_page(
    fanout: &Fanout,
    sub: &Subscription,
    sender: &Sender,
    limits: &Limits,
    policy: &(impl Fn() -> backoff::ExponentialBackoff + Sync),
) -> Result<bool, String> {
    let id = &sub.def.id;
    let Some((outs, scanned)) = fanout.next_page(sub, PAGE)? else { return Ok(false) };
    let held: HashSet<String> =
        fanout.state.dead_letters(id).map_err(|e| e.to_string())?.into_iter().map(|d| d.citizen_id).collect();
    // Per citizen, in log order; citizens already in the dead-letter queue wait behind it.
    let mut lanes: Vec<Vec<usize>> = Vec::new();
    let mut lane_of: HashMap<&str, usize> = HashMap::new();
    let mut undelivered: Vec<(usize, String, u32)> = Vec::new();
    for (i, o) in outs.iter().enumerate() {
        if held.contains(&o.citizen_id) {
            undelivered.push((i, HELD.into(), 0));
            continue;
        }
        let lane = *lane_of.entry(o.citizen_id.as_str()).or_insert_with(|| {
            lanes.push(Vec::new());
            lanes.len() - 1
        });
        lanes[lane].push(i);
    }
    let entries: Vec<Entry> = lanes
        .iter()
        .flatten()
        .map(|&i| sub.audit_entry(&outs[i].citizen_id, &outs[i].event_id, &outs[i].fields))
        .collect();
    fanout.audit.record(&entries).await.map_err(|e| e.to_string())?;
    let failed: Vec<Vec<(usize, String, u32)>> = futures::stream::iter(lanes)
        .map(|lane| deliver_citizen(sender, &outs, lane, limits.max_attempts, policy))
        .buffer_unordered(limits.concurrency)
        .collect()
        .await;
    undelivered.extend(failed.into_iter().flatten());
    // The queue replays in the order letters were added, so add them in log order.
    undelivered.sort_by_key(|(i, _, _)| *i);
    let newest = outs
        .iter()
        .enumerate()
        .filter(|(i, _)| !undelivered.iter().any(|(u, _, _)| u == i))
        .map(|(_, o)| o.committed_at_us)
        .max();
    crate::metrics::hub().delivered(id, (outs.len() - undelivered.len()) as u64, newest);
    for (i, why, attempts) in undelivered {
        dead_letter(fanout, sub, &outs[i], &why, attempts).await?;
    }
    fanout.state.ack(id, scanned).await.map_err(|e| e.to_string())?;
    Ok(true)
}

/// Why a record is dead-lettered without being tried.
const HELD: &str = "held behind an earlier undelivered record of this citizen";

/// How hard a webhook subscription pushes.
struct Limits {
    max_attempts: u32,
    concurrency: usize,
}

/// POSTs one citizen's records (`lane`, indexes into `outs`) in order; returns the ones that could
/// not be delivered (the first failure and everything after it) with the reason and attempts made.
async fn deliver_citizen(
    sender: &Sender,
    outs: &[Outgoing],
    lane: Vec<usize>,
    max_attempts: u32,
    policy: &impl Fn() -> backoff::ExponentialBackoff,
) -> Vec<(usize, String, u32)> {
    let sub = &sender.subscription;
    let mut rest = lane.into_iter();
    while let Some(i) = rest.next() {
        let o = &outs[i];
        let body = serde_json::to_vec(&o.body).expect("records serialise");
        let mut wait = policy();
        let mut attempts = 0;
        let failure = loop {
            attempts += 1;
            match sender.post(&o.event_id, &body, attempts).await {
                Ok(()) => break None,
                Err(Failure::Unreachable(why)) => {
                    attempts -= 1;
                    warn!(subscription = %sub, reason = %why, "webhook receiver unreachable; waiting");
                }
                Err(Failure::Answered(why)) if attempts >= max_attempts => break Some(why),
                Err(Failure::Answered(why)) => {
                    warn!(subscription = %sub, event_id = %o.event_id, attempt = attempts, reason = %why, "webhook delivery failed; retrying");
                    crate::metrics::hub().retried(sub);
                }
            }
            tokio::time::sleep(wait.next_backoff().unwrap_or(Duration::from_secs(60))).await;
        };
        if let Some(why) = failure {
            warn!(subscription = %sub, event_id = %o.event_id, attempts, reason = %why, "webhook delivery dead-lettered");
            let mut out = vec![(i, why, attempts)];
            out.extend(rest.map(|i| (i, HELD.to_string(), 0)));
            return out;
        }
    }
    Vec::new()
}

async fn dead_letter(
    fanout: &Fanout,
    sub: &Subscription,
    o: &Outgoing,
    why: &str,
    attempts: u32,
) -> Result<(), String> {
    crate::metrics::hub().dead_lettered(&sub.def.id);
    let d = DeadLetter {
        id: 0,
        resume_token: o.cursor.token(),
        event_id: o.event_id.clone(),
        citizen_id: o.citizen_id.clone(),
        body: o.body.clone(),
        fields: o.fields.clone(),
        reason: why.into(),
        attempts,
        at_us: now_micros(),
    };
    fanout.state.dead_letter(&sub.def.id, d).await.map(|_| ()).map_err(|e| e.to_string())
}

/// Re-delivers the dead letters in order, once each; a citizen whose record fails again keeps the
/// rest of its records queued. Returns (delivered, still queued).
async fn replay(fanout: &Fanout, sub: &Subscription, sender: &Sender) -> Result<(u64, u64), String> {
    let id = &sub.def.id;
    let letters = fanout.state.dead_letters(id).map_err(|e| e.to_string())?;
    let (mut delivered, mut kept) = (0, 0);
    let mut failed: HashSet<String> = HashSet::new();
    for mut d in letters {
        if failed.contains(&d.citizen_id) {
            kept += 1;
            continue;
        }
        let e = sub.audit_entry(&d.citizen_id, &d.event_id, &d.fields);
        fanout.audit.record(&[e]).await.map_err(|e| e.to_string())?;
        let body = serde_json::to_vec(&d.body).expect("records serialise");
        match sender.post(&d.event_id, &body, d.attempts + 1).await {
            Ok(()) => {
                fanout.state.drop_dead_letter(id, d.id).await.map_err(|e| e.to_string())?;
                crate::metrics::hub().delivered(id, 1, None);
                delivered += 1;
            }
            Err(Failure::Answered(why) | Failure::Unreachable(why)) => {
                d.attempts += 1;
                d.reason = why;
                fanout.state.update_dead_letter(id, &d).await.map_err(|e| e.to_string())?;
                failed.insert(d.citizen_id.clone());
                kept += 1;
            }
        }
    }
    info!(subscription = %id, delivered, kept, "dead letters replayed");
    Ok((delivered, kept))
}
