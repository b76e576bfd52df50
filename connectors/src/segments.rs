//! Batch payloads in append-only segment files.
//!
//! sled keeps every value it has written resident in memory whatever its `cache_capacity` (a known
//! limitation of sled 0.34), so a spool (or a fan-out log) holding hours of data in sled values would
//! grow the process to the size of that data. Payloads therefore go to plain files, written sequentially and
//! fsynced before sled records where they are; sled keeps only that small index and the resume
//! point. A payload torn by a crash is never referenced, because its index entry was never written.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A segment is closed and a new one started past this size, so acknowledged data is freed in
/// steps of at most this much.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Where a payload lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Segment id (the seq or offset of its first payload).
    pub segment: u64,
    /// Byte offset in the segment.
    pub offset: u64,
    /// Payload length.
    pub len: u32,
}

/// The segment directory and the segment being appended to.
pub struct Segments {
    dir: PathBuf,
    current: Option<(u64, File, u64)>,
    segment_bytes: u64,
}

impl Segments {
    /// Opens the directory; appends always go to a new segment, never after a possibly torn tail.
    pub fn open(dir: &Path, segment_bytes: u64) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_path_buf(), current: None, segment_bytes })
    }

    fn path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{segment:020}.seg"))
    }

    /// Appends `payload` (starting a segment named `first_seq` if needed) and syncs it to disk.
    pub fn append(&mut self, first_seq: u64, payload: &[u8]) -> std::io::Result<Location> {
        let [at] = self.append_parts(first_seq, [payload])?;
        Ok(at)
    }

    /// Appends payloads one after the other in one segment with one sync: they become durable
    /// together (a batch and what goes with it).
    pub fn append_parts<const N: usize>(
        &mut self,
        first_seq: u64,
        parts: [&[u8]; N],
    ) -> std::io::Result<[Location; N]> {
        if self.current.as_ref().is_none_or(|(_, _, size)| *size >= self.segment_bytes) {
            let file = OpenOptions::new().create(true).append(true).open(self.path(first_seq))?;
            // The new file's directory entry must be durable too.
            File::open(&self.dir)?.sync_all()?;
            self.current = Some((first_seq, file, 0));
        }
        let (segment, file, size) = self.current.as_mut().ok_or_else(|| std::io::Error::other("no segment"))?;
        let mut at = [Location { segment: *segment, offset: 0, len: 0 }; N];
        let written = (|| {
            for (part, at) in parts.iter().zip(&mut at) {
                file.write_all(part)?;
                *at = Location { segment: *segment, offset: *size, len: part.len() as u32 };
                *size += part.len() as u64;
            }
            file.sync_data()
        })();
        if written.is_err() {
            // The file's tail is unknown now: later appends go to a fresh segment.
            self.current = None;
        }
        written.map(|()| at)
    }

    /// Reads a payload back.
    pub fn read(&self, at: Location) -> std::io::Result<Vec<u8>> {
        let file = File::open(self.path(at.segment))?;
        let mut buf = vec![0; at.len as usize];
        file.read_exact_at(&mut buf, at.offset)?;
        Ok(buf)
    }

    /// The segments [`Self::release_before`] would delete.
    pub fn releasable(&self, oldest_needed: Option<u64>) -> std::io::Result<Vec<PathBuf>> {
        let current = self.current.as_ref().map(|(id, _, _)| *id);
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(id) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            if Some(id) != current && oldest_needed.is_none_or(|needed| id < needed) {
                out.push(path);
            }
        }
        Ok(out)
    }

    /// Deletes every segment older than `oldest_needed` (all of them if `None`), except the one
    /// being appended to. The caller must have made the removal of their index entries durable
    /// first: an index entry left pointing at a deleted segment is a batch that cannot be read.
    pub fn release_before(&self, oldest_needed: Option<u64>) -> std::io::Result<()> {
        for path in self.releasable(oldest_needed)? {
            fs::remove_file(&path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_read_back_and_old_segments_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Segments::open(dir.path(), SEGMENT_BYTES).unwrap();
        let a = s.append(10, b"hello").unwrap();
        let b = s.append(11, b"world!").unwrap();
        assert_eq!((a.segment, a.offset, b.segment, b.offset), (10, 0, 10, 5));
        assert_eq!(s.read(b).unwrap(), b"world!");
        drop(s);
        // A reopened spool starts a fresh segment and can drop the old one once nothing needs it.
        let mut s = Segments::open(dir.path(), SEGMENT_BYTES).unwrap();
        let c = s.append(12, b"again").unwrap();
        assert_eq!(c.segment, 12);
        s.release_before(Some(10)).unwrap();
        assert_eq!(s.read(b).unwrap(), b"world!", "segment 10 still holds a needed batch");
        s.release_before(Some(12)).unwrap();
        assert!(s.read(a).is_err());
        assert_eq!(s.read(c).unwrap(), b"again");
    }
}
