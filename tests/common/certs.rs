// Test-only C2PA signing identities, made fresh by each test with `rcgen` (nothing private is
// committed): a root CA and an end-entity signing certificate with what C2PA's certificate
// profile asks for (digitalSignature key usage, the emailProtection extended key usage, an
// authority key identifier, not self-signed).

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SignatureAlgorithm,
};

/// A test chain: PEM texts.
pub struct TestChain {
    /// The signing certificate (the chain a signer presents).
    pub chain_pem: String,
    /// The signing certificate's private key, PKCS#8.
    pub key_pem: String,
    /// The root CA certificate: the trust anchor.
    pub root_pem: String,
}

/// A root and a signing certificate whose keys use `alg` (e.g. `rcgen::PKCS_ECDSA_P256_SHA256`,
/// `rcgen::PKCS_ED25519`); `eku` false leaves the extended key usage out (a certificate C2PA
/// readers refuse).
pub fn chain_with(alg: &'static SignatureAlgorithm, name: &str, eku: bool) -> TestChain {
    let root_key = KeyPair::generate_for(alg).expect("root key");
    let mut root = CertificateParams::new(Vec::<String>::new()).expect("root params");
    root.distinguished_name.push(DnType::CommonName, format!("{name} test root"));
    root.distinguished_name.push(DnType::OrganizationName, "ACC tests");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let root = CertifiedIssuer::self_signed(root, root_key).expect("root cert");

    let key = KeyPair::generate_for(alg).expect("signing key");
    let mut leaf = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
    leaf.distinguished_name.push(DnType::CommonName, format!("{name} test signer"));
    leaf.distinguished_name.push(DnType::OrganizationName, "ACC tests");
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if eku {
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
    }
    leaf.use_authority_key_identifier_extension = true;
    let cert = leaf.signed_by(&key, &root).expect("leaf cert");
    TestChain { chain_pem: cert.pem(), key_pem: key.serialize_pem(), root_pem: root.pem() }
}

/// An ES256 (P-256) test chain.
pub fn chain(name: &str) -> TestChain {
    chain_with(&rcgen::PKCS_ECDSA_P256_SHA256, name, true)
}
