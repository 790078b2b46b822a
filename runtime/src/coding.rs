//! Content codings of bodies the upstream sends: ESI pages the gateway composes and
//! render answers the workers store are read as plain bytes, whatever coding they came
//! in.

use std::io::Read;

/// Why a coded body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A coding not read here (`zstd`, `compress`, a chain of codings).
    #[error("unsupported Content-Encoding {0:?}")]
    Unsupported(String),
    /// Decoded, it is longer than the limit.
    #[error("longer than {0} bytes once decoded")]
    TooBig(usize),
    /// Not valid data of its coding.
    #[error("corrupt {coding} data: {source}")]
    Corrupt {
        /// The coding claimed.
        coding: String,
        /// The decoder's complaint.
        source: std::io::Error,
    },
}

/// `body` sent with `Content-Encoding: content_encoding` (`gzip`, `x-gzip`, `deflate`,
/// `br` or `identity`), decoded; at most `limit` bytes, so a small bomb cannot become a
/// large allocation.
pub fn decode(content_encoding: &str, body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let coding = content_encoding.trim().to_ascii_lowercase();
    let reader: Box<dyn Read + '_> = match coding.as_str() {
        "gzip" | "x-gzip" => Box::new(flate2::read::MultiGzDecoder::new(body)),
        // HTTP's `deflate` is the zlib format (RFC 9110 §8.4.1.2).
        "deflate" => Box::new(flate2::read::ZlibDecoder::new(body)),
        "br" => Box::new(brotli::Decompressor::new(body, 4096)),
        "identity" | "" => Box::new(body),
        _ => return Err(DecodeError::Unsupported(content_encoding.to_string())),
    };
    let mut out = Vec::new();
    // One byte past the limit tells "too big" from "exactly the limit".
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|source| DecodeError::Corrupt { coding, source })?;
    if out.len() > limit {
        return Err(DecodeError::TooBig(limit));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;

    use super::*;

    fn gzip(body: &[u8]) -> Vec<u8> {
        let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        w.write_all(body).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn every_coding_is_read_up_to_the_limit() {
        let body = "<p>a fragment</p>".repeat(500);
        let mut br = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
            w.write_all(body.as_bytes()).unwrap();
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(body.as_bytes()).unwrap();
        let zlib = z.finish().unwrap();
        let gz = gzip(body.as_bytes());
        for (coding, coded) in [
            ("gzip", &gz),
            ("X-Gzip", &gz),
            ("br", &br),
            ("deflate", &zlib),
            ("identity", &body.as_bytes().to_vec()),
        ] {
            assert_eq!(
                decode(coding, coded, body.len()).unwrap(),
                body.as_bytes(),
                "{coding}"
            );
            assert!(
                matches!(
                    decode(coding, coded, body.len() - 1),
                    Err(DecodeError::TooBig(_))
                ),
                "{coding}"
            );
        }
        assert!(matches!(
            decode("gzip", b"not gzip at all", 1 << 20),
            Err(DecodeError::Corrupt { .. })
        ));
        assert!(matches!(
            decode("zstd", b"", 1 << 20),
            Err(DecodeError::Unsupported(_))
        ));
        assert!(matches!(
            decode("gzip, br", &gz, 1 << 20),
            Err(DecodeError::Unsupported(_))
        ));
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let bomb = gzip(&vec![0u8; 16 << 20]);
        assert!(bomb.len() < 1 << 16, "16 MiB of zeros fits in a small body");
        assert!(matches!(
            decode("gzip", &bomb, 4 << 20),
            Err(DecodeError::TooBig(_))
        ));
    }
}
