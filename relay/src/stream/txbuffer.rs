//! Streamed transactions held until they end: in memory up to a budget, in a file
//! per transaction beyond it.
//!
//! With protocol 2 and `streaming` on, the server sends a large transaction's
//! changes while it is still running (see [`crate::pgoutput::streaming`]); they may
//! be published only once it commits, and never if it aborts. So they wait here.
//!
//! **What is kept.** Only what publishing needs: each outbox insert and each
//! routable logical message, as the bytes the server sent (re-decoded when
//! replayed), with the id of the subtransaction it belongs to and the outbox
//! relation's layout as it was announced when the change arrived (a transaction
//! may alter the table halfway). Changes of other tables, updates and deletes are
//! dropped on arrival.
//!
//! **Why memory stays bounded.** Kept changes are appended to chunks whose capacity
//! is counted against one budget shared by all open transactions
//! (`stream_memory_bytes`). A change that does not fit goes to its transaction's
//! file in the spill directory instead, and so does every later change of that
//! transaction, so its order is the memory part followed by the file. Replaying
//! reads the file through a fixed buffer, one change at a time, and frees each
//! memory chunk once read. Besides the budget, each spilled transaction holds one
//! write or read buffer ([`FILE_BUFFER`]).
//!
//! **Why nothing is lost.** Every kept change of a transaction is replayed at its
//! commit, in arrival order (which is WAL order), except those of subtransactions
//! the server reported aborted. A write to the spill directory that fails fails
//! the session, which then publishes nothing of the transaction: after a
//! reconnect the server sends it again from its start. Nothing here is needed
//! after the session ends, since the server sends every uncommitted or
//! unconfirmed transaction again: files are deleted when their transaction is
//! published, aborted or dropped, and [`clear_leftovers`] deletes those a killed
//! process left behind.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::routing::{OutboxLayout, SchemaError};

/// Bytes of each spilled transaction's file buffer.
pub const FILE_BUFFER: usize = 64 * 1024;
/// The largest memory chunk.
const CHUNK: usize = 64 * 1024;
/// Per change: payload length, subtransaction id, layout index.
const HEADER: usize = 12;
/// The layout index of a change that needs none (a logical message).
const NO_LAYOUT: u32 = u32::MAX;
/// The extension of spill files.
const EXTENSION: &str = "spill";

/// Spill files made by this process, for unique names.
static FILES: AtomicU64 = AtomicU64::new(0);

/// The outbox relation's layout as a streamed transaction announced it; an error
/// if the table lacked a configured column then (reported only if a change of it
/// is published).
pub type Layout = Result<Arc<OutboxLayout>, SchemaError>;

/// The streamed transactions of one session broke the protocol's order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("transaction {0} was streamed from its first segment twice")]
    StartedTwice(u32),
    #[error("a later segment of transaction {0} came without its first")]
    NotStarted(u32),
    #[error("transaction {0} was committed without a Stream Start")]
    CommittedUnstarted(u32),
}

/// One kept change, as replayed.
#[derive(Debug, Clone)]
pub struct Change {
    /// The outbox layout of an insert; `None` for a logical message.
    pub layout: Option<Layout>,
    /// The message as the server sent it inside its stream block.
    pub bytes: Bytes,
}

/// The open streamed transactions of one session.
#[derive(Debug)]
pub struct Buffers {
    open: HashMap<u32, TxnBuffer>,
    budget: usize,
    in_memory: usize,
    dir: PathBuf,
}

#[derive(Debug, Default)]
struct TxnBuffer {
    chunks: VecDeque<Vec<u8>>,
    /// Capacity of `chunks`, counted against the budget.
    memory: usize,
    spill: Option<Spill>,
    aborted: HashSet<u32>,
    layouts: Vec<Layout>,
    /// Outbox relations announced in this transaction's stream: OID to layout index.
    relations: HashMap<u32, u32>,
}

impl Buffers {
    /// Buffers keeping at most `budget` bytes in memory, spilling to `dir`.
    pub fn new(dir: PathBuf, budget: usize) -> Buffers {
        Buffers {
            open: HashMap::new(),
            budget,
            in_memory: 0,
            dir,
        }
    }

    /// Open transactions.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether no streamed transaction is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Whether `xid` is open.
    pub fn contains(&self, xid: u32) -> bool {
        self.open.contains_key(&xid)
    }

    /// A Stream Start for `xid`.
    pub fn start(&mut self, xid: u32, first_segment: bool) -> Result<(), OrderError> {
        match (first_segment, self.open.contains_key(&xid)) {
            (true, true) => Err(OrderError::StartedTwice(xid)),
            (false, false) => Err(OrderError::NotStarted(xid)),
            (true, false) => {
                self.open.insert(xid, TxnBuffer::default());
                Ok(())
            }
            (false, true) => Ok(()),
        }
    }

    /// Transaction `xid` announced outbox relation `oid` with `layout`.
    pub fn relation(&mut self, xid: u32, oid: u32, layout: Layout) -> Result<(), OrderError> {
        let txn = self.open.get_mut(&xid).ok_or(OrderError::NotStarted(xid))?;
        let index = u32::try_from(txn.layouts.len()).unwrap_or(NO_LAYOUT - 1);
        txn.layouts.push(layout);
        txn.relations.insert(oid, index);
        Ok(())
    }

    /// Whether transaction `xid` announced `oid` as the outbox relation.
    pub fn announced(&self, xid: u32, oid: u32) -> bool {
        self.open
            .get(&xid)
            .is_some_and(|t| t.relations.contains_key(&oid))
    }

    /// Keeps an insert of outbox relation `oid` (as announced in transaction
    /// `xid`, or `fallback` when it was not), or with `oid` `None` a logical
    /// message, made by (sub)transaction `subxid`. Returns the bytes written to a
    /// spill file (0 when kept in memory).
    pub fn push(
        &mut self,
        xid: u32,
        subxid: u32,
        oid: Option<(u32, Option<Layout>)>,
        bytes: &[u8],
    ) -> Result<u64, PushError> {
        let txn = self
            .open
            .get_mut(&xid)
            .ok_or(PushError::Order(OrderError::NotStarted(xid)))?;
        let layout = match oid {
            None => NO_LAYOUT,
            Some((oid, fallback)) => match (txn.relations.get(&oid), fallback) {
                (Some(&index), _) => index,
                (None, Some(layout)) => {
                    let index = u32::try_from(txn.layouts.len()).unwrap_or(NO_LAYOUT - 1);
                    txn.layouts.push(layout);
                    txn.relations.insert(oid, index);
                    index
                }
                // Not the outbox after all.
                (None, None) => return Ok(0),
            },
        };
        let len = u32::try_from(bytes.len()).map_err(|_| PushError::TooLarge(bytes.len()))?;
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(&len.to_be_bytes());
        header[4..8].copy_from_slice(&subxid.to_be_bytes());
        header[8..].copy_from_slice(&layout.to_be_bytes());
        let size = HEADER + bytes.len();
        if txn.spill.is_none() {
            if let Some(last) = txn.chunks.back_mut() {
                if last.capacity() - last.len() >= size {
                    last.extend_from_slice(&header);
                    last.extend_from_slice(bytes);
                    return Ok(0);
                }
            }
            let capacity = size.max(CHUNK.min(self.budget / 8));
            if self.in_memory + capacity <= self.budget {
                let mut chunk = Vec::with_capacity(capacity);
                chunk.extend_from_slice(&header);
                chunk.extend_from_slice(bytes);
                self.in_memory += chunk.capacity();
                txn.memory += chunk.capacity();
                txn.chunks.push_back(chunk);
                return Ok(0);
            }
            txn.spill = Some(
                Spill::create(&self.dir, xid).map_err(|source| PushError::Io {
                    path: self.dir.clone(),
                    source,
                })?,
            );
        }
        let spill = txn
            .spill
            .as_mut()
            .ok_or(PushError::Order(OrderError::NotStarted(xid)))?;
        spill
            .append(&header, bytes)
            .map_err(|source| PushError::Io {
                path: spill.path.clone(),
                source,
            })?;
        Ok(size as u64)
    }

    /// A Stream Abort of subtransaction `subxid` of `xid` (of the whole
    /// transaction when they are equal). An unknown transaction kept nothing.
    pub fn abort(&mut self, xid: u32, subxid: u32) {
        if xid == subxid {
            if let Some(txn) = self.open.remove(&xid) {
                self.in_memory -= txn.memory;
            }
        } else if let Some(txn) = self.open.get_mut(&xid) {
            txn.aborted.insert(subxid);
        }
    }

    /// A Stream Commit of `xid`: its kept changes, to be replayed in order. `None`
    /// when `xid` is not open.
    pub fn commit(&mut self, xid: u32) -> Option<io::Result<Replay>> {
        let txn = self.open.remove(&xid)?;
        self.in_memory -= txn.memory;
        let TxnBuffer {
            chunks,
            spill,
            aborted,
            layouts,
            ..
        } = txn;
        let spill = match spill.map(Spill::into_reader).transpose() {
            Ok(spill) => spill,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(Replay {
            chunks,
            offset: 0,
            spill,
            aborted,
            layouts,
        }))
    }

    /// Bytes of memory chunks held now.
    pub fn in_memory(&self) -> usize {
        self.in_memory
    }
}

/// A change could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Order(#[from] OrderError),
    #[error("a change of {0} bytes is too large to keep")]
    TooLarge(usize),
    #[error("cannot write to the spill file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A committed transaction's kept changes, in order.
#[derive(Debug)]
pub struct Replay {
    chunks: VecDeque<Vec<u8>>,
    /// Where the next change starts in the first chunk.
    offset: usize,
    spill: Option<Spill>,
    aborted: HashSet<u32>,
    layouts: Vec<Layout>,
}

impl Replay {
    /// The next change, skipping those of aborted subtransactions; `None` at the
    /// end.
    pub fn next_change(&mut self) -> io::Result<Option<Change>> {
        loop {
            let Some((subxid, layout, bytes)) = self.next_raw()? else {
                return Ok(None);
            };
            if self.aborted.contains(&subxid) {
                continue;
            }
            let layout = match layout {
                NO_LAYOUT => None,
                index => Some(
                    self.layouts
                        .get(index as usize)
                        .cloned()
                        .ok_or_else(|| corrupt("a change names a layout never announced"))?,
                ),
            };
            return Ok(Some(Change { layout, bytes }));
        }
    }

    fn next_raw(&mut self) -> io::Result<Option<(u32, u32, Bytes)>> {
        while let Some(chunk) = self.chunks.front() {
            if self.offset >= chunk.len() {
                // Read through: its memory goes.
                self.chunks.pop_front();
                self.offset = 0;
                continue;
            }
            let header = chunk
                .get(self.offset..self.offset + HEADER)
                .ok_or_else(|| corrupt("a change header is cut short"))?;
            let (len, subxid, layout) = parse_header(header);
            let start = self.offset + HEADER;
            let body = chunk
                .get(start..start + len)
                .ok_or_else(|| corrupt("a change is cut short"))?;
            let bytes = Bytes::copy_from_slice(body);
            self.offset = start + len;
            return Ok(Some((subxid, layout, bytes)));
        }
        let Some(spill) = &mut self.spill else {
            return Ok(None);
        };
        spill.read_next()
    }
}

fn parse_header(header: &[u8]) -> (usize, u32, u32) {
    let word = |i: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&header[i..i + 4]);
        u32::from_be_bytes(b)
    };
    (word(0) as usize, word(4), word(8))
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// One transaction's spill file: written, then read once; deleted when dropped.
#[derive(Debug)]
struct Spill {
    path: PathBuf,
    writer: Option<BufWriter<File>>,
    reader: Option<BufReader<File>>,
}

impl Spill {
    fn create(dir: &Path, xid: u32) -> io::Result<Spill> {
        create_dir(dir)?;
        let n = FILES.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{}-{xid}-{n}.{EXTENSION}", std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path)?;
        tracing::debug!(path = %path.display(), xid, "spilling a streamed transaction");
        Ok(Spill {
            path,
            writer: Some(BufWriter::with_capacity(FILE_BUFFER, file)),
            reader: None,
        })
    }

    fn append(&mut self, header: &[u8], bytes: &[u8]) -> io::Result<()> {
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| io::Error::other("the spill file is being read"))?;
        writer.write_all(header)?;
        writer.write_all(bytes)
    }

    fn into_reader(mut self) -> io::Result<Spill> {
        if let Some(writer) = self.writer.take() {
            let mut file = writer
                .into_inner()
                .map_err(io::IntoInnerError::into_error)?;
            file.seek(SeekFrom::Start(0))?;
            self.reader = Some(BufReader::with_capacity(FILE_BUFFER, file));
        }
        Ok(self)
    }

    fn read_next(&mut self) -> io::Result<Option<(u32, u32, Bytes)>> {
        let Some(reader) = &mut self.reader else {
            return Ok(None);
        };
        let mut header = [0u8; HEADER];
        match reader.read(&mut header[..1])? {
            0 => return Ok(None),
            _ => reader.read_exact(&mut header[1..])?,
        }
        let (len, subxid, layout) = parse_header(&header);
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        Ok(Some((subxid, layout, Bytes::from(body))))
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        self.writer = None;
        self.reader = None;
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot delete a spill file");
        }
    }
}

/// Creates the spill directory (readable by this user only) if it is missing.
fn create_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Deletes the spill files in `dir` that a stopped relay left, before a session
/// starts; failures are logged (spilling will report them if they matter).
pub fn clear_stale(dir: &Path) {
    match clear_leftovers(dir) {
        Ok(0) => {}
        Ok(files) => {
            tracing::info!(dir = %dir.display(), files, "deleted spill files a stopped relay left");
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot clear the spill directory")
        }
    }
}

/// Deletes the spill files in `dir` (a killed relay's); how many.
pub fn clear_leftovers(dir: &Path) -> io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == EXTENSION) {
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests;
