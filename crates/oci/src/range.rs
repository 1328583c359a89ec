//! HTTP byte ranges as the distribution API uses them: a single `Range: bytes=…` on blob GET
//! (suffix ranges are resolved against the known size, so storage only ever sees bounded
//! ranges) and the `Content-Range` of a chunked upload `PATCH`.

/// An inclusive byte range `start..=end` within a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("range header {0:?} is malformed; expected bytes=<start>-<end>")]
    Malformed(String),
    #[error("only a single byte range per request is supported")]
    Multiple,
    #[error("range {range:?} is outside the blob of {size} bytes")]
    Unsatisfiable { range: String, size: u64 },
}

fn num(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a `Range` request header against a blob of `size` bytes.
pub fn parse_range(header: &str, size: u64) -> Result<ByteRange, RangeError> {
    let h = header.trim();
    let spec = h
        .strip_prefix("bytes=")
        .ok_or_else(|| RangeError::Malformed(h.to_string()))?
        .trim();
    if spec.contains(',') {
        return Err(RangeError::Multiple);
    }
    let (a, b) = spec
        .split_once('-')
        .ok_or_else(|| RangeError::Malformed(h.to_string()))?;
    let unsat = || RangeError::Unsatisfiable {
        range: h.to_string(),
        size,
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // suffix: the last n bytes
        let n = num(b).ok_or_else(|| RangeError::Malformed(h.to_string()))?;
        if n == 0 || size == 0 {
            return Err(unsat());
        }
        let n = n.min(size);
        return Ok(ByteRange {
            start: size - n,
            end: size - 1,
        });
    }
    let start = num(a).ok_or_else(|| RangeError::Malformed(h.to_string()))?;
    let end = if b.is_empty() {
        size.saturating_sub(1)
    } else {
        let e = num(b).ok_or_else(|| RangeError::Malformed(h.to_string()))?;
        if e < start {
            return Err(RangeError::Malformed(h.to_string()));
        }
        e.min(size.saturating_sub(1))
    };
    if start >= size {
        return Err(unsat());
    }
    Ok(ByteRange { start, end })
}

/// Parses the `Content-Range` of an upload chunk: `<start>-<end>`, also accepting the
/// `bytes <start>-<end>/<total|*>` and `bytes=<start>-<end>` forms some clients send.
pub fn parse_content_range(header: &str) -> Result<ByteRange, RangeError> {
    let h = header.trim();
    let spec = h
        .strip_prefix("bytes=")
        .or_else(|| h.strip_prefix("bytes "))
        .unwrap_or(h);
    let spec = spec.split('/').next().unwrap_or(spec);
    let (a, b) = spec
        .split_once('-')
        .ok_or_else(|| RangeError::Malformed(h.to_string()))?;
    let start = num(a.trim()).ok_or_else(|| RangeError::Malformed(h.to_string()))?;
    let end = num(b.trim()).ok_or_else(|| RangeError::Malformed(h.to_string()))?;
    // `end` is inclusive, so u64::MAX cannot end a range whose length must fit in a u64.
    if end < start || end == u64::MAX {
        return Err(RangeError::Malformed(h.to_string()));
    }
    Ok(ByteRange { start, end })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges() {
        assert_eq!(
            parse_range("bytes=0-9", 100).unwrap(),
            ByteRange { start: 0, end: 9 }
        );
        assert_eq!(
            parse_range("bytes=90-", 100).unwrap(),
            ByteRange { start: 90, end: 99 }
        );
        assert_eq!(
            parse_range("bytes=90-1000", 100).unwrap(),
            ByteRange { start: 90, end: 99 }
        );
        assert_eq!(
            parse_range("bytes=-5", 100).unwrap(),
            ByteRange { start: 95, end: 99 }
        );
        assert_eq!(
            parse_range("bytes=-500", 100).unwrap(),
            ByteRange { start: 0, end: 99 }
        );
        assert!(matches!(
            parse_range("bytes=100-", 100),
            Err(RangeError::Unsatisfiable { .. })
        ));
        assert!(matches!(
            parse_range("bytes=-0", 100),
            Err(RangeError::Unsatisfiable { .. })
        ));
        assert!(matches!(
            parse_range("bytes=0-1,5-6", 100),
            Err(RangeError::Multiple)
        ));
        assert!(matches!(
            parse_range("bytes=5-1", 100),
            Err(RangeError::Malformed(_))
        ));
        assert!(matches!(
            parse_range("items=0-1", 100),
            Err(RangeError::Malformed(_))
        ));
        assert!(matches!(
            parse_range("bytes=a-b", 100),
            Err(RangeError::Malformed(_))
        ));
        assert!(matches!(
            parse_range("bytes=99999999999999999999999-", 100),
            Err(RangeError::Malformed(_))
        ));
    }

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("0-99").unwrap(),
            ByteRange { start: 0, end: 99 }
        );
        assert_eq!(
            parse_content_range("bytes 100-199/*").unwrap(),
            ByteRange {
                start: 100,
                end: 199
            }
        );
        assert_eq!(
            parse_content_range("bytes=5-5").unwrap(),
            ByteRange { start: 5, end: 5 }
        );
        assert!(parse_content_range("9-0").is_err());
        assert!(parse_content_range("-5").is_err());
        assert!(parse_content_range("").is_err());
        assert!(
            parse_content_range("0-18446744073709551615").is_err(),
            "an inclusive end of u64::MAX has no representable length"
        );
    }

    proptest! {
        #[test]
        fn resolved_range_is_inside_blob(h in "bytes=[0-9]{0,4}-[0-9]{0,4}", size in 0u64..5000) {
            if let Ok(r) = parse_range(&h, size) {
                prop_assert!(r.start <= r.end && r.end < size);
            }
        }
    }
}
