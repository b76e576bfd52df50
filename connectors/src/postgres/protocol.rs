//! A small client for the Postgres streaming replication protocol, on `postgres-protocol`.
//!
//! Stock `tokio-postgres` has no replication mode, and the crates.io replication clients we looked at
//! either hide the standby status updates we must control (we confirm an LSN only once the change is
//! durable in the agent's spool) or pull in a runtime of their own. The protocol needed here is small:
//! a startup packet with `replication=database`, authentication (cleartext, MD5, SCRAM-SHA-256),
//! simple queries for `CREATE_REPLICATION_SLOT`, and CopyBoth streaming for `START_REPLICATION`.
//! See <https://www.postgresql.org/docs/15/protocol-replication.html>.
//!
//! Keepalives: the server sends a primary keepalive (`k`) when it has nothing else to send; when its
//! reply flag is set we must answer with a standby status update (`r`) at once, or the walsender ends
//! the connection after `wal_sender_timeout`.

use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, Framed};

use super::session::Target;
use super::tls::HandshakeError;
use crate::error::SourceError;
use crate::model::Lsn;

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One backend message: its type byte and body.
struct BackendMessage {
    tag: u8,
    body: Bytes,
}

/// Splits the byte stream into backend messages; writes frontend messages through unchanged.
struct PgCodec;

/// Largest message we accept: a single row change can carry a 1 GB TOASTed value.
const MAX_MESSAGE_BYTES: usize = 1 << 30;

impl Decoder for PgCodec {
    type Item = BackendMessage;
    type Error = std::io::Error;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BackendMessage>, std::io::Error> {
        Ok(decode_frame(src)?.map(|(tag, body)| BackendMessage { tag, body }))
    }
}

/// Splits one backend message (tag, body) off the front of `src`, or `None` until it is whole. A
/// length outside 4..=1 GiB is an error: a broken or hostile server cannot make us reserve more.
pub fn decode_frame(src: &mut BytesMut) -> Result<Option<(u8, Bytes)>, std::io::Error> {
    if src.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
    if !(4..=MAX_MESSAGE_BYTES).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("backend message length {len} out of range"),
        ));
    }
    if src.len() < len + 1 {
        src.reserve(len + 1 - src.len());
        return Ok(None);
    }
    let tag = src[0];
    src.advance(5);
    Ok(Some((tag, src.split_to(len - 4).freeze())))
}

/// Parses the body of a CopyData message received while streaming: XLogData or a keepalive.
pub fn replication_message(mut body: Bytes) -> Result<ReplicationMessage, SourceError> {
    if body.is_empty() {
        return Err(SourceError::Protocol("empty CopyData".into()));
    }
    match body.get_u8() {
        b'w' if body.len() >= 24 => {
            let _start = body.get_u64();
            let wal_end = Lsn(body.get_u64());
            let _send_time = body.get_i64();
            Ok(ReplicationMessage::XLogData { wal_end, data: body })
        }
        b'k' if body.len() >= 17 => {
            let wal_end = Lsn(body.get_u64());
            let _send_time = body.get_i64();
            let reply = body.get_u8() == 1;
            Ok(ReplicationMessage::Keepalive { wal_end, reply })
        }
        other => {
            Err(SourceError::Protocol(format!("replication message {:?} of {} bytes", other as char, body.len() + 1)))
        }
    }
}

impl Encoder<Bytes> for PgCodec {
    type Error = std::io::Error;
    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

/// A message read while streaming.
#[derive(Debug)]
pub enum ReplicationMessage {
    /// WAL data: for pgoutput, one logical decoding message.
    XLogData {
        /// End of WAL on the server when it sent this.
        wal_end: Lsn,
        /// The pgoutput message.
        data: Bytes,
    },
    /// The server is alive; `reply` asks for a status update now.
    Keepalive {
        /// End of WAL on the server.
        wal_end: Lsn,
        /// Whether the server wants an answer at once.
        reply: bool,
    },
}

/// A connection in replication mode (`replication=database`).
pub struct ReplicationConnection {
    framed: Framed<Pin<Box<dyn Io>>, PgCodec>,
}

impl ReplicationConnection {
    /// Connects, authenticates and waits until the server is ready for queries.
    /// TLS as `p.tls` asks: the SSLRequest, then rustls, and SCRAM bound to the TLS session.
    pub async fn connect(p: &Target<'_>) -> Result<Self, SourceError> {
        let tls_error = |reason: String| SourceError::Tls(format!("TLS to {}:{}: {reason}", p.host, p.port));
        let tls = p.tls.connector(p.host).map_err(|e| tls_error(e.0))?;
        let mut server_end_point = None;
        let io: Pin<Box<dyn Io>> = if p.host.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", p.host, p.port);
            Box::pin(tokio::net::UnixStream::connect(path).await?)
        } else {
            let s = tokio::net::TcpStream::connect((p.host, p.port)).await?;
            s.set_nodelay(true)?;
            match tls {
                None => Box::pin(s),
                Some(tls) => {
                    let stream = tls.start(s).await.map_err(|e| match e {
                        HandshakeError::Certificate(reason) => tls_error(reason),
                        HandshakeError::Io(e) => SourceError::Io(e),
                    })?;
                    server_end_point = stream.server_end_point();
                    Box::pin(stream)
                }
            }
        };
        let mut conn = Self { framed: Framed::with_capacity(io, PgCodec, 256 * 1024) };
        let mut buf = BytesMut::new();
        let params = [
            ("user", p.user),
            ("database", p.database),
            ("replication", "database"),
            ("application_name", p.application),
            // The walsender prints values with these settings: keep temporal text unambiguous.
            ("options", super::session::SESSION_OPTIONS),
        ];
        frontend::startup_message(params.iter().copied(), &mut buf)?;
        conn.send(buf).await?;
        conn.authenticate(p, server_end_point).await?;
        conn.wait_ready().await?;
        Ok(conn)
    }

    async fn send(&mut self, buf: BytesMut) -> Result<(), SourceError> {
        self.framed.send(buf.freeze()).await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<BackendMessage, SourceError> {
        match self.framed.next().await {
            Some(m) => Ok(m?),
            None => Err(SourceError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the source server closed the replication connection",
            ))),
        }
    }

    async fn authenticate(&mut self, p: &Target<'_>, mut server_end_point: Option<Vec<u8>>) -> Result<(), SourceError> {
        let password = || {
            p.password.ok_or_else(|| SourceError::Auth("the server asks for a password and none is configured".into()))
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let m = self.recv().await?;
            match m.tag {
                b'R' => {
                    let (code, body) = auth_request(m.body.clone())?;
                    let mut buf = BytesMut::new();
                    match code {
                        0 => return Ok(()),
                        3 => frontend::password_message(password()?.as_bytes(), &mut buf)?,
                        5 => {
                            let salt: [u8; 4] = body
                                .get(..4)
                                .and_then(|s| s.try_into().ok())
                                .ok_or_else(|| SourceError::Protocol("short md5 salt".into()))?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                p.user.as_bytes(),
                                password()?.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut buf)?;
                        }
                        10 => {
                            let mechanisms = String::from_utf8_lossy(&body);
                            let offered = |name: &str| mechanisms.split('\0').any(|m| m == name);
                            // As libpq: bind to the TLS session when both sides can; say "could, but
                            // you did not offer it" when only we can, so a downgrade is detected.
                            let (mechanism, binding) = match server_end_point.take() {
                                Some(h) if offered("SCRAM-SHA-256-PLUS") => {
                                    ("SCRAM-SHA-256-PLUS", ChannelBinding::tls_server_end_point(h))
                                }
                                Some(_) => ("SCRAM-SHA-256", ChannelBinding::unrequested()),
                                None => ("SCRAM-SHA-256", ChannelBinding::unsupported()),
                            };
                            if !offered("SCRAM-SHA-256") && mechanism == "SCRAM-SHA-256" {
                                return Err(SourceError::Auth(format!(
                                    "the server offers only SASL mechanisms {mechanisms:?}"
                                )));
                            }
                            let s = ScramSha256::new(password()?.as_bytes(), binding);
                            frontend::sasl_initial_response(mechanism, s.message(), &mut buf)?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| SourceError::Protocol("SASL continue before SASL start".into()))?;
                            s.update(&body).map_err(|e| SourceError::Auth(e.to_string()))?;
                            frontend::sasl_response(s.message(), &mut buf)?;
                        }
                        12 => {
                            let mut s = scram
                                .take()
                                .ok_or_else(|| SourceError::Protocol("SASL final before SASL start".into()))?;
                            s.finish(&body).map_err(|e| SourceError::Auth(e.to_string()))?;
                            continue;
                        }
                        other => return Err(SourceError::Auth(format!("unsupported authentication method {other}"))),
                    }
                    self.send(buf).await?;
                }
                b'E' => return Err(auth_or_server_error(&m.body)),
                other => {
                    return Err(SourceError::Protocol(format!("message {:?} during authentication", other as char)))
                }
            }
        }
    }

    async fn wait_ready(&mut self) -> Result<(), SourceError> {
        loop {
            let m = self.recv().await?;
            match m.tag {
                b'Z' => return Ok(()),
                b'E' => return Err(server_error(&m.body)),
                _ => {} // ParameterStatus, BackendKeyData, notices
            }
        }
    }

    /// Runs a simple-protocol command and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf)?;
        self.send(buf).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let m = self.recv().await?;
            match m.tag {
                b'D' => rows.push(parse_data_row(m.body)?),
                b'E' => error = Some(server_error(&m.body)),
                b'Z' => break,
                _ => {} // RowDescription, CommandComplete, notices
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Sends `START_REPLICATION` and waits for the server to enter CopyBoth mode.
    pub async fn start_replication(&mut self, slot: &str, start: Lsn, publication: &str) -> Result<(), SourceError> {
        let sql = format!(
            "START_REPLICATION SLOT {slot} LOGICAL {start} (proto_version '1', publication_names '{publication}')"
        );
        let mut buf = BytesMut::new();
        frontend::query(&sql, &mut buf)?;
        self.send(buf).await?;
        loop {
            let m = self.recv().await?;
            match m.tag {
                b'W' => return Ok(()),
                b'E' => return Err(server_error(&m.body)),
                b'N' => {}
                other => {
                    return Err(SourceError::Protocol(format!(
                        "message {:?} instead of CopyBothResponse",
                        other as char
                    )))
                }
            }
        }
    }

    /// The next replication message. Cancel safe: nothing is consumed unless it is returned.
    pub async fn next_message(&mut self) -> Result<ReplicationMessage, SourceError> {
        loop {
            let m = self.recv().await?;
            match m.tag {
                b'd' => return replication_message(m.body),
                b'E' => return Err(server_error(&m.body)),
                b'c' => {
                    return Err(SourceError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the source server ended replication (CopyDone)",
                    )))
                }
                b'N' => {}
                other => return Err(SourceError::Protocol(format!("message {:?} while streaming", other as char))),
            }
        }
    }

    /// Sends a standby status update: everything up to `released` may be recycled by the server;
    /// with `reply`, the server answers at once with a keepalive saying how far it has sent.
    pub async fn send_status(&mut self, released: Lsn, reply: bool) -> Result<(), SourceError> {
        let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
        let mut payload = BytesMut::with_capacity(34);
        payload.put_u8(b'r');
        payload.put_u64(released.0); // written
        payload.put_u64(released.0); // flushed
        payload.put_u64(released.0); // applied
        payload.put_i64(now_us - PG_EPOCH_OFFSET_US);
        payload.put_u8(u8::from(reply));
        let mut buf = BytesMut::with_capacity(39);
        buf.put_u8(b'd');
        buf.put_i32(4 + payload.len() as i32);
        buf.extend_from_slice(&payload);
        self.send(buf).await
    }
}

/// The method code of an AuthenticationRequest and the rest of its body; a body too short to hold
/// the code is a protocol error, not a panic (a broken or hostile server may send one).
pub fn auth_request(mut body: Bytes) -> Result<(i32, Bytes), SourceError> {
    if body.len() < 4 {
        return Err(SourceError::Protocol(format!("authentication request of {} bytes, too short", body.len())));
    }
    let code = body.get_i32();
    Ok((code, body))
}

/// Parses a DataRow of a simple query's result as text columns.
pub fn parse_data_row(mut body: Bytes) -> Result<Vec<Option<String>>, SourceError> {
    let short = || SourceError::Protocol("short DataRow".into());
    if body.len() < 2 {
        return Err(short());
    }
    let n = body.get_i16();
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if body.len() < 4 {
            return Err(short());
        }
        let len = body.get_i32();
        if len < 0 {
            row.push(None);
        } else {
            let len = len as usize;
            if body.len() < len {
                return Err(short());
            }
            row.push(Some(String::from_utf8_lossy(&body.split_to(len)).into_owned()));
        }
    }
    Ok(row)
}

/// The SQLSTATE and message of an ErrorResponse.
fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    for field in body.split(|&b| b == 0) {
        if let Some((&kind, text)) = field.split_first() {
            match kind {
                b'C' => code = String::from_utf8_lossy(text).into_owned(),
                b'M' => message = String::from_utf8_lossy(text).into_owned(),
                _ => {}
            }
        }
    }
    (code, message)
}

fn server_error(body: &[u8]) -> SourceError {
    let (code, message) = error_fields(body);
    SourceError::Server { code, message }
}

fn auth_or_server_error(body: &[u8]) -> SourceError {
    let (code, message) = error_fields(body);
    // 28xxx: invalid authorization; 3D000: the database does not exist. Retrying cannot fix either.
    if code.starts_with("28") || code == "3D000" {
        SourceError::Auth(message)
    } else {
        SourceError::Server { code, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_splits_messages_and_waits_for_whole_ones() {
        let mut buf = BytesMut::from(&b"Z\0\0\0\x05I"[..]);
        buf.extend_from_slice(b"d\0\0\0\x06a");
        let mut codec = PgCodec;
        let m = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!((m.tag, &m.body[..]), (b'Z', &b"I"[..]));
        assert!(codec.decode(&mut buf).unwrap().is_none(), "half a message must wait");
        buf.extend_from_slice(b"b");
        let m = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!((m.tag, &m.body[..]), (b'd', &b"ab"[..]));
    }

    #[test]
    fn short_replication_messages_are_errors_not_panics() {
        for body in [&b""[..], b"w", b"k", &[b'w'; 24], &[b'k'; 17], b"x123"] {
            assert!(replication_message(Bytes::copy_from_slice(body)).is_err(), "{body:?}");
        }
        let mut keepalive = vec![b'k'];
        keepalive.extend_from_slice(&7u64.to_be_bytes());
        keepalive.extend_from_slice(&0i64.to_be_bytes());
        keepalive.push(1);
        assert!(matches!(
            replication_message(Bytes::from(keepalive)).unwrap(),
            ReplicationMessage::Keepalive { wal_end: Lsn(7), reply: true }
        ));
    }

    #[test]
    fn short_authentication_requests_are_errors_not_panics() {
        for len in 0..4 {
            let err = auth_request(Bytes::from(vec![0; len])).unwrap_err();
            assert!(err.to_string().contains("too short"), "{err}");
        }
        let (code, rest) = auth_request(Bytes::from_static(&[0, 0, 0, 5, 1, 2, 3, 4])).unwrap();
        assert_eq!((code, rest.as_ref()), (5, &[1u8, 2, 3, 4][..]));
    }

    #[test]
    fn codec_refuses_absurd_lengths() {
        let mut buf = BytesMut::from(&b"d\0\0\0\x02"[..]);
        assert!(PgCodec.decode(&mut buf).is_err());
    }

    #[test]
    fn error_response_fields_are_read() {
        let body = b"SERROR\0C42704\0Mreplication slot \"x\" does not exist\0\0";
        match auth_or_server_error(body) {
            SourceError::Server { code, message } => {
                assert_eq!(code, "42704");
                assert!(message.contains("does not exist"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(auth_or_server_error(b"C28P01\0Mpassword authentication failed\0\0"), SourceError::Auth(_)));
    }
}
