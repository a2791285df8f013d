//! The IPTC digital source type as XMP inside the image, for platforms that read metadata but
//! not C2PA (IPTC Photo Metadata Standard, "Digital Source Type", property
//! `Iptc4xmpExt:DigitalSourceType`).
//!
//! The containers are parsed and written by the `img-parts` crate; only the small parts it
//! has no helper for are written here, each from its specification: the XMP packet itself
//! (one property), and the wrappers each format puts it in (XMP Specification Part 3,
//! "Embedding XMP metadata in application files"): PNG's `iTXt` chunk with keyword
//! `XML:com.adobe.xmp`, JPEG's APP1 segment after the `http://ns.adobe.com/xap/1.0/\0`
//! namespace, WebP's `XMP ` chunk (with the extended `VP8X` header, which `img-parts` sets
//! up). The `c2pa` crate can write XMP only for remote manifest references, not arbitrary
//! properties, so it does not cover this. An XMP packet the provider's image already had is
//! replaced (a second packet would be ambiguous to readers); with a provider C2PA manifest,
//! the original bytes stay in the parent ingredient.

use bytes::Bytes;
use img_parts::ImageICC;

use super::{SignError, TRAINED_ALGORITHMIC_MEDIA};

/// The XMP packet: `Iptc4xmpExt:DigitalSourceType` = trainedAlgorithmicMedia.
pub fn packet() -> String {
    format!(
        "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\
<x:xmpmeta xmlns:x=\"adobe:ns:meta/\"><rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\
<rdf:Description rdf:about=\"\" xmlns:Iptc4xmpExt=\"http://iptc.org/std/Iptc4xmpExt/2008-02-29/\" \
Iptc4xmpExt:DigitalSourceType=\"{TRAINED_ALGORITHMIC_MEDIA}\"/></rdf:RDF></x:xmpmeta>\
<?xpacket end=\"r\"?>"
    )
}

const PNG_KEYWORD: &[u8] = b"XML:com.adobe.xmp";
const JPEG_NAMESPACE: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";

/// `image` (of media type `mime`) with the packet in it, any earlier XMP packet removed.
/// Only metadata is touched: the compressed image data is copied as it is.
pub fn embed(image: Bytes, mime: &str) -> Result<Bytes, SignError> {
    let xmp = packet();
    let parse = |e: img_parts::Error| SignError::Parse(e.to_string());
    let src = image;
    let out = match mime {
        "image/png" => {
            let mut png = img_parts::png::Png::from_bytes(src).map_err(parse)?;
            let chunks = png.chunks_mut();
            chunks.retain(|c| !(c.kind() == *b"iTXt" && c.contents().starts_with(PNG_KEYWORD)));
            // iTXt: keyword, NUL, compression flag and method (0: none), empty language tag
            // and translated keyword (each NUL-terminated), then the UTF-8 text.
            let mut body = Vec::with_capacity(PNG_KEYWORD.len() + 5 + xmp.len());
            body.extend_from_slice(PNG_KEYWORD);
            body.extend_from_slice(&[0, 0, 0, 0, 0]);
            body.extend_from_slice(xmp.as_bytes());
            // Right after IHDR, which must come first.
            let at = chunks.iter().position(|c| c.kind() == *b"IHDR").map_or(0, |i| i + 1);
            chunks.insert(at, img_parts::png::PngChunk::new(*b"iTXt", Bytes::from(body)));
            png.encoder().bytes()
        }
        "image/jpeg" => {
            let mut jpeg = img_parts::jpeg::Jpeg::from_bytes(src).map_err(parse)?;
            let segments = jpeg.segments_mut();
            segments.retain(|s| {
                !(s.marker() == img_parts::jpeg::markers::APP1 && s.contents().starts_with(JPEG_NAMESPACE))
            });
            let mut body = Vec::with_capacity(JPEG_NAMESPACE.len() + xmp.len());
            body.extend_from_slice(JPEG_NAMESPACE);
            body.extend_from_slice(xmp.as_bytes());
            // After the JFIF APP0 and an Exif APP1, where readers look first.
            let at = segments
                .iter()
                .position(|s| !matches!(s.marker(), img_parts::jpeg::markers::APP0 | img_parts::jpeg::markers::APP1))
                .unwrap_or(segments.len());
            segments.insert(
                at,
                img_parts::jpeg::JpegSegment::new_with_contents(img_parts::jpeg::markers::APP1, Bytes::from(body)),
            );
            jpeg.encoder().bytes()
        }
        "image/webp" => {
            use img_parts::riff::{RiffChunk, RiffContent};
            use img_parts::webp::{WebP, CHUNK_XMP};
            let mut webp = WebP::from_bytes(src).map_err(parse)?;
            webp.remove_chunks_by_id(CHUNK_XMP);
            webp.chunks_mut().push(RiffChunk::new(CHUNK_XMP, RiffContent::Data(Bytes::from(xmp.into_bytes()))));
            // Setting the ICC profile again (to what it was) has img-parts turn a simple
            // WebP into the extended format and set VP8X's XMP flag.
            let icc = webp.icc_profile();
            webp.set_icc_profile(icc);
            if webp.chunk_by_id(img_parts::webp::CHUNK_VP8X).is_none() {
                return Err(SignError::Parse("WebP without a readable canvas size".into()));
            }
            webp.encoder().bytes()
        }
        _ => return Err(SignError::Format),
    };
    Ok(out)
}

/// Whether `image` carries an XMP packet stating the trainedAlgorithmicMedia digital source
/// type (a byte search: the packet is plain text in all three formats).
pub fn states_ai_generated(image: &[u8]) -> bool {
    let needle = format!("DigitalSourceType=\"{TRAINED_ALGORITHMIC_MEDIA}\"");
    memchr::memmem::find(image, needle.as_bytes()).is_some()
}
