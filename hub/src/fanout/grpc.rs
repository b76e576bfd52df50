//! The `Subscribe` gRPC stream: a subscriber opens its subscription (optionally at a resume token),
//! receives projected records in log order and acknowledges tokens; the hub stores the last
//! acknowledged token durably and a reconnecting subscriber continues right after it.
//!
//! At most `window` records are unacknowledged at a time, so a slow subscriber costs the hub a
//! window of memory, not a backlog. The newest stream of a subscription wins: an older one (a
//! half-dead connection the subscriber already replaced) ends at its next step.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dongbo_proto::v1::{
    subscribe_server::Subscribe, subscriber_message, Delivery as PbDelivery, SubscriberMessage, SubscriptionMessage,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use super::log::Cursor;
use super::projection::Subscription;
use super::subscription::Delivery;
use super::Fanout;
use crate::audit::Entry;
use crate::auth::Authenticator;

/// Records in flight when the subscriber does not say.
const DEFAULT_WINDOW: u32 = 256;

/// The service.
pub struct SubscribeService {
    fanout: Arc<Fanout>,
    auth: Arc<Authenticator>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl SubscribeService {
    /// A service over `fanout` for the subscribers `auth` knows; its streams end when `stop` turns true.
    pub fn new(fanout: Arc<Fanout>, auth: Arc<Authenticator>, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { fanout, auth, stop }
    }
}

type Out = Pin<Box<dyn Stream<Item = Result<SubscriptionMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Subscribe for SubscribeService {
    type StreamStream = Out;

    async fn stream(&self, request: Request<Streaming<SubscriberMessage>>) -> Result<Response<Out>, Status> {
        let subscriber = crate::grpc_peer::identify(&self.auth, &request, crate::grpc_peer::Kind::Subscriber)?;
        let mut inbound = request.into_inner();
        let open = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Err(_) => return Err(Status::invalid_argument("no Open within 10 s")),
            Ok(m) => m?.and_then(|m| m.kind),
        };
        let Some(subscriber_message::Kind::Open(open)) = open else {
            return Err(Status::invalid_argument("the first message must be Open"));
        };
        let sub = self
            .fanout
            .get(&open.subscription_id)
            .await
            .ok_or_else(|| Status::not_found(format!("no subscription {}", open.subscription_id)))?;
        if sub.def.subscriber != subscriber {
            return Err(Status::permission_denied(format!(
                "subscription {} belongs to another subscriber",
                sub.def.id
            )));
        }
        if sub.def.delivery != Delivery::Grpc {
            return Err(Status::failed_precondition(format!(
                "subscription {} is delivered by {}, not gRPC",
                sub.def.id,
                sub.def.delivery.channel()
            )));
        }
        let acked = self.fanout.acked(&sub.def.id).map_err(|e| Status::internal(e.to_string()))?.unwrap_or_default();
        let from = if open.resume_token.is_empty() {
            acked
        } else {
            let c = Cursor::parse(&open.resume_token).ok_or_else(|| {
                Status::invalid_argument(format!("resume token {:?} is not valid", open.resume_token))
            })?;
            let first = self.fanout.log.first().map_err(|e| Status::internal(e.to_string()))?;
            let start = self.fanout.state.start(&sub.def.id).map_err(|e| Status::internal(e.to_string()))?;
            if let Some(start) = start.filter(|s| c < *s) {
                return Err(Status::out_of_range(format!(
                    "resume token {} is before subscription {}'s start ({}): its grant does not reach back there",
                    open.resume_token,
                    sub.def.id,
                    start.token()
                )));
            }
            if c.chunk < first {
                return Err(Status::out_of_range(format!(
                    "resume token {} is older than the log's retention (oldest chunk {first}); resume without a token to continue from the last acknowledgement",
                    open.resume_token
                )));
            }
            c
        };
        let window = if open.window == 0 { DEFAULT_WINDOW } else { open.window.min(10_000) } as usize;
        let generation = {
            let mut g = self.fanout.generations.lock().expect("generation lock");
            let n = g.entry(sub.def.id.clone()).or_default();
            *n += 1;
            *n
        };
        info!(subscription = %sub.def.id, subscriber, from = %from.token(), "subscriber connected");
        let (tx, rx) = mpsc::channel(4);
        let fanout = self.fanout.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let served = tokio::select! {
                r = serve(&fanout, &sub, from, window, generation, inbound, &tx) => r,
                // What was sent and not acknowledged is sent again on the next stream.
                _ = stop.wait_for(|s| *s) => Err(Status::unavailable("the hub is stopping; reconnect and resume")),
            };
            if let Err(status) = served {
                warn!(subscription = %sub.def.id, error = %status.message(), "subscriber stream ended");
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn serve(
    fanout: &Fanout,
    sub: &Arc<Subscription>,
    from: Cursor,
    window: usize,
    generation: u64,
    mut inbound: Streaming<SubscriberMessage>,
    tx: &mpsc::Sender<Result<SubscriptionMessage, Status>>,
) -> Result<(), Status> {
    let id = &sub.def.id;
    let internal = |e: &dyn std::fmt::Display| Status::internal(e.to_string());
    let mut end = fanout.log.end();
    let mut next = from;
    // Tokens sent and not yet acknowledged, in order.
    let mut in_flight: VecDeque<Cursor> = VecDeque::new();
    loop {
        let current = fanout.generations.lock().expect("generation lock").get(id).copied() == Some(generation);
        if !current || !fanout.is_current(sub).await {
            return Err(Status::aborted("a newer stream of this subscription took over (or it was removed)"));
        }
        let room = window.saturating_sub(in_flight.len());
        let mut progressed = false;
        if room > 0 {
            let (items, scanned) = fanout.log.read(next, room, sub.follows_tables).map_err(|e| internal(&e))?;
            let out: Vec<_> = items.iter().filter_map(|(c, item)| sub.project(*c, item)).collect();
            if !out.is_empty() {
                let entries: Vec<Entry> =
                    out.iter().map(|o| sub.audit_entry(&o.citizen_id, &o.event_id, &o.fields)).collect();
                fanout.audit.record(&entries).await.map_err(|e| Status::unavailable(e.to_string()))?;
                let deliveries = out
                    .iter()
                    .map(|o| PbDelivery {
                        resume_token: o.cursor.token(),
                        event_id: o.event_id.clone(),
                        name: o.name.clone(),
                        json: serde_json::to_string(&o.body).expect("records serialise"),
                    })
                    .collect();
                in_flight.extend(out.iter().map(|o| o.cursor));
                if tx.send(Ok(SubscriptionMessage { deliveries })).await.is_err() {
                    return Ok(());
                }
                let newest = out.iter().map(|o| o.committed_at_us).max();
                crate::metrics::hub().delivered(id, out.len() as u64, newest);
            } else if in_flight.is_empty() && scanned > next {
                // Nothing for this subscriber in what was scanned: remember that without an ack.
                fanout.state.ack(id, scanned).await.map_err(|e| internal(&e))?;
            }
            progressed = scanned > next;
            next = scanned;
        }
        if progressed && room > 0 {
            // Drain acknowledgements that already arrived, then read on.
            while let Some(Ok(Some(m))) = futures::FutureExt::now_or_never(inbound.message()) {
                handle_ack(fanout, id, m, &mut in_flight).await?;
            }
            continue;
        }
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(m)) => handle_ack(fanout, id, m, &mut in_flight).await?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(Status::cancelled(format!("subscriber went away: {e}"))),
            },
            _ = end.changed(), if room > 0 => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn handle_ack(
    fanout: &Fanout,
    id: &str,
    m: SubscriberMessage,
    in_flight: &mut VecDeque<Cursor>,
) -> Result<(), Status> {
    let Some(subscriber_message::Kind::Ack(ack)) = m.kind else {
        return Err(Status::invalid_argument("after Open, a subscriber sends only Ack"));
    };
    let c = Cursor::parse(&ack.resume_token)
        .ok_or_else(|| Status::invalid_argument(format!("ack token {:?} is not valid", ack.resume_token)))?;
    while in_flight.front().is_some_and(|f| *f <= c) {
        in_flight.pop_front();
    }
    fanout.state.ack(id, c).await.map_err(|e| Status::internal(e.to_string()))
}
