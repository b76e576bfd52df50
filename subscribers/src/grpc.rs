//! A `Subscribe` stream client.

use dongbo_proto::v1::subscribe_client::SubscribeClient;
use dongbo_proto::v1::{subscriber_message, SubscribeAck, SubscribeOpen, SubscriberMessage, SubscriptionMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::Streaming;

use crate::Received;

/// TLS to the hub: the CA of its certificate and, for mutual TLS, this subscriber's certificate and
/// key (it names the subscriber: `spiffe://<trust domain>/subscriber/<id>`). PEM files.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// The hub's CA.
    pub ca_file: Option<std::path::PathBuf>,
    /// This subscriber's certificate.
    pub cert_file: Option<std::path::PathBuf>,
    /// Its private key.
    pub key_file: Option<std::path::PathBuf>,
}

impl TlsFiles {
    fn client_config(&self) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let Some(ca) = &self.ca_file else { return Ok(None) };
        let read =
            |p: &std::path::Path| std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()));
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(c), Some(k)) = (&self.cert_file, &self.key_file) {
            tls = tls.identity(Identity::from_pem(read(c)?, read(k)?));
        }
        Ok(Some(tls))
    }
}

/// An open subscription stream.
pub struct Subscription {
    acks: mpsc::Sender<SubscriberMessage>,
    inbound: Streaming<SubscriptionMessage>,
}

impl Subscription {
    /// Connects to the hub at `url` (`http://host:port`) as the subscriber owning `token` and opens
    /// `subscription`, after `resume_token` if given, else after the last acknowledgement.
    pub async fn open(
        url: &str,
        token: &str,
        subscription: &str,
        resume_token: Option<&str>,
        window: u32,
    ) -> anyhow::Result<Self> {
        Self::open_with(url, token, &TlsFiles::default(), subscription, resume_token, window).await
    }

    /// [`Self::open`] over TLS (`https://` url) with `tls`.
    pub async fn open_with(
        url: &str,
        token: &str,
        tls: &TlsFiles,
        subscription: &str,
        resume_token: Option<&str>,
        window: u32,
    ) -> anyhow::Result<Self> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?.tcp_nodelay(true);
        if let Some(config) = tls.client_config()? {
            endpoint = endpoint.tls_config(config)?;
        }
        let channel = endpoint.connect().await?;
        let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
        let mut client = SubscribeClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", auth.clone());
            Ok(req)
        })
        .accept_compressed(CompressionEncoding::Zstd);
        let (tx, rx) = mpsc::channel(64);
        let open = SubscribeOpen {
            subscription_id: subscription.into(),
            resume_token: resume_token.unwrap_or_default().into(),
            window,
        };
        tx.send(SubscriberMessage { kind: Some(subscriber_message::Kind::Open(open)) }).await?;
        let inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self { acks: tx, inbound })
    }

    /// The next records; `None` when the hub ended the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<Vec<Received>>> {
        let Some(msg) = self.inbound.message().await? else { return Ok(None) };
        msg.deliveries
            .into_iter()
            .map(|d| {
                Ok(Received {
                    body: serde_json::from_str(&d.json)?,
                    event_id: d.event_id,
                    name: d.name,
                    resume_token: d.resume_token,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map(Some)
    }

    /// Acknowledges every record up to and including `resume_token`.
    pub async fn ack(&self, resume_token: &str) -> anyhow::Result<()> {
        let ack = SubscribeAck { resume_token: resume_token.into() };
        self.acks.send(SubscriberMessage { kind: Some(subscriber_message::Kind::Ack(ack)) }).await?;
        Ok(())
    }
}
