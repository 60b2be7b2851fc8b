//! Body compression, compatible with Kombu's `kombu.compression`.
//!
//! A producer compresses the serialized body and names the method in the
//! `compression` message header by its content type; a consumer reads that
//! header and decompresses before deserializing. The built-in methods and their
//! header values are Kombu's:
//!
//! | names | header | body format |
//! |---|---|---|
//! | `zlib`, `gzip` | `application/x-gzip` | zlib stream (as Python's `zlib.compress`; a real gzip file is accepted too) |
//! | `bzip2`, `bzip` | `application/x-bz2` | bzip2 |
//! | `lzma`, `xz` | `application/x-lzma` | xz container (legacy `.lzma` accepted on decode) |
//! | `zstd`, `zstandard` | `application/zstd` | zstd frame |
//! | `brotli` | `application/x-brotli` | brotli |
//!
//! Decompression is always bounded: a body that would expand past the limit
//! (default [`DEFAULT_MAX_DECOMPRESSED`], 64 MiB) is a
//! [`CompressionError::TooLarge`], so a compression bomb costs at most the limit
//! in memory, never an OOM.
//!
//! ```
//! use kelp::compression::Compression;
//!
//! let methods = Compression::default();
//! let (packed, header) = methods.compress("zlib", b"hello hello hello hello")?;
//! assert_eq!(header, "application/x-gzip");
//! let plain = methods.decompress(header, &packed, 1024)?;
//! assert_eq!(&plain[..], b"hello hello hello hello");
//! # Ok::<(), kelp::compression::CompressionError>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::sync::Arc;

use bytes::Bytes;

/// The default limit on a decompressed body: 64 MiB.
pub const DEFAULT_MAX_DECOMPRESSED: usize = 64 * 1024 * 1024;

/// Why a body could not be compressed or decompressed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CompressionError {
    /// No method is registered under this name.
    #[error("unknown compression method {name:?} (known: zlib, gzip, bzip2, lzma, xz, zstd, brotli and registered ones)")]
    UnknownMethod {
        /// The name asked for.
        name: String,
    },
    /// A message names a compression content type no method handles.
    #[error("unknown compression content type {content_type:?} in the `compression` header")]
    UnknownContentType {
        /// The header value.
        content_type: String,
    },
    /// The body would expand past the configured limit (a compression bomb or a too-large message).
    #[error("{method} body expands past the {limit}-byte decompression limit")]
    TooLarge {
        /// The method's name.
        method: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// The compressed body is not valid for its method.
    #[error("{method} body is corrupt: {reason}")]
    Corrupt {
        /// The method's name.
        method: String,
        /// What the decoder reported.
        reason: String,
    },
    /// The compressor failed.
    #[error("{method} compression failed: {reason}")]
    Compress {
        /// The method's name.
        method: String,
        /// What the encoder reported.
        reason: String,
    },
}

/// A compression method. Implement it to register your own with
/// [`Compression::register`].
///
/// ```
/// use std::io::{self, Read};
/// use kelp::compression::{Compression, Compressor};
///
/// /// "Compresses" by storing the body as it is.
/// struct Identity;
/// impl Compressor for Identity {
///     fn compress(&self, input: &[u8]) -> io::Result<Vec<u8>> { Ok(input.to_vec()) }
///     fn decoder<'a>(&self, input: &'a [u8]) -> io::Result<Box<dyn Read + 'a>> {
///         Ok(Box::new(input))
///     }
/// }
///
/// let mut methods = Compression::default();
/// methods.register("identity", "application/x-identity", &[], Identity);
/// let (packed, header) = methods.compress("identity", b"abc")?;
/// assert_eq!(header, "application/x-identity");
/// assert_eq!(&methods.decompress(header, &packed, 16)?[..], b"abc");
/// # Ok::<(), kelp::compression::CompressionError>(())
/// ```
pub trait Compressor: Send + Sync + 'static {
    /// Compress a whole body.
    fn compress(&self, input: &[u8]) -> io::Result<Vec<u8>>;
    /// A reader yielding the decompressed body. kelp reads from it only up to
    /// the configured limit, so the decoder never has to know the limit.
    fn decoder<'a>(&self, input: &'a [u8]) -> io::Result<Box<dyn Read + 'a>>;
}

#[derive(Clone)]
struct Method {
    name: Arc<str>,
    content_type: Arc<str>,
    imp: Arc<dyn Compressor>,
}

/// The set of compression methods a connection knows, by name and by header
/// content type. `Default` holds Kombu's five methods.
#[derive(Clone)]
pub struct Compression {
    by_name: HashMap<String, Method>,
    by_content_type: HashMap<String, Method>,
}

impl fmt::Debug for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Compression")
            .field("methods", &names)
            .finish()
    }
}

impl Default for Compression {
    fn default() -> Self {
        let mut c = Compression::empty();
        c.register("zlib", "application/x-gzip", &["gzip"], Zlib);
        c.register("bzip2", "application/x-bz2", &["bzip"], Bzip2);
        c.register("lzma", "application/x-lzma", &["xz"], Lzma);
        c.register("zstd", "application/zstd", &["zstandard"], Zstd);
        c.register("brotli", "application/x-brotli", &[], Brotli);
        c
    }
}

impl Compression {
    /// A registry with no methods at all.
    ///
    /// ```
    /// let none = kelp::compression::Compression::empty();
    /// assert!(none.compress("zlib", b"x").is_err());
    /// ```
    pub fn empty() -> Self {
        Compression {
            by_name: HashMap::new(),
            by_content_type: HashMap::new(),
        }
    }

    /// Register a method under `name` (and `aliases`), written into messages
    /// as `content_type`. A later registration under the same name or content
    /// type replaces the earlier one.
    ///
    /// See [`Compressor`] for an example.
    pub fn register(
        &mut self,
        name: &str,
        content_type: &str,
        aliases: &[&str],
        method: impl Compressor,
    ) -> &mut Self {
        let m = Method {
            name: Arc::from(name),
            content_type: Arc::from(content_type),
            imp: Arc::new(method),
        };
        for n in std::iter::once(name).chain(aliases.iter().copied()) {
            self.by_name.insert(n.to_ascii_lowercase(), m.clone());
        }
        self.by_content_type
            .insert(content_type.to_ascii_lowercase(), m);
        self
    }

    /// The header content type for a method name, if known.
    ///
    /// ```
    /// let c = kelp::compression::Compression::default();
    /// assert_eq!(c.content_type("bzip2"), Some("application/x-bz2"));
    /// assert_eq!(c.content_type("snappy"), None);
    /// ```
    pub fn content_type(&self, name: &str) -> Option<&str> {
        self.lookup_name(name).map(|m| &*m.content_type)
    }

    fn lookup_name(&self, name: &str) -> Option<&Method> {
        self.by_name
            .get(name)
            .or_else(|| self.by_name.get(&name.to_ascii_lowercase()))
    }

    /// Compress `body` with the method called `name` (or its content type).
    /// Returns the compressed body and the value for the `compression` header.
    ///
    /// ```
    /// let c = kelp::compression::Compression::default();
    /// let (packed, header) = c.compress("zstd", &[7u8; 10_000])?;
    /// assert_eq!(header, "application/zstd");
    /// assert!(packed.len() < 100);
    /// # Ok::<(), kelp::compression::CompressionError>(())
    /// ```
    pub fn compress(&self, name: &str, body: &[u8]) -> Result<(Bytes, &str), CompressionError> {
        let m = self
            .lookup_name(name)
            .or_else(|| self.by_content_type.get(&name.to_ascii_lowercase()))
            .ok_or_else(|| CompressionError::UnknownMethod {
                name: name.to_owned(),
            })?;
        let out = m
            .imp
            .compress(body)
            .map_err(|e| CompressionError::Compress {
                method: m.name.to_string(),
                reason: e.to_string(),
            })?;
        Ok((Bytes::from(out), &m.content_type))
    }

    /// Decompress `body` whose `compression` header is `content_type` (a method
    /// name is accepted too), refusing to produce more than `limit` bytes.
    ///
    /// ```
    /// use kelp::compression::{Compression, CompressionError};
    /// let c = Compression::default();
    /// let (bomb, header) = c.compress("zlib", &vec![0u8; 1 << 20])?;
    /// let err = c.decompress(header, &bomb, 4096).unwrap_err();
    /// assert!(matches!(err, CompressionError::TooLarge { limit: 4096, .. }));
    /// # Ok::<(), CompressionError>(())
    /// ```
    pub fn decompress(
        &self,
        content_type: &str,
        body: &[u8],
        limit: usize,
    ) -> Result<Bytes, CompressionError> {
        let key = content_type.trim().to_ascii_lowercase();
        let m = self
            .by_content_type
            .get(&key)
            .or_else(|| self.by_name.get(&key))
            .ok_or_else(|| CompressionError::UnknownContentType {
                content_type: content_type.to_owned(),
            })?;
        let corrupt = |e: io::Error| CompressionError::Corrupt {
            method: m.name.to_string(),
            reason: e.to_string(),
        };
        let reader = m.imp.decoder(body).map_err(corrupt)?;
        // Read at most limit + 1 bytes: one more than allowed proves the bomb.
        let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
        let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit).min(1 << 20));
        reader.take(cap).read_to_end(&mut out).map_err(corrupt)?;
        if out.len() > limit {
            return Err(CompressionError::TooLarge {
                method: m.name.to_string(),
                limit,
            });
        }
        Ok(Bytes::from(out))
    }
}

fn read_all(mut r: impl Read) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.read_to_end(&mut out)?;
    Ok(out)
}

struct Zlib;
impl Compressor for Zlib {
    fn compress(&self, input: &[u8]) -> io::Result<Vec<u8>> {
        read_all(flate2::read::ZlibEncoder::new(
            input,
            flate2::Compression::default(),
        ))
    }
    fn decoder<'a>(&self, input: &'a [u8]) -> io::Result<Box<dyn Read + 'a>> {
        // Kombu's "gzip" is a zlib stream; a peer that sent a real gzip file
        // (magic 1f 8b) is decoded too rather than reported corrupt.
        if input.starts_with(&[0x1f, 0x8b]) {
            Ok(Box::new(flate2::read::MultiGzDecoder::new(input)))
        } else {
            Ok(Box::new(flate2::read::ZlibDecoder::new(input)))
        }
    }
}

struct Bzip2;
impl Compressor for Bzip2 {
    fn compress(&self, input: &[u8]) -> io::Result<Vec<u8>> {
        read_all(bzip2::read::BzEncoder::new(
            input,
            bzip2::Compression::default(),
        ))
    }
    fn decoder<'a>(&self, input: &'a [u8]) -> io::Result<Box<dyn Read + 'a>> {
        Ok(Box::new(bzip2::read::MultiBzDecoder::new(input)))
    }
}

struct Lzma;
impl Compressor for Lzma {
    fn compress(&self, input: &[u8]) -> io::Result<Vec<u8>> {
        // Python's lzma.compress() default: xz container, preset 6.
        read_all(liblzma::read::XzEncoder::new(input, 6))
    }
    fn decoder<'a>(&self, input: &'a [u8]) -> io::Result<Box<dyn Read + 'a>> {
        // Like Python's lzma.decompress (FORMAT_AUTO): xz or legacy .lzma.
        let stream = liblzma::stream::Stream::new_auto_decoder(u64::MAX, 0)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(Box::new(liblzma::read::XzDecoder::new_stream(
            input, stream,
        )))
    }
}

struct Zstd;
impl Compressor for Zstd {
    fn compress(&self, input: &[u8]) -> io::Result<Vec<u8>> {
        zstd::stream::encode_all(input, 3)
    }
    fn decoder<'a>(&self, input: &'a [u8]) -> io::Result<Box<dyn Read + 'a>> {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(input)?))
    }
}

struct Brotli;
impl Compressor for Brotli {
    fn compress(&self, input: &[u8]) -> io::Result<Vec<u8>> {
        // Quality 11 (Python brotli's default) is very slow; 5 is a sane
        // messaging trade-off and any brotli decoder reads it.
        read_all(brotli::CompressorReader::new(input, 4096, 5, 22))
    }
    fn decoder<'a>(&self, input: &'a [u8]) -> io::Result<Box<dyn Read + 'a>> {
        Ok(Box::new(brotli::Decompressor::new(input, 4096)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [(&str, &str); 10] = [
        ("zlib", "application/x-gzip"),
        ("gzip", "application/x-gzip"),
        ("bzip2", "application/x-bz2"),
        ("bzip", "application/x-bz2"),
        ("lzma", "application/x-lzma"),
        ("xz", "application/x-lzma"),
        ("zstd", "application/zstd"),
        ("zstandard", "application/zstd"),
        ("brotli", "application/x-brotli"),
        ("ZLIB", "application/x-gzip"),
    ];

    #[test]
    fn every_method_round_trips_with_kombu_header() {
        let c = Compression::default();
        let body: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        for (name, header) in ALL {
            let (packed, h) = c.compress(name, &body).unwrap();
            assert_eq!(h, header, "{name}");
            assert!(packed.len() < body.len(), "{name} did not compress");
            let plain = c.decompress(h, &packed, body.len()).unwrap();
            assert_eq!(&plain[..], &body[..], "{name}");
        }
    }

    #[test]
    fn bombs_stop_at_the_limit() {
        let c = Compression::default();
        let body = vec![0u8; 8 << 20];
        for (name, _) in ALL {
            let (packed, h) = c.compress(name, &body).unwrap();
            let err = c.decompress(h, &packed, 1 << 20).unwrap_err();
            assert!(
                matches!(err, CompressionError::TooLarge { limit, .. } if limit == 1 << 20),
                "{name}: {err}"
            );
            // Exactly at the limit is fine.
            assert_eq!(c.decompress(h, &packed, 8 << 20).unwrap().len(), 8 << 20);
        }
    }

    #[test]
    fn corrupt_and_unknown_are_typed_errors() {
        let c = Compression::default();
        for (_, h) in ALL {
            let err = c.decompress(h, b"\x00\x01garbage-not-compressed", 1024);
            assert!(
                matches!(err, Err(CompressionError::Corrupt { .. })),
                "{h}: {err:?}"
            );
        }
        assert!(matches!(
            c.compress("snappy", b"x"),
            Err(CompressionError::UnknownMethod { .. })
        ));
        assert!(matches!(
            c.decompress("application/x-snappy", b"x", 10),
            Err(CompressionError::UnknownContentType { .. })
        ));
    }

    #[test]
    fn real_gzip_file_is_read_under_the_zlib_header() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(b"from a gzip file").unwrap();
        let gz = enc.finish().unwrap();
        let c = Compression::default();
        let plain = c.decompress("application/x-gzip", &gz, 100).unwrap();
        assert_eq!(&plain[..], b"from a gzip file");
    }

    #[test]
    fn legacy_lzma_alone_is_read() {
        let opts = liblzma::stream::LzmaOptions::new_preset(6).unwrap();
        let stream = liblzma::stream::Stream::new_lzma_encoder(&opts).unwrap();
        let packed = read_all(liblzma::read::XzEncoder::new_stream(
            &b"legacy lzma body"[..],
            stream,
        ))
        .unwrap();
        let c = Compression::default();
        let plain = c.decompress("application/x-lzma", &packed, 100).unwrap();
        assert_eq!(&plain[..], b"legacy lzma body");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let c = Compression::default();
            for (_, h) in ALL {
                let _ = c.decompress(h, &data, 1 << 16);
            }
        }
    }
}
