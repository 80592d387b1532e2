//! Reading a segment: every record's checksum, the trailer's totals and the checksum of
//! the whole file are checked; a torn file (no trailer), trailing bytes, a record beyond
//! the disk or an oversized one are refused. A replica applies a segment only after
//! reading it through to `Ok(None)`.

use std::io::{self, Read};

use crate::error::SegmentError;
use crate::format::{
    Decoded, Header, RecordHeader, RecordKind, TrailerFields, HEADER_LEN, MAX_RECORD_DATA,
    RECORD_HEADER_LEN, TRAILER_LEN,
};

/// One change: `data` (in the caller's buffer) or zeros over `offset..offset+len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    pub offset: u64,
    pub len: u64,
}

/// What a verified segment's trailer says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    pub seq: u64,
    pub cut_id: u64,
    pub records: u64,
    pub data_bytes: u64,
    pub covered_bytes: u64,
    pub disk_size: u64,
}

/// Streams a segment's records, verifying as it goes.
pub struct SegmentReader<R> {
    inner: R,
    header: Header,
    pos: u64,
    crc: u32,
    records: u64,
    data_bytes: u64,
    covered_bytes: u64,
    trailer: Option<Trailer>,
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` if the stream ended first (a torn file).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl<R: Read> SegmentReader<R> {
    pub fn new(mut inner: R) -> Result<Self, SegmentError> {
        let mut h = [0u8; HEADER_LEN];
        if !read_full(&mut inner, &mut h)? {
            return Err(SegmentError::Torn { at: 0 });
        }
        let header = Header::decode(&h).map_err(SegmentError::Header)?;
        Ok(Self {
            inner,
            header,
            pos: HEADER_LEN as u64,
            crc: crc32c::crc32c(&h),
            records: 0,
            data_bytes: 0,
            covered_bytes: 0,
            trailer: None,
        })
    }

    pub fn seq(&self) -> u64 {
        self.header.seq
    }

    pub fn disk_size(&self) -> u64 {
        self.header.disk_size
    }

    /// Byte position of the next record (the end of the valid part after an error).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next record with its data in `data`, or `None` once the trailer is verified
    /// (the segment is then complete and correct).
    pub fn next_record(&mut self, data: &mut Vec<u8>) -> Result<Option<Record>, SegmentError> {
        if self.trailer.is_some() {
            return Ok(None);
        }
        let at = self.pos;
        let index = self.records;
        let bad = |reason: String| SegmentError::Record { index, at, reason };
        let mut h = [0u8; RECORD_HEADER_LEN];
        if !read_full(&mut self.inner, &mut h)? {
            return Err(SegmentError::Torn { at });
        }
        let rh = match RecordHeader::decode(&h) {
            Decoded::Record(rh) => rh,
            Decoded::Trailer => return self.finish(h).map(|()| None),
            Decoded::Invalid(reason) => return Err(bad(reason)),
        };
        let end = rh
            .offset
            .checked_add(rh.len)
            .ok_or_else(|| bad("range overflows".into()))?;
        if end > self.header.disk_size {
            return Err(bad(format!(
                "{} bytes at {} lie beyond the disk's {} bytes",
                rh.len, rh.offset, self.header.disk_size
            )));
        }
        if rh.data_len() > MAX_RECORD_DATA {
            return Err(bad(format!(
                "{} bytes of data (at most {MAX_RECORD_DATA})",
                rh.len
            )));
        }
        data.clear();
        data.resize(rh.data_len() as usize, 0);
        if !read_full(&mut self.inner, data)? {
            return Err(SegmentError::Torn { at });
        }
        if rh.kind == RecordKind::Data && crc32c::crc32c(data) != rh.data_crc {
            return Err(bad("data checksum mismatch".into()));
        }
        self.crc = crc32c::crc32c_append(crc32c::crc32c_append(self.crc, &h), data);
        self.pos += (RECORD_HEADER_LEN + data.len()) as u64;
        self.records += 1;
        self.data_bytes += rh.data_len();
        self.covered_bytes += rh.len;
        Ok(Some(Record {
            kind: rh.kind,
            offset: rh.offset,
            len: rh.len,
        }))
    }

    fn finish(&mut self, first: [u8; RECORD_HEADER_LEN]) -> Result<(), SegmentError> {
        let at = self.pos;
        let mut t = [0u8; TRAILER_LEN];
        t[..RECORD_HEADER_LEN].copy_from_slice(&first);
        if !read_full(&mut self.inner, &mut t[RECORD_HEADER_LEN..])? {
            return Err(SegmentError::Torn { at });
        }
        let f = TrailerFields::decode(&t).map_err(SegmentError::Trailer)?;
        let mismatch = |what: &str, claimed: u64, found: u64| {
            SegmentError::Trailer(format!("claims {claimed} {what}, the segment has {found}"))
        };
        if f.seq != self.header.seq {
            return Err(mismatch("as sequence number", f.seq, self.header.seq));
        }
        if f.records != self.records {
            return Err(mismatch("records", f.records, self.records));
        }
        if f.data_bytes != self.data_bytes {
            return Err(mismatch("data bytes", f.data_bytes, self.data_bytes));
        }
        if f.covered_bytes != self.covered_bytes {
            return Err(mismatch(
                "covered bytes",
                f.covered_bytes,
                self.covered_bytes,
            ));
        }
        if f.body_crc != self.crc {
            return Err(SegmentError::Trailer("file checksum mismatch".into()));
        }
        let mut extra = [0u8; 1];
        if read_full(&mut self.inner, &mut extra)? {
            return Err(SegmentError::Trailer(format!(
                "bytes follow the trailer at {}",
                at + TRAILER_LEN as u64
            )));
        }
        self.pos = at + TRAILER_LEN as u64;
        self.trailer = Some(Trailer {
            seq: f.seq,
            cut_id: f.cut_id,
            records: f.records,
            data_bytes: f.data_bytes,
            covered_bytes: f.covered_bytes,
            disk_size: self.header.disk_size,
        });
        Ok(())
    }

    /// The trailer, once [`Self::next_record`] returned `Ok(None)`.
    pub fn trailer(&self) -> Option<Trailer> {
        self.trailer
    }

    /// Reads the whole segment; its trailer if every check passed.
    pub fn verify_all(mut self) -> Result<Trailer, SegmentError> {
        let mut buf = Vec::new();
        while self.next_record(&mut buf)?.is_some() {}
        self.trailer
            .ok_or_else(|| SegmentError::Trailer("missing".into()))
    }

    /// The running checksum of the bytes read so far (the log's recovery goes on from it).
    pub(crate) fn running(&self) -> (u32, u64, u64, u64) {
        (self.crc, self.records, self.data_bytes, self.covered_bytes)
    }
}

/// Whether `file` ends with what decodes as the trailer of segment `seq`: a cheap test
/// (its last 64 bytes) that tells the segment being written from a sealed one before
/// anyone reads it whole. Only [`SegmentReader::verify_all`] proves a segment sealed:
/// a guest's data can end in bytes that look like a trailer.
pub fn ends_with_trailer(file: &std::fs::File, seq: u64) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    if len < (HEADER_LEN + TRAILER_LEN) as u64 {
        return Ok(false);
    }
    let mut t = [0u8; TRAILER_LEN];
    file.read_exact_at(&mut t, len - TRAILER_LEN as u64)?;
    Ok(TrailerFields::decode(&t).is_ok_and(|t| t.seq == seq))
}
