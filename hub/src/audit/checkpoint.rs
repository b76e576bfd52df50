//! Signed checkpoints of the audit chain, kept outside the NDC.
//!
//! The chain in `dongbo.audit_log` shows an edit, an insertion or a deletion, but not a *consistent*
//! rewrite: whoever holds the hub's NDC role can delete a citizen's entries and re-chain everything
//! after them. So at a fixed interval the hub signs its chain head — last id, its hash, the time —
//! with an Ed25519 key that lives in a file on the hub host, never in the NDC, and appends the
//! signed checkpoint to an append-only file in a directory outside the NDC (optionally also POSTing
//! it to a witness URL run by someone else). [`super::verify`] then checks that the chain still
//! holds every checkpoint's hash at its id, so a rewrite of anything at or before the last
//! checkpoint is detected.
//!
//! Before signing, the checkpointer checks that the entries since the previous checkpoint link onto
//! it: a rewrite made between two checkpoints is refused a signature (and reported) rather than
//! anchored.
//!
//! # What is durable when
//! A checkpoint is fsynced to `checkpoints.jsonl` before it counts; a torn last line (a crash while
//! writing) is ignored by the reader, every other malformed or badly signed line is reported.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// What the signature covers is prefixed by this, so it cannot be confused with anything else signed.
const DOMAIN: &[u8] = b"dongbo audit checkpoint v1\0";

/// The checkpoint file inside the checkpoint directory.
const FILE: &str = "checkpoints.jsonl";

/// A signed statement that the audit chain had `hash` at entry `last_id` at time `at_us`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The chain head's entry id.
    pub last_id: i64,
    /// That entry's hash, hex.
    pub hash: String,
    /// When it was signed, microseconds since the epoch.
    pub at_us: i64,
    /// Ed25519 signature over the domain tag, `last_id`, `at_us` and the hash bytes, hex.
    pub signature: String,
}

/// Why checkpoints could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The key or checkpoint file could not be read or written.
    #[error("audit checkpoint file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The signing key file does not hold a key.
    #[error("audit signing key {0} must hold 64 hex digits (an Ed25519 secret key)")]
    BadKey(PathBuf),
    /// A checkpoint line is malformed or its signature does not hold.
    #[error("audit checkpoint {line} of {path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

fn message(last_id: i64, at_us: i64, hash: &[u8]) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(&last_id.to_be_bytes());
    m.extend_from_slice(&at_us.to_be_bytes());
    m.extend_from_slice(hash);
    m
}

/// Loads the signing key, creating one (mode 0600) if the file does not exist yet.
pub fn load_or_create_key(path: &Path) -> Result<SigningKey, CheckpointError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| CheckpointError::BadKey(path.to_path_buf()))?;
            Ok(SigningKey::from_bytes(&bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
            let key = SigningKey::from_bytes(&bytes);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io(path))?;
            }
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut f = options.open(path).map_err(io(path))?;
            f.write_all(hex::encode(bytes).as_bytes()).and_then(|()| f.sync_all()).map_err(io(path))?;
            Ok(key)
        }
        Err(e) => Err(io(path)(e)),
    }
}

/// The append-only checkpoint store: a directory on the hub host.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
}

impl CheckpointStore {
    /// The store in `dir` (created on first append).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Signs and durably appends a checkpoint of `(last_id, hash)`.
    pub fn append(
        &self,
        key: &SigningKey,
        last_id: i64,
        hash: &[u8],
        at_us: i64,
    ) -> Result<Checkpoint, CheckpointError> {
        let signature = key.sign(&message(last_id, at_us, hash));
        let cp = Checkpoint { last_id, hash: hex::encode(hash), at_us, signature: hex::encode(signature.to_bytes()) };
        let path = self.path();
        std::fs::create_dir_all(&self.dir).map_err(io(&path))?;
        let mut line = serde_json::to_string(&cp).expect("a checkpoint serialises");
        line.push('\n');
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
        f.write_all(line.as_bytes()).and_then(|()| f.sync_data()).map_err(io(&path))?;
        Ok(cp)
    }

    /// Every checkpoint, oldest first, each signature checked against `key`. Ids must not go back.
    pub fn read(&self, key: &VerifyingKey) -> Result<Vec<Checkpoint>, CheckpointError> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&path)(e)),
        };
        let complete = text.ends_with('\n');
        let lines: Vec<&str> = text.lines().collect();
        let mut out: Vec<Checkpoint> = Vec::with_capacity(lines.len());
        for (n, line) in lines.iter().enumerate() {
            let invalid = |problem: String| CheckpointError::Invalid { path: path.clone(), line: n + 1, problem };
            let cp: Checkpoint = match serde_json::from_str(line) {
                Ok(cp) => cp,
                // A crash while appending leaves a torn last line without its newline.
                Err(_) if n + 1 == lines.len() && !complete => break,
                Err(e) => return Err(invalid(format!("not a checkpoint: {e}"))),
            };
            let hash = hex::decode(&cp.hash).map_err(|_| invalid("hash is not hex".into()))?;
            let sig: [u8; 64] = hex::decode(&cp.signature)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| invalid("signature is not 64 hex bytes".into()))?;
            key.verify(&message(cp.last_id, cp.at_us, &hash), &Signature::from_bytes(&sig)).map_err(|_| {
                invalid("the signature does not hold: the file was edited or signed by another key".into())
            })?;
            if let Some(prev) = out.last() {
                if cp.last_id < prev.last_id {
                    return Err(invalid(format!("goes back from entry {} to {}", prev.last_id, cp.last_id)));
                }
            }
            out.push(cp);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_edits_are_refused() {
        let dir = std::env::temp_dir().join(format!("dongbo-cp-{}", rand::random::<u64>()));
        let key = load_or_create_key(&dir.join("key")).unwrap();
        assert_eq!(load_or_create_key(&dir.join("key")).unwrap().to_bytes(), key.to_bytes(), "the key is kept");
        let store = CheckpointStore::new(dir.join("cp"));
        store.append(&key, 5, &[1; 32], 100).unwrap();
        store.append(&key, 9, &[2; 32], 200).unwrap();
        let read = store.read(&key.verifying_key()).unwrap();
        assert_eq!(read.iter().map(|c| c.last_id).collect::<Vec<_>>(), vec![5, 9]);

        // A torn last line is a crash while appending, not tampering.
        let path = dir.join("cp").join(FILE);
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"last_id\":1").unwrap();
        assert_eq!(store.read(&key.verifying_key()).unwrap().len(), 2);

        // Moving a checkpoint to another id breaks its signature.
        let text = std::fs::read_to_string(&path).unwrap().replace("\"last_id\":9", "\"last_id\":4");
        std::fs::write(&path, text).unwrap();
        let err = store.read(&key.verifying_key()).unwrap_err().to_string();
        assert!(err.contains("signature does not hold"), "{err}");

        let other = SigningKey::from_bytes(&[7; 32]);
        let store2 = CheckpointStore::new(dir.join("cp2"));
        store2.append(&other, 1, &[3; 32], 1).unwrap();
        assert!(store2.read(&key.verifying_key()).is_err(), "signed by another key");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
