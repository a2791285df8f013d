use super::read::{inspect, Verdict};
use super::*;

/// The test chains the end-to-end tests use too (generated with rcgen, nothing committed).
#[allow(dead_code)]
mod certs {
    include!("../../../tests/common/certs.rs");
}

/// Writes a chain's PEM files into `dir` and loads them.
fn load(dir: &std::path::Path, c: &certs::TestChain) -> Result<Credentials, String> {
    let cert = dir.join("chain.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, &c.chain_pem).unwrap();
    std::fs::write(&key, &c.key_pem).unwrap();
    Credentials::load(Source::File(cert.display().to_string()), Source::File(key.display().to_string()))
}

fn facts() -> Facts {
    Facts {
        trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
        route: "brand".into(),
        provider: "primary".into(),
        provider_kind: "openai".into(),
        model: Some("gpt-image-1".into()),
        model_version: Some("gpt-image-1-2025-04-15".into()),
        evaluations: vec![Evaluation { evaluator: "sanity".into(), verdict: "pass".into(), score: 1.0 }],
        prompt: None,
    }
}

/// A 64x48 image with varied pixels in `format`.
fn image(format: image::ImageFormat) -> (Vec<u8>, image::RgbImage) {
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x ^ y) * 3) as u8]));
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img.clone()).write_to(&mut out, format).unwrap();
    (out.into_inner(), img)
}

#[test]
fn png_jpeg_and_webp_are_signed_with_the_trace_and_verify_against_the_root_pixels_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs::chain("gateway");
    let creds = load(dir.path(), &c).unwrap();
    assert_eq!(creds.algorithm(), "es256");
    for format in [image::ImageFormat::Png, image::ImageFormat::Jpeg, image::ImageFormat::WebP] {
        let (src, _) = image(format);
        let signed = creds.sign(&Bytes::from(src.clone()), &facts(), &[]).unwrap_or_else(|e| panic!("{format:?}: {e}"));
        assert!(!signed.parent);
        assert!(signed.manifest.starts_with("urn:c2pa:"), "{}", signed.manifest);
        let r = inspect(&signed.bytes, Some(&c.root_pem)).unwrap();
        assert_eq!(r.verdict, Verdict::Trusted, "{format:?}: {:?}", r.failures);
        assert_eq!(r.manifest.as_deref(), Some(signed.manifest.as_str()));
        assert_eq!(r.action.as_deref(), Some("c2pa.created"));
        assert_eq!(r.digital_source_type.as_deref(), Some(TRAINED_ALGORITHMIC_MEDIA));
        assert!(r.xmp_ai_generated, "{format:?}: no XMP digital source type");
        let t = r.trace.unwrap();
        assert_eq!(t["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(t["route"], "brand");
        assert_eq!(t["provider_kind"], "openai");
        assert_eq!(t["evaluations"][0]["evaluator"], "sanity");
        assert_eq!(t["evaluations"][0]["verdict"], "pass");
        assert!(t.get("prompt").is_none());
        assert_eq!(r.generator.unwrap()["name"], "gpt-image-1");
        assert!(r.claim_generator.unwrap().starts_with("acc "));
        // The pixels: decoding the signed image gives what decoding the provider's gave.
        let before = image::load_from_memory(&src).unwrap().to_rgb8();
        let after = image::load_from_memory(&signed.bytes).unwrap().to_rgb8();
        assert!(before == after, "{format:?}: pixels changed");
    }
}

#[test]
fn a_changed_pixel_byte_breaks_the_hash_and_an_unsigned_image_has_no_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs::chain("gateway");
    let creds = load(dir.path(), &c).unwrap();
    let (src, _) = image(image::ImageFormat::Png);
    assert_eq!(inspect(&src, None).unwrap().verdict, Verdict::NoManifest);
    let signed = creds.sign(&Bytes::from(src.clone()), &facts(), &[]).unwrap();
    assert_eq!(inspect(&signed.bytes, None).unwrap().verdict, Verdict::Valid);
    // The last IDAT's last data byte (before its CRC and the 12-byte IEND).
    let mut tampered = signed.bytes.clone();
    let at = tampered.len() - 12 - 4 - 1;
    tampered[at] ^= 0x01;
    let r = inspect(&tampered, None).unwrap();
    assert_eq!(r.verdict, Verdict::Invalid);
    assert!(r.failures.iter().any(|f| f.contains("dataHash.mismatch")), "{:?}", r.failures);
}

#[test]
fn a_provider_signed_image_keeps_its_manifest_as_parent_and_another_signer_is_untrusted() {
    let dir = tempfile::tempdir().unwrap();
    let provider_dir = tempfile::tempdir().unwrap();
    let gateway = certs::chain("gateway");
    let provider = certs::chain("provider");
    let creds = load(dir.path(), &gateway).unwrap();
    let provider_creds = load(provider_dir.path(), &provider).unwrap();
    let (src, _) = image(image::ImageFormat::Jpeg);
    let from_provider = provider_creds.sign(&Bytes::from(src.clone()), &facts(), &[]).unwrap();
    // Signed by the provider's key: not trusted by the gateway's root.
    assert_eq!(inspect(&from_provider.bytes, Some(&gateway.root_pem)).unwrap().verdict, Verdict::Untrusted);
    let signed = creds.sign(&Bytes::from(from_provider.bytes.clone()), &facts(), &[]).unwrap();
    assert!(signed.parent);
    let r = inspect(&signed.bytes, Some(&gateway.root_pem)).unwrap();
    // The parent's signer is not under the gateway's root either: the ingredient is untrusted,
    // which the state tolerates.
    assert_eq!(r.verdict, Verdict::Trusted, "{:?}", r.failures);
    let parent = r.parent.expect("parent ingredient");
    assert_eq!(parent["active_manifest"], from_provider.manifest.as_str());
    assert_eq!(r.digital_source_type.as_deref(), Some(TRAINED_ALGORITHMIC_MEDIA));
}

#[test]
fn misconfigured_credentials_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = certs::chain("a");
    let b = certs::chain("b");
    // The key of another certificate.
    let mixed =
        certs::TestChain { chain_pem: a.chain_pem.clone(), key_pem: b.key_pem.clone(), root_pem: String::new() };
    let e = load(dir.path(), &mixed).unwrap_err();
    assert!(e.contains("key.pem") && e.contains("does not verify"), "{e}");
    assert!(!e.contains("PRIVATE KEY"), "key material in an error: {e}");
    // No extended key usage: C2PA's certificate profile refuses it.
    let no_eku = certs::chain_with(&rcgen::PKCS_ECDSA_P256_SHA256, "x", false);
    let e = load(dir.path(), &no_eku).unwrap_err();
    assert!(e.contains("certificate is invalid") && e.contains("extended key usage"), "{e}");
    // Missing files.
    let e =
        Credentials::load(Source::File("/nonexistent/chain.pem".into()), Source::File("/nonexistent/key.pem".into()))
            .unwrap_err();
    assert!(e.contains("/nonexistent/chain.pem"), "{e}");
    // A variable that is not set.
    let e = Credentials::load(Source::Env("ACC_TEST_UNSET_CHAIN_VAR".into()), Source::File("k".into())).unwrap_err();
    assert!(e.contains("ACC_TEST_UNSET_CHAIN_VAR is not set"), "{e}");
    // SEC1 instead of PKCS#8.
    assert!(algorithm_of("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n")
        .unwrap_err()
        .contains("not PKCS#8"));
}

#[test]
fn the_algorithm_comes_from_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p384 = certs::chain_with(&rcgen::PKCS_ECDSA_P384_SHA384, "p384", true);
    assert_eq!(load(dir.path(), &p384).unwrap().algorithm(), "es384");
    let ed = certs::chain_with(&rcgen::PKCS_ED25519, "ed", true);
    let creds = load(dir.path(), &ed).unwrap();
    assert_eq!(creds.algorithm(), "ed25519");
    let (src, _) = image(image::ImageFormat::Png);
    let signed = creds.sign(&Bytes::from(src.clone()), &facts(), &[]).unwrap();
    assert_eq!(inspect(&signed.bytes, Some(&ed.root_pem)).unwrap().verdict, Verdict::Trusted);
}

/// A provider image whose manifest is invalid (here its pixels changed after it was signed, so
/// the hash no longer matches) is signed as a new creation: its broken manifest is not kept as
/// the parent, where it made the gateway's own manifest read as invalid.
#[test]
fn a_provider_manifest_that_is_invalid_is_not_kept_as_parent() {
    let dir = tempfile::tempdir().unwrap();
    let provider_dir = tempfile::tempdir().unwrap();
    let gateway = certs::chain("gateway");
    let creds = load(dir.path(), &gateway).unwrap();
    let provider_creds = load(provider_dir.path(), &certs::chain("provider")).unwrap();
    let (src, _) = image(image::ImageFormat::Jpeg);
    let mut from_provider = provider_creds.sign(&Bytes::from(src), &facts(), &[]).unwrap().bytes;
    // A byte of the scan data before the end-of-image marker (neither it nor its change a 0xFF,
    // so no marker appears or vanishes).
    assert_eq!(&from_provider[from_provider.len() - 2..], &[0xFF, 0xD9]);
    let at = (1..64).map(|k| from_provider.len() - 2 - k).find(|&i| from_provider[i] < 0xFE).unwrap();
    from_provider[at] ^= 0x01;
    assert_eq!(inspect(&from_provider, None).unwrap().verdict, Verdict::Invalid);
    let signed = creds.sign(&Bytes::from(from_provider), &facts(), &[]).unwrap();
    assert!(!signed.parent);
    let r = inspect(&signed.bytes, Some(&gateway.root_pem)).unwrap();
    assert_eq!(r.verdict, Verdict::Trusted, "{:?}", r.failures);
    assert!(r.parent.is_none(), "{:?}", r.parent);
    assert_eq!(r.action.as_deref(), Some("c2pa.created"));
}

/// An edit's output names its input images as `inputTo` ingredients: one with a valid manifest
/// keeps it (the chain goes on), one whose manifest broke (changed after signing) is named
/// without it, and the gateway's manifest stays trusted either way; what C2PA cannot hash is
/// left out.
#[test]
fn an_edit_names_its_inputs_and_a_broken_input_manifest_does_not_spoil_it() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = certs::chain("gateway");
    let creds = load(dir.path(), &gateway).unwrap();
    let (plain, _) = image(image::ImageFormat::Png);
    let (jpeg, _) = image(image::ImageFormat::Jpeg);
    let earlier = creds.sign(&Bytes::from(jpeg), &facts(), &[]).unwrap();
    let mut broken = creds.sign(&Bytes::from(plain.clone()), &facts(), &[]).unwrap().bytes;
    let idat = broken.windows(4).position(|w| w == b"IDAT").unwrap();
    broken[idat + 8] ^= 0x01;
    assert_eq!(inspect(&broken, None).unwrap().verdict, Verdict::Invalid);
    let inputs = [
        Input::new("image[]: plain.png".into(), Bytes::from(plain.clone())),
        Input::new("image[]: earlier.jpg".into(), Bytes::from(earlier.bytes.clone())),
        Input::new("image[]: broken.png".into(), Bytes::from(broken)),
        Input::new("mask: mask.gif".into(), Bytes::from_static(b"GIF89a...")),
    ];
    let (out, _) = image(image::ImageFormat::Png);
    let signed = creds.sign(&Bytes::from(out), &facts(), &inputs).unwrap();
    let r = inspect(&signed.bytes, Some(&gateway.root_pem)).unwrap();
    assert_eq!(r.verdict, Verdict::Trusted, "{:?}", r.failures);
    assert_eq!(r.action.as_deref(), Some("c2pa.created"));
    let titles: Vec<&str> = r.inputs.iter().map(|i| i["title"].as_str().unwrap()).collect();
    assert_eq!(titles, ["image[]: plain.png", "image[]: earlier.jpg", "image[]: broken.png"]);
    assert!(r.inputs[0]["active_manifest"].is_null());
    assert_eq!(r.inputs[1]["active_manifest"], earlier.manifest.as_str());
    assert!(r.inputs[2]["active_manifest"].is_null());
    assert!(r.parent.is_none());
    let text = super::read::render_text(&r);
    assert!(
        text.contains(&format!("input:        image[]: earlier.jpg (its manifest {})", earlier.manifest)),
        "{text}"
    );
}

/// A file that starts like a PNG but is cut short is no image to judge (exit 2 in the CLI), not
/// an invalid manifest; a signed one cut inside its pixels still reads as invalid.
#[test]
fn a_truncated_image_is_unreadable_and_a_truncated_signed_one_invalid() {
    let (plain, _) = image(image::ImageFormat::Png);
    let cut = &plain[..plain.len() / 2];
    let r = inspect(cut, None);
    assert!(matches!(r, Err(super::read::ReadError::Unreadable(_))), "{r:?}");
    let dir = tempfile::tempdir().unwrap();
    let creds = load(dir.path(), &certs::chain("gateway")).unwrap();
    let signed = creds.sign(&Bytes::from(plain.clone()), &facts(), &[]).unwrap().bytes;
    let mut changed = signed.clone();
    let idat = changed.windows(4).position(|w| w == b"IDAT").unwrap();
    changed[idat + 8] ^= 0x01;
    assert_eq!(inspect(&changed, None).unwrap().verdict, Verdict::Invalid);
}
